"""One epoch of training, the place to start reading: batches in; for each, the learning rates, the step
(forward, loss, backward, optimizer), the weight averages and the running totals; then a check-in with the
trainer.

Distributed training, precision, CUDA graphs and fine-tuning stay behind the objects it calls: the Loader
serves this rank's shard, the TrainStep runs the step as it must on this device, and the check-in (train.py)
decides when to log, save or stop."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..base.config import Config
from ..base.progress import Progress
from ..data.loader import Loader
from .averages import Averages
from .epochstate import EpochStart, EpochTotals
from .optimizers import frozen_at, trains_in
from .schedule import learning_rate
from .step import TrainStep

# check_in(epoch, steps done, the last loss, the running totals, the progress bar, the epoch's order)
CheckIn = Callable[[int, int, torch.Tensor, EpochTotals, Progress, torch.Tensor], None]


def train_epoch(epoch: int, cfg: Config, step: TrainStep, loader: Loader, averages: Averages, *,
                start: EpochStart, check_in: CheckIn, show_progress: bool = True) -> EpochTotals:
    """Train epoch `epoch` (0-based) from `start` (a mid-epoch checkpoint's position, or its first step);
    returns the epoch's running totals (this rank's)."""
    steps_per_epoch = len(loader)
    step.set_train_mode()
    order = start.order if start.order is not None else loader.order(epoch)
    step.freeze(frozen_at(step.optimizer, epoch))  # no gradient for parameters whose epochs are over
    totals = EpochTotals(step.device, start.totals)
    batches = Progress(loader.epoch(epoch, start.step, order), total=steps_per_epoch, initial=start.step,
                       desc=f"epoch {epoch + 1}/{cfg.epochs} train", refresh_every=cfg.log_every,
                       enabled=show_progress)
    try:
        for i, (x, y) in enumerate(batches, start=start.step):
            lr = learning_rate(cfg, epoch + i / steps_per_epoch)
            for group in step.optimizer.param_groups:  # each group at its scale; 0 once its epochs are over
                step.set_lr(group, lr * group["lr_scale"] if trains_in(group, epoch) else 0.0)
            loss, logits, grad_norm = step(x, y)  # forward, loss, backward, optimizer step
            averages.after_step(epoch * steps_per_epoch + i + 1, lr / cfg.optimizer.lr)
            totals.add(loss, logits, y, grad_norm)
            check_in(epoch, i + 1, loss, totals, batches, order)
    finally:
        batches.close()
    return totals
