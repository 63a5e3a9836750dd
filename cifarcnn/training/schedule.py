"""The learning-rate schedule: warm-up, then constant, linear or cosine decay to `scheduler.min_lr`."""

from __future__ import annotations

import math

from ..base.config import Config


def learning_rate(cfg: Config, epoch_progress: float) -> float:
    """The learning rate after `epoch_progress` epochs (fractional); a pure function, so resume needs no
    state."""
    s, peak = cfg.scheduler, cfg.optimizer.lr
    if epoch_progress < s.warmup_epochs:
        return peak * (s.warmup_factor + (1 - s.warmup_factor) * epoch_progress / s.warmup_epochs)
    if s.name == "constant":
        return peak
    length = (s.epochs or cfg.epochs) - s.warmup_epochs
    t = min((epoch_progress - s.warmup_epochs) / length, 1.0) if length > 0 else 1.0
    shape = 1 - t if s.name == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return s.min_lr + (peak - s.min_lr) * shape
