"""The step budget (`min_steps`): on a dataset small enough that `epochs` x steps per epoch falls short of it,
the epochs are raised to reach it, and the parts of the schedule counted in epochs (warm-up, the decay length,
early-stopping patience, a parameter's training epochs) stretch by the same factor, so the schedule keeps its
shape. Lookahead and the weight average count steps, not epochs, and follow the longer run as they are."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..base.config import Config


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the budget did: the configured epochs, the epochs trained, and the budget they meet."""

    configured: int
    epochs: int
    steps_per_epoch: int
    min_steps: int

    @property
    def factor(self) -> float:
        return self.epochs / self.configured

    @property
    def raised(self) -> bool:
        return self.epochs != self.configured

    def banner(self, images: int) -> str | None:
        """The line a run starts with when its epochs were raised, else None."""
        if not self.raised:
            return None
        return (f"{images} training images: {self.configured} epochs raised to {self.epochs} for at least "
                f"{self.min_steps} steps (min_steps; min_steps=0 trains exactly the epochs)")

    def record(self) -> dict:
        """What a checkpoint keeps of it."""
        return dataclasses.asdict(self)


def fit_schedule(cfg: Config, steps_per_epoch: int) -> tuple[Config, Budget]:
    """`cfg` with its epochs raised to the fewest that make `cfg.min_steps` optimizer steps of
    `steps_per_epoch` (unchanged when it already makes that many), and the epoch-counted settings stretched
    alike; and what was done. A pure function of its arguments, so a resumed run gets the same schedule."""
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    budget = Budget(cfg.epochs, epochs, steps_per_epoch, cfg.min_steps)
    if not budget.raised:
        return cfg, budget
    factor, s = budget.factor, cfg.scheduler
    scheduler = dataclasses.replace(
        s, warmup_epochs=s.warmup_epochs * factor,
        epochs=None if s.epochs is None else math.ceil(s.epochs * factor))
    return dataclasses.replace(cfg, epochs=epochs, patience=math.ceil(cfg.patience * factor),
                               scheduler=scheduler), budget


def stretch_limited_epochs(optimizer: torch.optim.Optimizer, budget: Budget) -> None:
    """The parameter groups a model trains for its first epochs only (e.g. FastNet's whitening bias) train
    for the same share of the raised schedule."""
    for group in optimizer.param_groups:
        if group.get("until_epoch"):
            group["until_epoch"] = math.ceil(group["until_epoch"] * budget.factor)
