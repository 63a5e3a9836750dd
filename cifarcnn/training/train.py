"""`train()`: one training run, set up and carried out by a `Trainer`, which wires the parts together: the run
folder (run_folder.py), the data and model (build.py), each epoch (loop.py: read it first), validation, the
best model and early stopping, checkpoints (checkpoint.py) and resume, and stopping on a signal or a diverged
loss."""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..base.calibration import calibration_record
from ..base.calibration import describe as describe_calibration
from ..base.config import Config, flat_keys, make_config
from ..base.errors import ConfigError, UserError
from ..base.inference import Settings, predict_logits, settings_for
from ..base.metrics import class_counts, classification_metrics, confusion_matrix, per_class_rows
from ..base.progress import Progress
from ..data.dataset import Dataset
from ..data.loader import Loader, split_by_mask, validation_mask
from ..data.sources import load_dataset
from ..data.splits import compare_split, split_record, untrained_test
from .averages import Averages
from .budget import fit_schedule, stretch_limited_epochs
from .build import eval_loader, make_model, make_step, train_loader
from .checkpoint import FORMAT, CheckpointWriter, load_checkpoint, store_calibration, to_cpu
from .distributed import Dist
from .distributed import setup as setup_distributed
from .epochstate import EpochStart, EpochTotals, restore_rng, rng_state
from .finetune import (
    check_size,
    freeze_body,
    load_source,
    normalized_like,
    start_from,
    train_mode,
    with_source_images,
)
from .interrupt import Interrupted, StopRequest, resume_command
from .loop import train_epoch
from .monitor import best_text, choose_monitor, class_lines, track_best
from .optimizers import load_optimizer_state
from .run_folder import RunFolder
from .runlock import RunLock
from .schedule import learning_rate
from .step import sync, warm_up


@torch.inference_mode()
def evaluate_split(forward: nn.Module, loader: Loader, dist: Dist, desc: str | None, settings: Settings
                   ) -> tuple[float, float, int, torch.Tensor]:
    """(mean loss, accuracy, number of images, confusion matrix) over a validation or test set, run with
    `settings` (TTA views, precision); under torchrun each rank evaluates its shard and the sums (and the
    confusion matrices) are reduced, so every image counts exactly once."""
    logits, labels = predict_logits(forward, loader, settings, desc if dist.is_main else None)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    matrix = confusion_matrix(labels, logits.argmax(1), logits.shape[1])
    dist.sum_(loss, matrix)
    count = matrix.sum().item()
    return loss.item() / count, matrix.trace().item() / count, int(count), matrix.cpu()


def default_run_dir(runs_dir: Path, name: str | None) -> Path:
    return Path(runs_dir) / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))


class DivergedError(UserError):
    """The loss (or the gradient norm) became NaN or infinite."""


def train(cfg: Config, run_dir: Path, *, data_dir: str | Path | None = None, device: str | None = None,
          resume: bool = False, test: bool = False, on_epoch_end: Callable[[dict], bool] | None = None
          ) -> dict:
    """Train `cfg` into `run_dir` (or continue the run there when `resume`); returns the last checkpoint
    state.

    `test`: after the last epoch, also measure test accuracy (with the configured TTA) and record it.
    `on_epoch_end(metrics)` is called after each epoch's checkpoint; returning True stops the run there.
    Under torchrun this process is one rank of a DistributedDataParallel job (see `distributed.py`).
    SIGINT/SIGTERM save a resumable checkpoint and raise `Interrupted`; a NaN loss raises `DivergedError`.
    """
    if cfg.data.path:  # the run folder records where the images are, whatever the current folder later
        path = str(Path(cfg.data.path).expanduser().resolve())
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    if cfg.data.exclude:  # likewise the exclusion list, which evaluate reads again
        exclude = str(Path(cfg.data.exclude).expanduser().resolve())
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, exclude=exclude))
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

    Setting up (`__init__`): the run folder (lock, resume or refuse), the data and its loaders, the model and
    its step, the weight averages, and the state a checkpoint restores. `run`: the warm-up before the clock,
    the outputs, then epoch after epoch: its steps (`loop.train_epoch`, checking in at logging intervals
    through `_check_in`: divergence, progress, mid-epoch checkpoints, signals) and its end (`_end_epoch`:
    validation, best model and early stopping, checkpoint, logs). `state` is what checkpoints hold besides the
    tensors; `start` the position the next epoch begins at (a mid-epoch checkpoint's, on resume)."""

    def __init__(self, cfg: Config, run_dir: Path, dist: Dist, device: torch.device, lock: RunLock, *,
                 data_dir: str | Path | None, device_arg: str | None, resume: bool, test: bool):
        self.cfg, self.run_dir, self.dist, self.device = cfg, run_dir, dist, device
        self.data_dir, self.device_arg, self.resume = data_dir, device_arg, resume
        self.folder = RunFolder(run_dir, lock, dist)
        self.resumed_from = self.folder.open(resume)  # the checkpoint a resumed run continues from
        self.settings = settings_for(cfg.to_dict(), device)  # validation and test run as evaluate will
        # fine-tuning: the model to start from (on resume the run's own weights are loaded instead)
        self.source = load_source(cfg) if cfg.init_from and self.resumed_from is None else None
        self.data = self._load_data()
        val_mask = validation_mask(self.data, cfg.data)
        # what the model trains, validates and is tested on (folder datasets: each image's path and pixels)
        self.split = self._split_record(val_mask)
        # a folder's test copies of training images (and a fine-tuned run's images its source trained on)
        self.split_change = compare_split(self.split, self.data)
        self.classes = list(self.data.classes)
        (train_x, train_y), held_out = split_by_mask(self.data, val_mask)
        self.train_loader, self.val_loader, self.test_loader = self._loaders(train_x, train_y, held_out, test)
        self.steps_per_epoch = len(self.train_loader)
        # the schedule trained (min_steps may raise the epochs); config.yaml and checkpoints keep `configured`
        self.configured = cfg
        self.cfg, self.budget = fit_schedule(cfg, self.steps_per_epoch)
        cfg = self.cfg
        self.model = make_model(cfg, len(self.classes), train_x, device, mean=self.data.mean,
                                std=self.data.std)
        self.origin = self._start_from_source()  # what a fine-tuning run started from, else None
        self.class_counts = {"train": class_counts(train_y, len(self.classes))}
        if held_out:
            self.class_counts["val"] = class_counts(held_out[1], len(self.classes))
        if len(self.data.test_labels):
            self.class_counts["test"] = class_counts(self.data.test_labels, len(self.classes))
        self.monitor, self.monitor_why = choose_monitor(cfg.monitor, self.class_counts["train"])
        self.step = make_step(cfg, self.model, device, self.settings.precision, dist,
                              functools.partial(train_mode, cfg=cfg),
                              torch.tensor(self.class_counts["train"]))
        stretch_limited_epochs(self.step.optimizer, self.budget)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.averages = Averages(self.model, cfg, self.total_steps)
        self.state = {
            "format": FORMAT, "model": cfg.model, "num_classes": len(self.classes),
            "classes": list(self.classes), "dataset": self.data.name, "mean": list(self.data.mean),
            "std": list(self.data.std), "image_size": self.data.image_size,
            "epoch": 0, "best_val_acc": -1.0, "best_epoch": 0, "epochs_since_best": 0, "stopped_early": False,
            "history": [], "train_seconds": 0.0, "precision": self.settings.precision,
            "init_from": self.origin, "tta_mirror": self.settings.mirror, "split": self.split,
            "class_counts": self.class_counts, "monitor": self.monitor, "schedule": self.budget.record(),
        }
        self.start = EpochStart()
        self.last_good = "no checkpoint was saved yet"
        self.changed: list[str] = []  # on resume: the config keys changed since the checkpoint
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
        self.best_weights: dict | None = None  # with --test: the best model's weights, tested at the end
        self.checkpoint_writer = CheckpointWriter(device)
        self.stop = StopRequest()
        self.session_started, self.seconds_before = 0.0, 0.0  # set when the clock starts
        self.estimated = device.type != "cpu"  # the time estimate is for CPU runs only
        self.estimate_start: tuple[float, int] | None = None

    # -- setting up ------------------------------------------------------------------------------------------

    def _load_data(self) -> Dataset:
        """The dataset (rank 0 reads it first); a fine-tuning run's normalized as its source's inputs were."""
        cfg, dist = self.cfg, self.dist
        if not dist.is_main:
            dist.barrier()  # rank 0 downloads, extracts or decodes first; the others read its files or cache
        data = load_dataset(cfg.data, self.data_dir, device=self.device)
        if dist.is_main:
            dist.barrier()
        if self.source is not None:
            check_size(self.source, data, cfg)
        if cfg.init_from:
            data = normalized_like(data, self.resumed_from or self.source.checkpoint,
                                   resumed=self.resumed_from is not None)
        return data

    def _split_record(self, val_mask: torch.Tensor | None) -> dict:
        """The split record (counts and digests per side), with a fine-tuning run's source images."""
        data = self.data
        split = split_record(data.train_ids, data.train_images, val_mask, data.test_ids, data.test_images,
                             data.excluded.record() if data.excluded is not None else None)
        if self.cfg.init_from:  # and the images the source model trained on (finetune.py)
            split = with_source_images(split, self.resumed_from or self.source.checkpoint,
                                       resumed=self.resumed_from is not None)
        return split

    def _loaders(self, train_x: torch.Tensor, train_y: torch.Tensor, held_out: tuple | None, test: bool
                 ) -> tuple[Loader, Loader | None, Loader | None]:
        """The train, validation and (with `test`) test loaders, each rank on its shard."""
        cfg, dist, data, device = self.cfg, self.dist, self.data, self.device
        if 0 < len(train_x) % cfg.batch_size < dist.world_size:
            raise ConfigError(f"config key 'batch_size': the last batch of each epoch would hold "
                              f"{len(train_x) % cfg.batch_size} images, fewer than the {dist.world_size} "
                              f"processes")
        train = train_loader(cfg, train_x, train_y, data, device, dist)
        val = eval_loader(cfg, *held_out, data, device, dist) if held_out else None
        tested = None
        if test:  # the test images evaluate counts too: none the model trains on
            tested = eval_loader(cfg, *untrained_test(data, self.split_change), data, device, dist)
        return train, val, tested

    def _start_from_source(self) -> dict | None:
        """Fine-tuning: the source's weights loaded (and with `finetune: head` the body frozen); what the
        checkpoint records of the source."""
        origin = None
        if self.source is not None:
            origin = start_from(self.model, self.source, self.classes, self.cfg, self.dist.is_main)
        if self.cfg.init_from and self.cfg.finetune == "head":
            freeze_body(self.model)
        return origin

    def _restore(self, checkpoint: dict) -> None:
        """Continue from `checkpoint`: weights and averages, optimizer, RNG, progress and position."""
        if list(checkpoint["classes"]) != list(self.classes):
            raise UserError(f"{self.run_dir}: the dataset's classes changed since the run was trained "
                            f"({len(checkpoint['classes'])} then, {len(self.classes)} now): restore the "
                            f"dataset as it was, or start a new run")
        self.averages.restore(checkpoint)
        saved, ours = checkpoint["config"]["optimizer"]["name"], self.cfg.optimizer.name
        if saved != ours:  # the saved state (momentum buffers, moments) is another optimizer's
            raise ConfigError(f"config key 'optimizer.name': {self.run_dir} was trained with {saved}, "
                              f"whose state cannot continue as {ours}: resume with optimizer.name={saved}, "
                              f"or start a new run with init_from={self.run_dir}")
        # the saved state under this config's hyperparameters
        load_optimizer_state(self.step.optimizer, checkpoint["optimizer_state"])
        self.changed = changed_settings(checkpoint["config"], self.configured.to_dict())
        restore_rng(checkpoint, self.device, self.dist)
        self.state.update({k: checkpoint[k] for k in RESUMED_KEYS})
        self.state["init_from"] = checkpoint.get("init_from")
        self.start = EpochStart.start_from(checkpoint, self.dist)
        self.last_good = self._checkpoint_note(self.state["epoch"], self.start.step)

    @property
    def finished(self) -> bool:
        return self.state["stopped_early"] or self.state["epoch"] >= self.cfg.epochs

    # -- the run ---------------------------------------------------------------------------------------------

    def run(self, on_epoch_end: Callable[[dict], bool] | None = None) -> dict:
        """Train the remaining epochs; returns the state of the last checkpoint."""
        if self.finished:
            if self.dist.is_main:
                print(f"{self.run_dir}: training already finished after {self.state['epoch']} epochs; "
                      f"nothing to do")
            return self.state
        self._warm_up()
        # On resume, drop events an interrupted run logged after its last checkpoint.
        purge_step = self.state["epoch"] * self.steps_per_epoch + self.start.step if self.resume else None
        self.folder.open_outputs(self.configured, self.device, self.settings, self.state["epoch"] + 1,
                                 purge_step)
        self._announce()
        sync(self.device)
        self.session_started, self.seconds_before = time.perf_counter(), self.state["train_seconds"]
        try:
            with self.stop:
                for epoch in range(self.state["epoch"], self.cfg.epochs):
                    started = time.perf_counter()
                    totals = train_epoch(epoch, self.cfg, self.step, self.train_loader, self.averages,
                                         start=self.start, check_in=self._check_in,
                                         show_progress=self.dist.is_main)
                    self.start = EpochStart()
                    if self._end_epoch(epoch, totals, started, on_epoch_end):
                        break
            if self.test_loader is not None:
                self._test_best()
            self._calibrate()
        finally:
            self.folder.writer.close()
            self.checkpoint_writer.close()
        self.folder.farewell(self.state, self.val_loader is not None, self.test_loader is not None,
                             self.split_change)
        return self.state

    def _warm_up(self) -> None:
        """Compile, autotune and capture CUDA graphs before the clock starts (compiling, or on one GPU)."""
        if not (self.cfg.compile or self.step.use_graphs):
            return
        started = time.perf_counter()
        evaluated = [loader for loader in (self.val_loader, self.test_loader) if loader is not None]
        epochs = range(self.state["epoch"], self.cfg.epochs)
        warm_up(self.step, self.train_loader, evaluated, self.settings, epochs)
        sync(self.device)
        if self.dist.is_main:
            work = ", ".join(name for name, done in (("torch.compile", self.cfg.compile),
                                                     ("cuDNN autotuning and CUDA graph capture",
                                                      self.step.use_graphs)) if done)
            print(f"warm-up before the clock ({work}): {time.perf_counter() - started:.1f}s")

    def _announce(self) -> None:
        self.folder.announce(self.cfg, self.device, self.settings, self.data.name, self.train_loader,
                             self.val_loader, self.split, self.split_change)
        raised = self.budget.banner(len(self.train_loader.images))
        if raised and self.dist.is_main:
            print(raised)
        if self.dist.is_main:
            for line in class_lines(self.classes, self.class_counts, self.monitor, self.monitor_why,
                                    self.cfg.data.balance, self.val_loader is not None):
                print(line)
        if self.resumed_from is not None and self.dist.is_main:
            where = _position(self.state["epoch"], self.start.step)
            print(f"resuming from {self.run_dir / 'last.pt'} {where}"
                  + (f"; changed since: {', '.join(self.changed)}" if self.changed else ""))

    def _test_best(self) -> None:
        """With --test, however the run ended: the test accuracy of the model the run keeps (best.pt: the best
        validation accuracy, or the last epoch without a validation set), recorded in the state,
        metrics.jsonl's last line and test.json, and printed last by the farewell."""
        self.checkpoint_writer.wait()
        weights = self.best_weights
        if weights is None:  # a resumed run whose best epoch came before the resume
            weights = load_checkpoint(self.run_dir / "best.pt")["model_state"]
        current = to_cpu(self.model.state_dict())
        self.model.load_state_dict(weights)
        self.dist.share_buffers(self.model)
        loss, acc, count, matrix = evaluate_split(self.step.forward, self.test_loader, self.dist, "test",
                                                  self.settings)
        self.model.load_state_dict(current)
        scores = classification_metrics(matrix)
        result = {"test_loss": loss, "test_acc": acc, "test_images": count, "checkpoint": "best.pt",
                  "epoch": self.state["best_epoch"], "tta": self.cfg.tta,
                  "precision": self.settings.precision, "test_balanced_acc": scores["balanced_accuracy"],
                  "test_macro_f1": scores["macro_f1"], "monitor": self.monitor,
                  "test_per_class": per_class_rows(self.classes, scores),
                  "class_counts": {**self.class_counts, "test": scores["support"]}}  # test: those counted
        self.state["test"] = result
        self.folder.record_test(result, self.state["history"], self.state["epoch"] * self.steps_per_epoch)

    def _calibrate(self) -> None:
        """With `calibrate`, once the run ends: the temperature of the model the run keeps (best.pt), fitted
        on the validation split with the run's TTA (`base.calibration`), stored in best.pt and in last.pt when
        it holds the same model. Each rank runs its validation shard; rank 0 fits and writes."""
        if not self.cfg.calibrate:
            return
        if self.val_loader is None:
            if self.dist.is_main:
                print("calibration: none: the run has no validation split (data.val_size=0) to fit a "
                      "temperature on, so its probabilities stay uncalibrated (plain softmax)")
            return
        self.checkpoint_writer.wait()
        self.dist.barrier()  # rank 0 has written best.pt before any rank reads it
        weights = self.best_weights or load_checkpoint(self.run_dir / "best.pt")["model_state"]
        current = to_cpu(self.model.state_dict())
        self.model.load_state_dict(weights)
        self.dist.share_buffers(self.model)
        logits, labels = predict_logits(self.step.forward, self.val_loader, self.settings,
                                        "calibration" if self.dist.is_main else None)
        self.model.load_state_dict(current)
        shards = self.dist.gather((logits.cpu(), labels.cpu()))
        if not self.dist.is_main:
            return
        record = calibration_record(torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards]),
                                    self.settings.tta)
        store_calibration(self.run_dir / "best.pt", record)
        if self.state["best_epoch"] == self.state["epoch"]:  # last.pt holds the same model
            store_calibration(self.run_dir / "last.pt", record)
        self.state["calibration"] = record
        print(describe_calibration(record))

    # -- checking in during an epoch -------------------------------------------------------------------------

    def _check_in(self, epoch: int, done: int, loss: torch.Tensor, totals: EpochTotals, progress: Progress,
                  order: torch.Tensor) -> None:
        """After `done` steps of epoch `epoch`, at a logging interval, a due mid-epoch checkpoint or a signal:
        stop on a NaN, log progress, save a mid-epoch checkpoint when one is due or a signal came, and stop
        after saving on a signal (every rank takes the same branch)."""
        cfg, global_step = self.cfg, epoch * self.steps_per_epoch + done
        at_log = done % cfg.log_every == 0 or done == self.steps_per_epoch
        at_checkpoint = (cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0
                         and done < self.steps_per_epoch)
        # The ranks must agree on stopping, so under torchrun they compare notes at logging intervals.
        if not (at_log or at_checkpoint or (self.stop.requested and not self.dist.active)):
            return
        stopping, diverged = self.dist.any(self.stop.requested, not totals.finite())
        if diverged:
            progress.close()
            self.checkpoint_writer.wait()
            self.dist.barrier()
            raise DivergedError(
                f"training diverged: the loss or gradient norm is NaN or infinite by epoch {epoch + 1}, step "
                f"{done} (checked every log_every={cfg.log_every} steps); {self.last_good}, and best.pt is "
                f"unchanged. Lower optimizer.lr, or resume with --resume {self.run_dir} optimizer.lr=...")
        if at_log and not self.estimated:
            self._estimate_time(global_step)
        if at_log and self.dist.is_main:
            self.folder.writer.add_scalar("Loss/train_step", loss.item(), global_step)
            seen = totals.seen.item()
            progress.show(done, loss=f"{totals.loss.item() / seen:.4f}",
                          acc=f"{totals.correct.item() / seen:.2%}")
        if done < self.steps_per_epoch and (at_checkpoint or stopping):
            self._save(epoch, done, totals, order, best=False)
            if stopping:
                progress.close()
                raise self._interrupted(epoch, done)

    def _estimate_time(self, global_step: int) -> None:
        """Once per session on a CPU: when the rest of the run looks longer than LONG_RUN_SECONDS, say how
        long, and how to get a good model in minutes instead. Timed from the first logging interval to the
        second: the first steps of a process are several times slower (oneDNN picks and builds its kernels).
        """
        now = time.perf_counter()
        if self.estimate_start is None:
            self.estimate_start = (now, global_step)
            return
        self.estimated = True
        started, first_step = self.estimate_start
        remaining = (self.total_steps - global_step) * (now - started) / (global_step - first_step)
        if remaining < LONG_RUN_SECONDS or not self.dist.is_main:
            return
        hint = "" if self.cfg.model == QUICK_MODEL else (
            "; `cifarcnn train --preset quick` trains one in minutes")
        tqdm.write(f"estimated time on this CPU: about {remaining / 60:.0f} more minutes for "
                   f"{self.cfg.epochs} epochs (timed over steps {first_step + 1}-{global_step}){hint}")

    # -- the end of an epoch ---------------------------------------------------------------------------------

    def _end_epoch(self, epoch: int, totals: EpochTotals, started: float,
                   on_epoch_end: Callable[[dict], bool] | None) -> bool:
        """Validate, track the best model, save, log; whether the run stops here (early stopping or
        `on_epoch_end`); raises `Interrupted` when a signal came during the epoch."""
        metrics = self._epoch_metrics(epoch, totals, started)
        improved = self._track_best(metrics)
        if improved and self.test_loader is not None:  # kept on every rank for the test when the run ends
            with self.averages.applied():
                self.best_weights = to_cpu(self.model.state_dict())
        self._save(epoch + 1, 0, None, None, best=improved)
        self.folder.log_epoch(metrics, (epoch + 1) * self.steps_per_epoch)
        if self.dist.is_main:
            best = "  *best*" if improved and self.val_loader is not None else ""
            tqdm.write(_summary(self.cfg, metrics, self.monitor == "balanced_accuracy") + best)
        if self.state["stopped_early"]:
            if self.dist.is_main:
                tqdm.write(f"early stopping: no validation improvement for {self.cfg.patience} epochs "
                           f"(best {best_text(self.state)} at epoch {self.state['best_epoch']})")
            return True
        if on_epoch_end is not None:
            self.checkpoint_writer.wait()
            if on_epoch_end(metrics):
                return True
        if epoch + 1 < self.cfg.epochs and self.dist.any(self.stop.requested)[0]:
            raise self._interrupted(epoch + 1, 0)
        return False

    def _epoch_metrics(self, epoch: int, totals: EpochTotals, started: float) -> dict:
        """The epoch's training sums over all ranks, validation results and seconds; appended to the
        history."""
        cfg = self.cfg
        if epoch + 1 == cfg.epochs:
            self.averages.finish(learning_rate(cfg, cfg.epochs) / cfg.optimizer.lr)
        sums = totals.global_sums(self.dist)
        seen = sums["seen"].item()
        metrics = {"epoch": epoch + 1, "train_loss": sums["loss"].item() / seen,
                   "train_acc": sums["correct"].item() / seen, "train_images": seen, "val_loss": None,
                   "val_acc": None, "val_balanced_acc": None, "val_images": None,
                   "lr": learning_rate(cfg, epoch),
                   "grad_norm": sums["grad_norm"].item() / self.steps_per_epoch}
        with self.averages.applied():  # the model a run saves
            self.dist.share_buffers(self.model)  # every rank evaluates (and rank 0 saves) the same model
            if self.val_loader is not None:
                metrics["val_loss"], metrics["val_acc"], metrics["val_images"], matrix = evaluate_split(
                    self.step.forward, self.val_loader, self.dist, f"epoch {epoch + 1}/{cfg.epochs} val",
                    self.settings)
                metrics["val_balanced_acc"] = classification_metrics(matrix)["balanced_accuracy"]
        sync(self.device)
        metrics["seconds"] = time.perf_counter() - started
        self.state["history"].append(metrics)
        self.state["epoch"] = epoch + 1
        return metrics

    def _track_best(self, metrics: dict) -> bool:
        """Whether this epoch's model is the best so far by the monitored metric; updates the early-stopping
        count."""
        return track_best(self.state, metrics, self.monitor, self.cfg.patience, self.val_loader is not None)

    # -- checkpoints and stopping ----------------------------------------------------------------------------

    def _save(self, epoch_done: int, steps_done: int, totals: EpochTotals | None, order: torch.Tensor | None,
              best: bool) -> None:
        """Checkpoint after `steps_done` steps of epoch `epoch_done` + 1 (0: at the end of epoch
        `epoch_done`). Collective under torchrun: every rank calls it, rank 0 writes (on a background thread).
        """
        rng = self.dist.gather(rng_state(self.device))
        sums = self.dist.gather(to_cpu(totals.local())) if totals is not None else None
        if not self.dist.is_main:
            return
        state = self.state
        state["train_seconds"] = self.seconds_before + time.perf_counter() - self.session_started
        state.update(self.averages.saved())
        state.update(config=self.configured.to_dict(),
                     optimizer_state=self.step.optimizer.state_dict(), rng=rng[0],
                     rng_ranks=rng if self.dist.active else [],
                     lookahead=self.averages.saved_lookahead(),
                     step=steps_done, order=order, totals=sums)
        self.checkpoint_writer.write(self.run_dir, state, best=best)
        self.last_good = self._checkpoint_note(epoch_done, steps_done)

    def _checkpoint_note(self, epoch_done: int, steps_done: int) -> str:
        return f"the last good checkpoint is {self.run_dir / 'last.pt'} ({_position(epoch_done, steps_done)})"

    def _interrupted(self, epoch_done: int, steps_done: int) -> Interrupted:
        """The error that ends a run stopped by a signal, once its checkpoint is on disk."""
        self.checkpoint_writer.wait()
        self.dist.barrier()  # every rank stops here; none tears down while rank 0 still writes
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal"
        command = resume_command(self.run_dir, self.data_dir, self.device_arg, self.dist.active)
        return Interrupted(f"interrupted by {name} {_position(epoch_done, steps_done)}; saved "
                           f"{self.run_dir / 'last.pt'}; resume with: {command}",
                           self.stop.signum or signal.SIGTERM)


def changed_settings(before: dict, after: dict) -> list[str]:
    """`key old -> new` for each config key whose value differs between two `Config.to_dict()`s."""
    old, new = flat_keys(before), flat_keys(after)
    return [f"{key} {old.get(key)} -> {value}" for key, value in new.items() if old.get(key) != value]


def _position(epoch_done: int, steps_done: int) -> str:
    if steps_done:
        return f"at epoch {epoch_done + 1}, step {steps_done}"
    return f"at the end of epoch {epoch_done}" if epoch_done else "before the first epoch"


def _summary(cfg: Config, m: dict, balanced: bool = False) -> str:
    line = f"epoch {m['epoch']:>3}/{cfg.epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%}"
    if m["val_acc"] is not None:
        line += f"  val loss {m['val_loss']:.4f} acc {m['val_acc']:.2%}"
        if balanced:
            line += f" bal {m['val_balanced_acc']:.2%}"
    if "test_acc" in m:
        line += f"  test acc {m['test_acc']:.2%}"
    return line + f"  lr {m['lr']:.2e}  {m['seconds']:.1f}s"


def resume_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The config a run was trained with (from its last checkpoint), with overrides on top."""
    checkpoint = load_checkpoint(Path(run_dir) / "last.pt")
    return make_config(checkpoint["config"], overrides)
