"""The training loop: optimiser, schedule, validation, early stopping, checkpoints, resume and TensorBoard.

Fast path: data and augmentation on the device, channels_last, bf16 autocast on CUDA, fused optimisers on
CUDA, cuDNN autotuning, the step replayed as a CUDA graph on one GPU, optional torch.compile (compilation,
autotuning and graph capture happen in a warm-up before the clock starts), running metrics kept on the device
and read once per logging interval, checkpoints written by a background thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .config import Config, make_config, save_config
from .data import Loader, load_cifar10, normalize_, training_split
from .distributed import Dist
from .distributed import setup as setup_distributed
from .environment import record_session
from .epochstate import EpochTotals, restore_rng, rng_state, saved_totals
from .errors import ConfigError, UsageError, UserError
from .evaluate import autocast, evaluate_split, tta_logits
from .interrupt import Interrupted, StopRequest, resume_command
from .model import build_model
from .runlock import RunLock
from .storage import atomic_write_text, ensure_writable_dir, remove_stale_temp_files

CHANNELS_LAST = torch.channels_last


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Parameter groups: BatchNorm parameters (lr x bias_lr_scale, decay / bias_lr_scale), the rest, and one
    group per parameter the model trains only for its first epochs (`model.train_epochs`, name -> epochs)."""
    o = cfg.optimizer
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    limited = getattr(model, "train_epochs", {})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for n, p in named if n not in limited]
    groups = [
        {"params": [p for p in trainable if id(p) not in norm_ids], "lr_scale": 1.0, "weight_decay": o.weight_decay,
         "until_epoch": None},
        {"params": [p for p in trainable if id(p) in norm_ids], "lr_scale": o.bias_lr_scale,
         "weight_decay": o.weight_decay / o.bias_lr_scale, "until_epoch": None},
    ]
    groups += [{"params": [p], "lr_scale": 1.0, "weight_decay": o.weight_decay, "until_epoch": limited[n]}
               for n, p in named if n in limited]
    cuda = device.type == "cuda"
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, fused=cuda or None)
    optimizer_class = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    # capturable: the step may be recorded in a CUDA graph (TrainStep)
    return optimizer_class(groups, lr=o.lr, fused=cuda or None, capturable=cuda)


def make_model(cfg: Config, num_classes: int, train_images: torch.Tensor, device: torch.device) -> nn.Module:
    """The configured model, seeded, initialised from training images where it needs them (FastNet's whitening
    uses the first 5,000), in channels_last on `device`."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes)
    if hasattr(model, "init_from_data"):
        model.init_from_data(normalize_(train_images[:5000].float() / 255))
    return model.to(device, memory_format=CHANNELS_LAST)


def learning_rate(cfg: Config, epoch_progress: float) -> float:
    """The learning rate after `epoch_progress` epochs (fractional); a pure function, so resume needs no state."""
    s, peak = cfg.scheduler, cfg.optimizer.lr
    if epoch_progress < s.warmup_epochs:
        return peak * (s.warmup_factor + (1 - s.warmup_factor) * epoch_progress / s.warmup_epochs)
    if s.name == "constant":
        return peak
    length = (s.epochs or cfg.epochs) - s.warmup_epochs
    t = min((epoch_progress - s.warmup_epochs) / length, 1.0) if length > 0 else 1.0
    shape = 1 - t if s.name == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return s.min_lr + (peak - s.min_lr) * shape


class Lookahead:
    """Every `every` steps the running average of the weights moves toward the model and the model is reset to
    it (Zhang et al. 2019; the cubic decay schedule of Jordan 2024). At the end the model takes the average."""

    def __init__(self, model: nn.Module, every: int):
        self.every = every
        live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self._live = list(live.values())  # share storage with the model's parameters and buffers
        self.average = {k: v.detach().clone() for k, v in live.items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        average = list(self.average.values())
        torch._foreach_lerp_(average, self._live, 1 - decay)
        torch._foreach_copy_(self._live, average)

    def maybe_update(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step % self.every == 0:
            self.update(model, 0.95**self.every * (step / total_steps) ** 3)


@contextlib.contextmanager
def restored_afterwards(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Warm-up steps run inside leave no trace: every model and optimizer tensor is put back in place (in place,
    so captured CUDA graphs keep valid addresses), and optimizer state the warm-up created is zeroed, which
    steps exactly like a fresh optimizer's (Adam: zero moments at step 0; SGD: a zero momentum buffer)."""
    tensors = [*model.state_dict().values(),
               *(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
    saved = [t.detach().clone() for t in tensors]
    fresh = not optimizer.state
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)
            if fresh:
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.zero_()


class TrainStep:
    """One optimisation step on a batch; returns (loss, logits, gradient norm), all left on the device.

    On a single CUDA device, each batch shape's step (forward, backward, gradient norm, optimizer; compiled or
    not) is captured once as a CUDA graph and replayed: for small models the GPU otherwise waits on hundreds of
    kernel launches per step. The outputs of a replayed step are overwritten by the next one.
    Learning rates then live in device tensors: set them with `set_lr`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.forward = torch.compile(model) if cfg.compile else model
        self.label_smoothing = cfg.label_smoothing
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.use_graphs = device.type == "cuda" and not self.distributed
        self.graphs: dict[tuple, tuple] = {}

    def freeze(self, frozen: list[nn.Parameter]) -> None:
        """Compute no gradient for `frozen` (the other parameters train), which also skips the backward only they
        need: for FastNet's whitening bias, the first conv block's input gradient (3.8% of a step's FLOPs).
        Under DistributedDataParallel, which waits for every parameter's gradient, this does nothing; the
        trainer gives frozen parameters learning rate 0 either way."""
        if self.distributed:
            return
        frozen_ids = {id(p) for p in frozen}
        for p in self.params:
            p.requires_grad_(id(p) not in frozen_ids)

    def set_lr(self, group: dict, lr: float) -> None:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr

    def _step(self, x: torch.Tensor, y: torch.Tensor, cache: bool = True):
        with autocast(self.device, cache):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Measured on the fresh gradients, before the step (the original workflow read stale ones).
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        return loss.detach(), logits.detach(), grad_norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._step(x, y)
        key = (tuple(x.shape), x.stride(), tuple(p.requires_grad for p in self.params))
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(x, y)
            except Exception as e:  # an op or optimizer that cannot be captured: run eagerly instead
                print(f"CUDA graph capture failed, continuing without graphs ({str(e).splitlines()[0]})")
                self.use_graphs = False
                for group in self.optimizer.param_groups:
                    group["lr"] = float(group["lr"])
                return self._step(x, y)
        graph, static_x, static_y, outputs, _ = self.graphs[key]
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return outputs

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """Warm up on a side stream (as CUDA graph capture requires), put every tensor the warm-up changed
        back in place, then record one step."""
        # Every graph reads the learning rates from the same device tensors, created once and kept alive here:
        # a graph holds raw addresses, and a replaced tensor's memory would be reused for something else.
        for group in self.optimizer.param_groups:
            if not (isinstance(group["lr"], torch.Tensor) and group["lr"].is_cuda):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        static_x, static_y = x.clone(), y.clone()
        with restored_afterwards(self.model, self.optimizer):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._step(static_x, static_y, cache=False)
            finally:
                torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._step(static_x, static_y, cache=False)
        return graph, static_x, static_y, outputs, [group["lr"] for group in self.optimizer.param_groups]


def trains_in(group: dict, epoch: int) -> bool:
    """Whether a parameter group still learns in epoch `epoch` (0-based): its `until_epoch`, if any, is not over."""
    return group["until_epoch"] is None or epoch < group["until_epoch"]


def frozen_at(optimizer: torch.optim.Optimizer, epoch: int) -> list[nn.Parameter]:
    """The parameters whose training epochs are over in epoch `epoch` (0-based)."""
    return [p for group in optimizer.param_groups if not trains_in(group, epoch) for p in group["params"]]


def warm_up(step: TrainStep, train_loader: Loader, eval_loaders: list[Loader], tta: int,
            epochs: range = range(1)) -> None:
    """Run every batch shape and set of frozen parameters that training over `epochs` and evaluation will meet
    (torch.compile compiles, cuDNN autotunes, CUDA graphs are captured), then restore the state, so this
    one-time work happens before the clock starts and does not change the run. Call it after any checkpoint is
    loaded: graphs hold the optimizer state's addresses."""
    model, training = step.model, step.model.training
    trainable = [p.requires_grad for p in step.params]
    phases = {tuple(map(id, frozen)): frozen for frozen in (frozen_at(step.optimizer, e) for e in epochs)}
    with restored_afterwards(model, step.optimizer):
        x, y = next(iter(train_loader))
        model.train()
        for frozen in phases.values():
            step.freeze(frozen)
            for size in _batch_sizes(train_loader):
                for _ in range(2):
                    step(x[:size], y[:size])
        model.eval()
        for loader in eval_loaders:
            x, _ = next(iter(loader))
            with torch.inference_mode(), autocast(loader.device):
                for size in _batch_sizes(loader):
                    tta_logits(step.forward, x[:size], tta)
    model.train(training)
    for p, requires_grad in zip(step.params, trainable):
        p.requires_grad_(requires_grad)


def _batch_sizes(loader: Loader) -> set[int]:
    """The full batch size and that of the last, partial batch."""
    return {loader.batch_size, len(loader.images) % loader.batch_size or loader.batch_size}


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    dist, torch_device = setup_distributed(device, cfg.sync_batchnorm)
    lock = RunLock(run_dir)
    try:
        state = _train(cfg, Path(run_dir), dist, torch_device, lock, data_dir=data_dir, device_arg=device,
                       resume=resume, test=test, on_epoch_end=on_epoch_end)
        dist.barrier()  # leave together: a rank tearing down its connections early can abort the others
        return state
    finally:
        lock.release()
        dist.close()


def _train(cfg: Config, run_dir: Path, dist: Dist, device: torch.device, lock: RunLock, *, data_dir, device_arg,
           resume: bool, test: bool, on_epoch_end) -> dict:
    from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

    if dist.is_main and run_dir.is_dir():
        lock.acquire()  # before reading last.pt: another process may be training there
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(run_dir / "last.pt")
    elif (run_dir / "last.pt").exists():
        raise UsageError(f"run folder {run_dir} already holds a run: continue it with --resume {run_dir}, "
                         f"or pick another --name")

    data = load_cifar10(data_dir)
    (train_x, train_y), held_out = training_split(data, cfg.data)
    val_x, val_y = held_out or (None, None)
    shard = {"rank": dist.rank, "world_size": dist.world_size}
    if 0 < len(train_x) % cfg.batch_size < dist.world_size:
        raise ConfigError(f"config key 'batch_size': the last batch of each epoch would hold "
                          f"{len(train_x) % cfg.batch_size} images, fewer than the {dist.world_size} processes")
    train_loader = Loader(train_x, train_y, cfg.batch_size, device=device, augment=cfg.augment, shuffle=True,
                          seed=cfg.seed, memory_format=CHANNELS_LAST, **shard)
    val_loader = val_x is not None and Loader(val_x, val_y, cfg.eval_batch_size, device=device,
                                              memory_format=CHANNELS_LAST, **shard)
    test_loader = test and Loader(data.test_images, data.test_labels, cfg.eval_batch_size, device=device,
                                  memory_format=CHANNELS_LAST, **shard)

    model = make_model(cfg, len(data.classes), train_x, device)
    trained = dist.wrap(model, cfg.sync_batchnorm)  # DistributedDataParallel under torchrun; shares parameters
    optimizer = build_optimizer(cfg, model, device)
    step = TrainStep(trained, optimizer, cfg, device)
    lookahead = Lookahead(model, cfg.optimizer.lookahead_steps) if cfg.optimizer.lookahead_steps else None
    state = {
        "format": FORMAT, "model": cfg.model, "num_classes": len(data.classes),
        "classes": list(data.classes), "epoch": 0, "best_val_acc": -1.0, "best_epoch": 0,
        "epochs_since_best": 0, "stopped_early": False, "history": [], "train_seconds": 0.0,
    }
    start_step, start_order = 0, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model_state"])
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        restore_rng(checkpoint, device, dist)
        if lookahead is not None:
            for name, value in checkpoint["lookahead"].items():
                lookahead.average[name].copy_(value)
        state.update({k: checkpoint[k] for k in ("epoch", "best_val_acc", "best_epoch", "epochs_since_best",
                                                 "stopped_early", "history", "train_seconds")})
        start_step, start_order = checkpoint.get("step", 0), checkpoint.get("order")
    if state["stopped_early"] or state["epoch"] >= cfg.epochs:
        if dist.is_main:
            print(f"{run_dir}: training already finished after {state['epoch']} epochs; nothing to do")
        return state

    if cfg.compile or step.use_graphs:
        started = time.perf_counter()
        warm_up(step, train_loader, [loader for loader in (val_loader, test_loader) if loader], cfg.tta,
                range(state["epoch"], cfg.epochs))
        _sync(device)
        if dist.is_main:
            work = ", ".join(name for name, done in (("torch.compile", cfg.compile),
                                                     ("cuDNN autotuning and CUDA graph capture", step.use_graphs))
                             if done)
            print(f"warm-up before the clock ({work}): {time.perf_counter() - started:.1f}s")
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    if dist.is_main:
        ensure_writable_dir(run_dir)  # an unwritable folder fails here, before any training
        if not lock.held:
            lock.acquire()
        remove_stale_temp_files(run_dir)  # from a killed run; the lock makes them surely no one else's
        save_config(cfg, run_dir / "config.yaml")
        record_session(run_dir, device, state["epoch"] + 1, dist.world_size)
        # On resume, drop events an interrupted run logged after its last checkpoint.
        writer = SummaryWriter(str(run_dir / "tensorboard"),
                               purge_step=state["epoch"] * steps_per_epoch + start_step if resume else None)
    else:
        writer = _NoWriter()
    checkpoints = CheckpointWriter(device)
    last_good = f"the last good checkpoint is {run_dir / 'last.pt'} ({_position(state['epoch'], start_step)})" \
        if checkpoint is not None else "no checkpoint was saved yet"
    val_desc = f"{len(val_x)} val" if val_x is not None else "no validation"
    processes = f", {dist.world_size} processes" if dist.active else ""
    if dist.is_main:
        print(f"training {cfg.model} on {device} for {cfg.epochs} epochs ({len(train_x)} train / {val_desc} "
              f"images, {steps_per_epoch} steps per epoch{processes}) -> {run_dir}")
    _sync(device)
    session_started, seconds_before = time.perf_counter(), state["train_seconds"]

    def save(epoch_done: int, steps_done: int, totals: EpochTotals | None, order: torch.Tensor | None,
             best: bool) -> None:
        """Checkpoint after `steps_done` steps of epoch `epoch_done` + 1 (0: at the end of epoch `epoch_done`).
        Collective under torchrun: every rank calls it, rank 0 writes."""
        nonlocal last_good
        rng = dist.gather(rng_state(device))
        sums = dist.gather(_to_cpu(totals.local())) if totals is not None else None
        if not dist.is_main:
            return
        state["train_seconds"] = seconds_before + time.perf_counter() - session_started
        state.update(config=cfg.to_dict(), model_state=model.state_dict(),
                     optimizer_state=optimizer.state_dict(), rng=rng[0], rng_ranks=rng if dist.active else [],
                     lookahead=lookahead.average if lookahead is not None else {},
                     step=steps_done, order=order, totals=sums)
        checkpoints.write(run_dir, state, best=best)
        last_good = f"the last good checkpoint is {run_dir / 'last.pt'} ({_position(epoch_done, steps_done)})"

    def interrupted(stop: StopRequest, epoch_done: int, steps_done: int) -> Interrupted:
        checkpoints.wait()
        dist.barrier()  # every rank stops here; none tears down while rank 0 still writes
        name = signal.Signals(stop.signum).name if stop.signum else "a signal"
        command = resume_command(run_dir, data_dir, device_arg, dist.active)
        return Interrupted(f"interrupted by {name} {_position(epoch_done, steps_done)}; saved "
                           f"{run_dir / 'last.pt'}; resume with: {command}", stop.signum or signal.SIGTERM)

    try:
        with StopRequest() as stop:
            for epoch in range(state["epoch"], cfg.epochs):
                started = time.perf_counter()
                model.train()
                lr_at_start = learning_rate(cfg, epoch)
                order = start_order if start_order is not None else train_loader.order(epoch)
                step.freeze(frozen_at(optimizer, epoch))
                totals = EpochTotals(device, saved_totals(checkpoint, dist) if start_step else None)
                # Refreshed every log_every batches (maxinterval: tqdm's monitor would otherwise lower miniters).
                bar = tqdm(train_loader.epoch(epoch, start_step, order), total=steps_per_epoch, initial=start_step,
                           leave=False, dynamic_ncols=True, miniters=cfg.log_every, mininterval=0,
                           maxinterval=float("inf"), desc=f"epoch {epoch + 1}/{cfg.epochs} train",
                           disable=not dist.is_main)
                for i, (x, y) in enumerate(bar, start=start_step):
                    lr = learning_rate(cfg, epoch + i / steps_per_epoch)
                    for group in optimizer.param_groups:
                        step.set_lr(group, lr * group["lr_scale"] if trains_in(group, epoch) else 0.0)
                    loss, logits, grad_norm = step(x, y)
                    done = i + 1
                    global_step = epoch * steps_per_epoch + done
                    if lookahead is not None:
                        lookahead.maybe_update(model, global_step, total_steps)
                    totals.add(loss, logits, y, grad_norm)
                    at_log = done % cfg.log_every == 0 or done == steps_per_epoch
                    at_checkpoint = (cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0
                                     and done < steps_per_epoch)
                    # The ranks must agree on stopping, so under torchrun they compare notes at logging intervals.
                    if not (at_log or at_checkpoint or (stop.requested and not dist.active)):
                        continue
                    stopping, diverged = dist.any(stop.requested, not totals.finite())
                    if diverged:
                        bar.close()
                        checkpoints.wait()
                        dist.barrier()
                        raise DivergedError(
                            f"training diverged: the loss or gradient norm is NaN or infinite by epoch {epoch + 1}, "
                            f"step {done} (checked every log_every={cfg.log_every} steps); {last_good}, and "
                            f"best.pt is unchanged. Lower optimizer.lr, or resume with --resume {run_dir} "
                            f"optimizer.lr=...")
                    if at_log and dist.is_main:
                        writer.add_scalar("Loss/train_step", loss.item(), global_step)
                        seen = totals.seen.item()
                        bar.set_postfix(loss=f"{totals.loss.item() / seen:.4f}",
                                        acc=f"{totals.correct.item() / seen:.2%}", refresh=False)
                    if done < steps_per_epoch and (at_checkpoint or stopping):
                        save(epoch, done, totals, order, best=False)
                        if stopping:
                            bar.close()
                            raise interrupted(stop, epoch, done)
                bar.close()
                start_step, start_order = 0, None
                last_epoch = epoch + 1 == cfg.epochs
                if lookahead is not None and last_epoch:
                    lookahead.update(model, 1.0)  # finish on the averaged weights
                sums = totals.global_sums(dist)
                seen = sums["seen"].item()
                metrics = {"epoch": epoch + 1, "train_loss": sums["loss"].item() / seen,
                           "train_acc": sums["correct"].item() / seen, "val_loss": None, "val_acc": None,
                           "lr": lr_at_start, "grad_norm": sums["grad_norm"].item() / steps_per_epoch}
                dist.share_buffers(model)  # every rank evaluates (and rank 0 saves) the same model
                if val_loader:
                    metrics["val_loss"], metrics["val_acc"] = evaluate_split(
                        step.forward, val_loader, dist, f"epoch {epoch + 1}/{cfg.epochs} val", cfg.tta)
                if test_loader and last_epoch:
                    _, metrics["test_acc"] = evaluate_split(step.forward, test_loader, dist, "test", cfg.tta)
                _sync(device)
                metrics["seconds"] = time.perf_counter() - started
                state["history"].append(metrics)
                state["epoch"] = epoch + 1
                if val_loader:
                    improved = metrics["val_acc"] > state["best_val_acc"]
                    if improved:
                        state.update(best_val_acc=metrics["val_acc"], best_epoch=epoch + 1, epochs_since_best=0)
                    else:
                        state["epochs_since_best"] += 1
                    state["stopped_early"] = bool(cfg.patience) and state["epochs_since_best"] >= cfg.patience
                else:  # without a validation set, the latest model counts as the best one
                    improved = True
                    state["best_epoch"] = epoch + 1
                save(epoch + 1, 0, None, None, best=improved)
                writer_step = (epoch + 1) * steps_per_epoch
                _log_epoch(writer, metrics, writer_step)
                if dist.is_main:
                    tqdm.write(_summary(cfg, metrics) + ("  *best*" if improved and val_loader else ""))
                if state["stopped_early"]:
                    if dist.is_main:
                        tqdm.write(f"early stopping: no validation improvement for {cfg.patience} epochs "
                                   f"(best {state['best_val_acc']:.2%} at epoch {state['best_epoch']})")
                    break
                if on_epoch_end is not None:
                    checkpoints.wait()
                    if on_epoch_end(metrics):
                        break
                if not last_epoch and dist.any(stop.requested)[0]:
                    raise interrupted(stop, epoch + 1, 0)
    finally:
        writer.close()
        checkpoints.close()
    if dist.is_main:
        if val_loader:
            print(f"best validation accuracy {state['best_val_acc']:.2%} at epoch {state['best_epoch']}; ",
                  end="")
        print(f"trained {state['train_seconds']:.1f}s; checkpoints in {run_dir} "
              f"(evaluate with: cifarcnn evaluate {run_dir})")
    return state


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
