"""The training loop: a run set up, its epochs of steps, validation, early stopping, checkpoints, resume, logs
and TensorBoard (the step itself, its schedule and warm-up are in step.py).

Fast path: data and augmentation on the device, channels_last, bf16 autocast on CUDA, fused optimisers on
CUDA, cuDNN autotuning, the step replayed as a CUDA graph on one GPU, optional torch.compile (compilation,
autotuning and graph capture happen in a warm-up before the clock starts), running metrics kept on the device
and read once per logging interval, checkpoints written by a background thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..base.config import Config, make_config, save_config
from ..base.errors import ConfigError, UsageError, UserError
from ..base.inference import Settings, predict_logits, settings_for, tta_views
from ..base.progress import Progress
from ..base.storage import atomic_write_text, ensure_writable_dir, remove_stale_temp_files
from ..data.loader import Loader, validation_mask
from ..data.sources import load_dataset
from ..data.splits import compare_split, split_record, untrained_test
from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .distributed import Dist
from .distributed import setup as setup_distributed
from .environment import record_session
from .epochstate import EpochTotals, restore_rng, rng_state, saved_totals
from .finetune import (
    check_size,
    freeze_body,
    normalised_like,
    open_source,
    source_overlap,
    start_from,
    train_mode,
    with_source_images,
)
from .interrupt import Interrupted, StopRequest, resume_command
from .runlock import RunLock
from .step import (
    CHANNELS_LAST,
    Lookahead,
    TrainStep,
    WeightAverage,
    build_optimizer,
    frozen_at,
    learning_rate,
    load_optimizer_state,
    make_model,
    sync,
    trains_in,
    warm_up,
)


@torch.inference_mode()
def evaluate_split(forward: nn.Module, loader: Loader, dist: Dist, desc: str | None, settings: Settings
                   ) -> tuple[float, float, int]:
    """(mean loss, accuracy, number of images) over a validation or test set, run with `settings` (TTA views,
    precision); under torchrun each rank evaluates its shard and the sums are reduced, so every image counts
    exactly once."""
    logits, labels = predict_logits(forward, loader, settings, desc if dist.is_main else None)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(1) == labels).sum()
    count = torch.tensor(len(labels), device=labels.device)
    dist.sum_(loss, correct, count)
    return loss.item() / count.item(), correct.item() / count.item(), int(count.item())


class CheckpointWriter:
    """Writes checkpoints and the metrics file on a background thread, so training goes on while the disk works.
    On a GPU the tensors' copies to (pinned) host memory are queued behind the steps already launched, and the
    thread waits for them, not the training loop. Any write error surfaces at the next write or at close()."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def write(self, run_dir: Path, state: dict, best: bool) -> None:
        self.wait()
        snapshot = _to_cpu(state, non_blocking=True)
        copied = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
        self._pending = self._pool.submit(self._write, run_dir, snapshot, best, copied)

    @staticmethod
    def _write(run_dir: Path, state: dict, best: bool, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        if best:
            save_checkpoint(run_dir / "best.pt", state)
        save_checkpoint(run_dir / "last.pt", state)
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in state["history"]))

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _to_cpu(obj, non_blocking: bool = False):
    """A copy of `obj` with its tensors on the CPU. `non_blocking`: copies from a GPU land in pinned memory and
    are valid only once the stream has reached them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: _to_cpu(v, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, non_blocking) for v in obj)
    return obj


def default_run_dir(runs_dir: Path, name: str | None) -> Path:
    return Path(runs_dir) / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))


class DivergedError(UserError):
    """The loss (or the gradient norm) became NaN or infinite."""


class _NoWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: Config, run_dir: Path, *, data_dir: str | Path | None = None, device: str | None = None,
          resume: bool = False, test: bool = False, on_epoch_end: Callable[[dict], bool] | None = None) -> dict:
    """Train `cfg` into `run_dir` (or continue the run there when `resume`); returns the last checkpoint state.

    `test`: after the last epoch, also measure test accuracy (with the configured TTA) and record it.
    `on_epoch_end(metrics)` is called after each epoch's checkpoint; returning True stops the run there.
    Under torchrun this process is one rank of a DistributedDataParallel job (see `distributed.py`).
    SIGINT/SIGTERM save a resumable checkpoint and raise `Interrupted`; a NaN loss raises `DivergedError`.
    """
    if cfg.data.path:  # the run folder records where the images are, whatever the current folder later
        path = str(Path(cfg.data.path).expanduser().resolve())
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    if cfg.init_from and not resume:  # likewise the model it started from
        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).expanduser().resolve()))
    dist, torch_device = setup_distributed(device, cfg.sync_batchnorm)
    lock = RunLock(run_dir)
    try:
        trainer = Trainer(cfg, Path(run_dir), dist, torch_device, lock, data_dir=data_dir, device_arg=device,
                          resume=resume, test=test)
        state = trainer.run(on_epoch_end)
        dist.barrier()  # leave together: a rank tearing down its connections early can abort the others
        return state
    finally:
        lock.release()
        dist.close()


LONG_RUN_SECONDS = 600  # a CPU run estimated to take longer gets a hint at the quick preset
QUICK_MODEL = "quicknet"  # the quick preset's model: no hint for runs that already use it
RESUMED_KEYS = ("epoch", "best_val_acc", "best_epoch", "epochs_since_best", "stopped_early", "history",
                "train_seconds")


class Trainer:
    """One training run, in the order a reader meets it.

    Setting up (`__init__`): the run folder (lock, resume or refuse), the data and its loaders, the model,
    optimizer and step, and the state a checkpoint restores. `run`: the warm-up before the clock, the outputs
    (run folder files, TensorBoard), then epoch after epoch: its steps (`_train_epoch`, with `_check_in` at
    logging intervals: divergence, progress, mid-epoch checkpoints, signals) and its end (`_end_epoch`:
    validation, best model and early stopping, checkpoint, logs). `state` is what checkpoints hold besides the
    tensors; `start_step`/`start_order` the position a mid-epoch checkpoint resumes from.
    """

    def __init__(self, cfg: Config, run_dir: Path, dist: Dist, device: torch.device, lock: RunLock, *,
                 data_dir: str | Path | None, device_arg: str | None, resume: bool, test: bool):
        self.cfg, self.run_dir, self.dist, self.device, self.lock = cfg, run_dir, dist, device, lock
        self.data_dir, self.device_arg, self.resume = data_dir, device_arg, resume
        self.checkpoint = self._open_run()
        self.settings = settings_for(cfg.to_dict(), device)  # validation and test run as evaluate will
        # fine-tuning: the model to start from (on resume the run's own weights are loaded instead)
        self.source = open_source(cfg) if cfg.init_from and self.checkpoint is None else None
        train_images = self._load_data(test)
        self._build_model(train_images)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.state = {
            "format": FORMAT, "model": cfg.model, "num_classes": len(self.classes), "classes": list(self.classes),
            "dataset": self.data.name, "mean": list(self.data.mean), "std": list(self.data.std),
            "image_size": self.data.image_size,
            "epoch": 0, "best_val_acc": -1.0, "best_epoch": 0, "epochs_since_best": 0, "stopped_early": False,
            "history": [], "train_seconds": 0.0, "precision": self.settings.precision, "init_from": self.origin,
            "tta_mirror": self.settings.mirror, "split": self.split,
        }
        self.start_step, self.start_order = 0, None
        self.last_good = "no checkpoint was saved yet"
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        self.writer = _NoWriter()  # TensorBoard's SummaryWriter on rank 0, once the run folder is set up

    # -- setting up ------------------------------------------------------------------------------------------

    def _open_run(self) -> dict | None:
        """Lock the run folder (before reading last.pt: another process may be training there); the checkpoint
        to resume from, or None for a new run, which must not overwrite an earlier one."""
        if self.dist.is_main and self.run_dir.is_dir():
            self.lock.acquire()
        if self.resume:
            return load_checkpoint(self.run_dir / "last.pt")
        if (self.run_dir / "last.pt").exists():
            raise UsageError(f"run folder {self.run_dir} already holds a run: continue it with --resume "
                             f"{self.run_dir}, or pick another --name")
        return None

    def _load_data(self, test: bool) -> torch.Tensor:
        """The train, validation and (with `test`) test loaders, each rank on its shard; returns the training
        images (some models initialise from them)."""
        cfg, dist = self.cfg, self.dist
        if not dist.is_main:
            dist.barrier()  # rank 0 downloads, extracts or decodes first; the others then read its files or cache
        self.data = data = load_dataset(cfg.data, self.data_dir, device=self.device)
        if dist.is_main:
            dist.barrier()
        if self.source is not None:
            check_size(self.source, data, cfg)
        if cfg.init_from:
            self.data = data = normalised_like(data, self.checkpoint or self.source.checkpoint,
                                               resumed=self.checkpoint is not None)
        val = validation_mask(data, cfg.data)
        (train_x, train_y), held_out = ((data.train_images, data.train_labels), None) if val is None else (
            (data.train_images[~val], data.train_labels[~val]), (data.train_images[val], data.train_labels[val]))
        # what the model trains, validates and is tested on: counts and digests per side (folder datasets: each
        # image's path and pixel identity, so evaluate can tell what changed sides since)
        self.split = split_record(data.train_ids, data.train_images, val, data.test_ids, data.test_images)
        if cfg.init_from:  # and the images the source model trained on (finetune.py)
            self.split = with_source_images(self.split, self.checkpoint or self.source.checkpoint,
                                            resumed=self.checkpoint is not None)
        # a folder's test copies of training images (and a fine-tuned run's images its source trained on)
        self.split_change = compare_split(self.split, data)
        shard = {"rank": dist.rank, "world_size": dist.world_size, "device": self.device,
                 "memory_format": CHANNELS_LAST, "mean": data.mean, "std": data.std}
        if 0 < len(train_x) % cfg.batch_size < dist.world_size:
            raise ConfigError(f"config key 'batch_size': the last batch of each epoch would hold "
                              f"{len(train_x) % cfg.batch_size} images, fewer than the {dist.world_size} processes")
        self.classes = list(data.classes)
        self.train_loader = Loader(train_x, train_y, cfg.batch_size, augment=cfg.augment, shuffle=True,
                                   seed=cfg.seed, **shard)
        self.val_loader = Loader(*held_out, cfg.eval_batch_size, **shard) if held_out else None
        # the test images evaluate counts too: none the model trains on
        self.test_loader = Loader(*untrained_test(data, self.split_change), cfg.eval_batch_size, **shard) \
            if test else None
        self.best_weights: dict | None = None  # with --test: the best model's weights, tested when the run ends
        return train_x

    def _build_model(self, train_images: torch.Tensor) -> None:
        cfg = self.cfg
        self.model = make_model(cfg, len(self.classes), train_images, self.device, mean=self.data.mean,
                                std=self.data.std)
        self.origin = None  # what a fine-tuning run started from
        if self.source is not None:
            self.origin = start_from(self.model, self.source, self.classes, cfg, self.dist.is_main)
        if cfg.init_from and cfg.finetune == "head":
            freeze_body(self.model)
        # DistributedDataParallel under torchrun, else the model itself; the parameters are shared
        trained = self.dist.wrap(self.model, cfg.sync_batchnorm)
        self.optimizer = build_optimizer(cfg, self.model, self.device)
        self.step = TrainStep(trained, self.optimizer, cfg, self.device, self.settings.precision)
        self.lookahead = Lookahead(self.model, cfg.optimizer.lookahead_steps) if cfg.optimizer.lookahead_steps \
            else None
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay else None

    def _restore(self, checkpoint: dict) -> None:
        """Continue from `checkpoint`: weights, optimizer, RNG, lookahead average, progress and position."""
        if list(checkpoint["classes"]) != list(self.classes):
            raise UserError(f"{self.run_dir}: the dataset's classes changed since the run was trained "
                            f"({len(checkpoint['classes'])} then, {len(self.classes)} now): restore the dataset as it "
                            f"was, or start a new run")
        # with ema_decay, model_state is the weight average and train_model_state the weights being trained
        self.model.load_state_dict(checkpoint.get("train_model_state") or checkpoint["model_state"])
        if self.ema is not None:
            for name, value in checkpoint["model_state"].items():
                if name in self.ema.average:
                    self.ema.average[name].copy_(value)
        saved, ours = checkpoint["config"]["optimizer"]["name"], self.cfg.optimizer.name
        if saved != ours:  # the saved state (momentum buffers, moments) is another optimizer's
            raise ConfigError(f"config key 'optimizer.name': {self.run_dir} was trained with {saved}, "
                              f"whose state cannot continue as {ours}: resume with optimizer.name={saved}, "
                              f"or start a new run with init_from={self.run_dir}")
        load_optimizer_state(self.optimizer, checkpoint["optimizer_state"])  # this config's hyperparameters
        self.changed = changed_settings(checkpoint["config"], self.cfg.to_dict())
        restore_rng(checkpoint, self.device, self.dist)
        if self.lookahead is not None:
            for name, value in checkpoint["lookahead"].items():
                self.lookahead.average[name].copy_(value)
        self.state.update({k: checkpoint[k] for k in RESUMED_KEYS})
        self.state["init_from"] = checkpoint.get("init_from")
        self.start_step, self.start_order = checkpoint.get("step", 0), checkpoint.get("order")
        self.last_good = self._checkpoint_note(self.state["epoch"], self.start_step)

    @property
    def finished(self) -> bool:
        return self.state["stopped_early"] or self.state["epoch"] >= self.cfg.epochs

    # -- the run ---------------------------------------------------------------------------------------------

    def run(self, on_epoch_end: Callable[[dict], bool] | None = None) -> dict:
        """Train the remaining epochs; returns the state of the last checkpoint."""
        if self.finished:
            if self.dist.is_main:
                print(f"{self.run_dir}: training already finished after {self.state['epoch']} epochs; nothing to do")
            return self.state
        self._warm_up()
        self._open_outputs()
        self.checkpoints = CheckpointWriter(self.device)
        self._announce()
        sync(self.device)
        self.session_started, self.seconds_before = time.perf_counter(), self.state["train_seconds"]
        self.estimated = self.device.type != "cpu"  # the time estimate is for CPU runs only
        self.estimate_start: tuple[float, int] | None = None
        try:
            with StopRequest() as self.stop:
                for epoch in range(self.state["epoch"], self.cfg.epochs):
                    started = time.perf_counter()
                    self._train_epoch(epoch)
                    if self._end_epoch(epoch, started, on_epoch_end):
                        break
            if self.test_loader is not None:
                self._test_best()
        finally:
            self.writer.close()
            self.checkpoints.close()
        self._farewell()
        return self.state

    def _warm_up(self) -> None:
        """Compile, autotune and capture CUDA graphs before the clock starts (when compiling or on one GPU)."""
        if not (self.cfg.compile or self.step.use_graphs):
            return
        started = time.perf_counter()
        evaluated = [loader for loader in (self.val_loader, self.test_loader) if loader is not None]
        warm_up(self.step, self.train_loader, evaluated, self.settings, range(self.state["epoch"], self.cfg.epochs),
                lambda model: train_mode(model, self.cfg))
        sync(self.device)
        if self.dist.is_main:
            work = ", ".join(name for name, done in (("torch.compile", self.cfg.compile),
                                                     ("cuDNN autotuning and CUDA graph capture",
                                                      self.step.use_graphs)) if done)
            print(f"warm-up before the clock ({work}): {time.perf_counter() - started:.1f}s")

    def _open_outputs(self) -> None:
        """On rank 0: a writable, locked run folder without stale temp files, its config.yaml, the session in
        environment.json and the TensorBoard writer."""
        if not self.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

        ensure_writable_dir(self.run_dir)  # an unwritable folder fails here, before any training
        if not self.lock.held:
            self.lock.acquire()
        remove_stale_temp_files(self.run_dir)  # from a killed run; the lock makes them surely no one else's
        save_config(self.cfg, self.run_dir / "config.yaml")
        record_session(self.run_dir, self.device, self.state["epoch"] + 1, self.dist.world_size,
                       {"precision": self.settings.precision, "precision_reason": self.settings.precision_reason})
        # On resume, drop events an interrupted run logged after its last checkpoint.
        purge_step = self.state["epoch"] * self.steps_per_epoch + self.start_step if self.resume else None
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def _announce(self) -> None:
        if not self.dist.is_main:
            return
        val = f"{len(self.val_loader.images)} val" if self.val_loader is not None else "no validation"
        processes = f", {self.dist.world_size} processes" if self.dist.active else ""
        print(f"training {self.cfg.model} on {self.data.name} on {self.device} for {self.cfg.epochs} epochs "
              f"({len(self.train_loader.images)} train / {val} images, {self.steps_per_epoch} steps per epoch"
              f"{processes}) -> {self.run_dir}")
        print(f"precision: {self.settings.precision} ({self.settings.precision_reason})")
        if self.cfg.data.dataset == "folder":
            self._announce_copies()
            self._announce_mirroring()
        overlap = source_overlap(self.split, self.cfg) if self.cfg.init_from else None
        if overlap:
            print(overlap)
        if self.checkpoint is not None:
            where = _position(self.state["epoch"], self.start_step)
            print(f"resuming from {self.run_dir / 'last.pt'} {where}"
                  + (f"; changed since: {', '.join(self.changed)}" if self.changed else ""))

    def _announce_copies(self) -> None:
        """A folder run says how many of its test images have a training image's pixels (left out of every
        test accuracy: `--test` and `evaluate` alike)."""
        change = self.split_change
        if change is not None and change.copies:
            print(f"split: {change.copies} of the {change.test_images} test images have the pixels of a "
                  f"training image (copies across the split): test accuracies (--test, evaluate) count the "
                  f"{change.test_images - change.copies} others")

    def _announce_mirroring(self) -> None:
        """A folder run says whether its images are mirrored, in training and test-time views, and how to stop it."""
        flip, tta = self.cfg.augment.flip, self.cfg.tta
        flips = {"random": "each training image mirrored left-right with probability 1/2",
                 "alternate": "each training image mirrored left-right every other epoch",
                 "none": "no training image mirrored"}[flip]
        views = tta_views(tta, self.settings.mirror)
        print(f"mirroring: augment.flip={flip} ({flips}); test-time views: tta {tta} ({views})")
        if flip != "none":
            print("  if mirroring changes what an image shows (digits, text, signs, left/right classes), train with "
                  "augment.flip=none tta=0")

    def _test_best(self) -> None:
        """With --test, however the run ended: the test accuracy of the model the run keeps (best.pt: the best
        validation accuracy, or the last epoch without a validation set), recorded in the state, metrics.jsonl's
        last line and test.json, and printed last by `_farewell`."""
        self.checkpoints.wait()
        weights = self.best_weights
        if weights is None:  # a resumed run whose best epoch came before the resume
            weights = load_checkpoint(self.run_dir / "best.pt")["model_state"]
        current = _to_cpu(self.model.state_dict())
        self.model.load_state_dict(weights)
        self.dist.share_buffers(self.model)
        loss, acc, count = evaluate_split(self.step.forward, self.test_loader, self.dist, "test", self.settings)
        self.model.load_state_dict(current)
        result = {"test_loss": loss, "test_acc": acc, "test_images": count, "checkpoint": "best.pt",
                  "epoch": self.state["best_epoch"], "tta": self.cfg.tta, "precision": self.settings.precision}
        self.state["test"] = result
        if self.dist.is_main:
            self.writer.add_scalar("Accuracy/test", acc, self.state["epoch"] * self.steps_per_epoch)
            rows = self.state["history"] + [{"test": result}]
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in rows))
            atomic_write_text(self.run_dir / "test.json", json.dumps(result, indent=2) + "\n")

    def _farewell(self) -> None:
        if not self.dist.is_main:
            return
        if self.val_loader is not None:
            print(f"best validation accuracy {self.state['best_val_acc']:.2%} at epoch {self.state['best_epoch']}; ",
                  end="")
        print(f"trained {self.state['train_seconds']:.1f}s; checkpoints in {self.run_dir} "
              f"(evaluate with: cifarcnn evaluate {self.run_dir})")
        test = self.state.get("test")
        if test is not None and self.test_loader is not None:
            copies = self.split_change.copies if self.split_change is not None else 0
            left_out = f" ({copies} copies of training images left out)" if copies else ""
            print(f"test accuracy {test['test_acc']:.2%} on {test['test_images']} test images{left_out}, "
                  f"model of epoch {test['epoch']} ({self.run_dir / 'best.pt'})")

    # -- one epoch of steps ----------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> None:
        """The epoch's steps from `start_step` on; its running sums end in `self.totals`."""
        cfg, start = self.cfg, self.start_step
        train_mode(self.model, cfg)
        self.order = self.start_order if self.start_order is not None else self.train_loader.order(epoch)
        self.step.freeze(frozen_at(self.optimizer, epoch))
        self.totals = EpochTotals(self.device, saved_totals(self.checkpoint, self.dist) if start else None)
        self.progress = Progress(self.train_loader.epoch(epoch, start, self.order), total=self.steps_per_epoch,
                                 initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs} train",
                                 refresh_every=cfg.log_every, enabled=self.dist.is_main)
        try:
            for i, (x, y) in enumerate(self.progress, start=start):
                loss = self._step(epoch, i, x, y)
                done = i + 1
                at_log = done % cfg.log_every == 0 or done == self.steps_per_epoch
                global_step = epoch * self.steps_per_epoch + done
                at_checkpoint = (cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0
                                 and done < self.steps_per_epoch)
                # The ranks must agree on stopping, so under torchrun they compare notes at logging intervals.
                if at_log or at_checkpoint or (self.stop.requested and not self.dist.active):
                    self._check_in(epoch, done, loss, at_log, at_checkpoint)
        finally:
            self.progress.close()
        self.start_step, self.start_order = 0, None

    def _step(self, epoch: int, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Step `i` of epoch `epoch` (0-based): learning rates, the optimisation step, lookahead, running sums."""
        lr = learning_rate(self.cfg, epoch + i / self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            self.step.set_lr(group, lr * group["lr_scale"] if trains_in(group, epoch) else 0.0)
        loss, logits, grad_norm = self.step(x, y)
        if self.lookahead is not None:
            self.lookahead.maybe_update(self.model, epoch * self.steps_per_epoch + i + 1, self.total_steps)
        if self.ema is not None:
            self.ema.update(lr / self.cfg.optimizer.lr)  # meets the weights as lr falls to 0
        self.totals.add(loss, logits, y, grad_norm)
        return loss

    def _check_in(self, epoch: int, done: int, loss: torch.Tensor, at_log: bool, at_checkpoint: bool) -> None:
        """After `done` steps of epoch `epoch`: stop on a NaN, log progress, save a mid-epoch checkpoint when one
        is due or a signal came, and stop after saving on a signal (every rank takes the same branch)."""
        stopping, diverged = self.dist.any(self.stop.requested, not self.totals.finite())
        if diverged:
            self.progress.close()
            self.checkpoints.wait()
            self.dist.barrier()
            raise DivergedError(
                f"training diverged: the loss or gradient norm is NaN or infinite by epoch {epoch + 1}, step "
                f"{done} (checked every log_every={self.cfg.log_every} steps); {self.last_good}, and best.pt is "
                f"unchanged. Lower optimizer.lr, or resume with --resume {self.run_dir} optimizer.lr=...")
        if at_log and not self.estimated:
            self._estimate_time(epoch * self.steps_per_epoch + done)
        if at_log and self.dist.is_main:
            self.writer.add_scalar("Loss/train_step", loss.item(), epoch * self.steps_per_epoch + done)
            seen = self.totals.seen.item()
            self.progress.show(done, loss=f"{self.totals.loss.item() / seen:.4f}",
                               acc=f"{self.totals.correct.item() / seen:.2%}")
        if done < self.steps_per_epoch and (at_checkpoint or stopping):
            self._save(epoch, done, self.totals, self.order, best=False)
            if stopping:
                self.progress.close()
                raise self._interrupted(epoch, done)

    def _estimate_time(self, global_step: int) -> None:
        """Once per session on a CPU: when the rest of the run looks longer than LONG_RUN_SECONDS, say how long,
        and how to get a good model in minutes instead. Timed from the first logging interval to the second: the
        first steps of a process are several times slower (oneDNN picks and builds its kernels), so counting
        them overestimated a 9-minute run as 35 minutes."""
        now = time.perf_counter()
        if self.estimate_start is None:
            self.estimate_start = (now, global_step)
            return
        self.estimated = True
        started, first_step = self.estimate_start
        remaining = (self.total_steps - global_step) * (now - started) / (global_step - first_step)
        if remaining < LONG_RUN_SECONDS or not self.dist.is_main:
            return
        hint = "" if self.cfg.model == QUICK_MODEL else "; `cifarcnn train --preset quick` trains one in minutes"
        tqdm.write(f"estimated time on this CPU: about {remaining / 60:.0f} more minutes for {self.cfg.epochs} epochs "
                   f"(timed over steps {first_step + 1}-{global_step}){hint}")

    # -- the end of an epoch ---------------------------------------------------------------------------------

    def _end_epoch(self, epoch: int, started: float, on_epoch_end: Callable[[dict], bool] | None) -> bool:
        """Validate, track the best model, save, log; whether the run stops here (early stopping or
        `on_epoch_end`); raises `Interrupted` when a signal came during the epoch."""
        metrics = self._epoch_metrics(epoch, started)
        improved = self._track_best(metrics)
        if improved and self.test_loader is not None:  # kept on every rank for the test when the run ends
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                self.best_weights = _to_cpu(self.model.state_dict())
        self._save(epoch + 1, 0, None, None, best=improved)
        _log_epoch(self.writer, metrics, (epoch + 1) * self.steps_per_epoch)
        if self.dist.is_main:
            tqdm.write(_summary(self.cfg, metrics) + ("  *best*" if improved and self.val_loader is not None else ""))
        if self.state["stopped_early"]:
            if self.dist.is_main:
                tqdm.write(f"early stopping: no validation improvement for {self.cfg.patience} epochs "
                           f"(best {self.state['best_val_acc']:.2%} at epoch {self.state['best_epoch']})")
            return True
        if on_epoch_end is not None:
            self.checkpoints.wait()
            if on_epoch_end(metrics):
                return True
        if epoch + 1 < self.cfg.epochs and self.dist.any(self.stop.requested)[0]:
            raise self._interrupted(epoch + 1, 0)
        return False

    def _epoch_metrics(self, epoch: int, started: float) -> dict:
        """The epoch's training sums over all ranks, validation (and after the last epoch, with --test, test)
        results and seconds; appended to the history."""
        cfg, last_epoch = self.cfg, epoch + 1 == self.cfg.epochs
        if self.lookahead is not None and last_epoch:
            self.lookahead.update(self.model, 1.0)  # finish on the averaged weights
            if self.ema is not None:
                self.ema.update(learning_rate(cfg, cfg.epochs) / cfg.optimizer.lr)
        sums = self.totals.global_sums(self.dist)
        seen = sums["seen"].item()
        metrics = {"epoch": epoch + 1, "train_loss": sums["loss"].item() / seen,
                   "train_acc": sums["correct"].item() / seen, "train_images": seen, "val_loss": None,
                   "val_acc": None, "val_images": None, "lr": learning_rate(cfg, epoch),
                   "grad_norm": sums["grad_norm"].item() / self.steps_per_epoch}
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():  # the model a run saves
            self.dist.share_buffers(self.model)  # every rank evaluates (and rank 0 saves) the same model
            if self.val_loader is not None:
                metrics["val_loss"], metrics["val_acc"], metrics["val_images"] = evaluate_split(
                    self.step.forward, self.val_loader, self.dist, f"epoch {epoch + 1}/{cfg.epochs} val",
                    self.settings)
        sync(self.device)
        metrics["seconds"] = time.perf_counter() - started
        self.state["history"].append(metrics)
        self.state["epoch"] = epoch + 1
        return metrics

    def _track_best(self, metrics: dict) -> bool:
        """Whether this epoch's model is the best so far; updates the early-stopping count."""
        state = self.state
        if self.val_loader is None:  # without a validation set, the latest model counts as the best one
            state["best_epoch"] = metrics["epoch"]
            return True
        improved = metrics["val_acc"] > state["best_val_acc"]
        if improved:
            state.update(best_val_acc=metrics["val_acc"], best_epoch=metrics["epoch"], epochs_since_best=0)
        else:
            state["epochs_since_best"] += 1
        state["stopped_early"] = bool(self.cfg.patience) and state["epochs_since_best"] >= self.cfg.patience
        return improved

    # -- checkpoints and stopping ----------------------------------------------------------------------------

    def _save(self, epoch_done: int, steps_done: int, totals: EpochTotals | None, order: torch.Tensor | None,
              best: bool) -> None:
        """Checkpoint after `steps_done` steps of epoch `epoch_done` + 1 (0: at the end of epoch `epoch_done`).
        Collective under torchrun: every rank calls it, rank 0 writes (on a background thread)."""
        rng = self.dist.gather(rng_state(self.device))
        sums = self.dist.gather(_to_cpu(totals.local())) if totals is not None else None
        if not self.dist.is_main:
            return
        state = self.state
        state["train_seconds"] = self.seconds_before + time.perf_counter() - self.session_started
        if self.ema is not None:
            state.update(model_state=self.ema.state_dict(self.model), train_model_state=self.model.state_dict())
        else:
            state.update(model_state=self.model.state_dict())
        state.update(config=self.cfg.to_dict(),
                     optimizer_state=self.optimizer.state_dict(), rng=rng[0],
                     rng_ranks=rng if self.dist.active else [],
                     lookahead=self.lookahead.average if self.lookahead is not None else {},
                     step=steps_done, order=order, totals=sums)
        self.checkpoints.write(self.run_dir, state, best=best)
        self.last_good = self._checkpoint_note(epoch_done, steps_done)

    def _checkpoint_note(self, epoch_done: int, steps_done: int) -> str:
        return f"the last good checkpoint is {self.run_dir / 'last.pt'} ({_position(epoch_done, steps_done)})"

    def _interrupted(self, epoch_done: int, steps_done: int) -> Interrupted:
        """The error that ends a run stopped by a signal, once its checkpoint is on disk."""
        self.checkpoints.wait()
        self.dist.barrier()  # every rank stops here; none tears down while rank 0 still writes
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal"
        command = resume_command(self.run_dir, self.data_dir, self.device_arg, self.dist.active)
        return Interrupted(f"interrupted by {name} {_position(epoch_done, steps_done)}; saved "
                           f"{self.run_dir / 'last.pt'}; resume with: {command}", self.stop.signum or signal.SIGTERM)


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """`key old -> new` for each config key whose value differs between two `Config.to_dict()`s."""
    changed = []
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            changed += changed_settings(old, value, f"{prefix}{key}.")
        elif old != value:
            changed.append(f"{prefix}{key} {old} -> {value}")
    return changed


def _position(epoch_done: int, steps_done: int) -> str:
    if steps_done:
        return f"at epoch {epoch_done + 1}, step {steps_done}"
    return f"at the end of epoch {epoch_done}" if epoch_done else "before the first epoch"


def _summary(cfg: Config, m: dict) -> str:
    line = f"epoch {m['epoch']:>3}/{cfg.epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%}"
    if m["val_acc"] is not None:
        line += f"  val loss {m['val_loss']:.4f} acc {m['val_acc']:.2%}"
    if "test_acc" in m:
        line += f"  test acc {m['test_acc']:.2%}"
    return line + f"  lr {m['lr']:.2e}  {m['seconds']:.1f}s"


def _log_epoch(writer, metrics: dict, step: int) -> None:
    """Epoch scalars at the global step where the epoch ended, so a resume's purge_step applies to all tags."""
    for tag, key in (("Loss/train", "train_loss"), ("Loss/val", "val_loss"), ("Accuracy/train", "train_acc"),
                     ("Accuracy/val", "val_acc"), ("Accuracy/test", "test_acc"), ("LearningRate", "lr"),
                     ("GradientNorm", "grad_norm")):
        if metrics.get(key) is not None:
            writer.add_scalar(tag, metrics[key], step)
    writer.flush()


def resume_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The config a run was trained with (from its last checkpoint), with overrides on top."""
    checkpoint = load_checkpoint(Path(run_dir) / "last.pt")
    return make_config(checkpoint["config"], overrides)
