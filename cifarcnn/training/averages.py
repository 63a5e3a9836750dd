"""Weight averages kept beside the trained weights: lookahead (`optimizer.lookahead_steps`), which pulls the
model back to its running average every few steps, and the exponential moving average (`ema_decay`), which a
run validates, tests and saves in place of the trained weights. `Averages` holds a run's (either, both or
none)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..base.config import Config


def _live_and_average(model: nn.Module) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The model's floating-point tensors (parameters and buffers, sharing the model's storage) and a copy of
    each by name, where an average starts."""
    live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    return list(live.values()), {k: v.detach().clone() for k, v in live.items()}


class Lookahead:
    """Every `every` steps the running average of the weights moves toward the model and the model is reset
    to it (Zhang et al. 2019; the cubic decay schedule of Jordan 2024). At the end the model takes the
    average."""

    def __init__(self, model: nn.Module, every: int):
        self.every = every
        self._live, self.average = _live_and_average(model)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        average = list(self.average.values())
        torch._foreach_lerp_(average, self._live, 1 - decay)
        torch._foreach_copy_(self._live, average)

    def maybe_update(self, step: int, total_steps: int) -> None:
        if step % self.every == 0:
            self.update(0.95**self.every * (step / total_steps) ** 3)


class WeightAverage:
    """An exponential moving average of the model's weights and BatchNorm statistics, updated after every step
    (`ema_decay`); with a decay proportional to the learning rate it meets the trained weights as the rate
    falls to 0."""

    def __init__(self, model: nn.Module, decay: float):
        self._live, self.average = _live_and_average(model)
        self.decay = decay

    @torch.no_grad()
    def update(self, lr_fraction: float) -> None:
        """One step with decay `decay` x `lr_fraction` (the learning rate over its peak)."""
        torch._foreach_lerp_(list(self.average.values()), self._live, 1 - self.decay * lr_fraction)

    def state_dict(self, model: nn.Module) -> dict:
        """The model's state dict with the averaged tensors in place of the trained ones."""
        return {k: self.average.get(k, v) for k, v in model.state_dict().items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the model holds the average (copied in place, so CUDA graphs stay valid); the trained
        weights are put back afterwards."""
        with torch.no_grad():
            trained = [t.clone() for t in self._live]
            torch._foreach_copy_(self._live, list(self.average.values()))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, trained)


class Averages:
    """A run's weight averages, each present only when its config key is set: `lookahead`
    (optimizer.lookahead_steps) and `ema` (ema_decay). Checkpoints hold the EMA as `model_state` (the trained
    weights then as `train_model_state`) and the lookahead average as `lookahead`."""

    def __init__(self, model: nn.Module, cfg: Config, total_steps: int):
        self.model, self.total_steps = model, total_steps
        steps = cfg.optimizer.lookahead_steps
        self.lookahead = Lookahead(model, steps) if steps else None
        self.ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None

    def after_step(self, step: int, lr_fraction: float) -> None:
        """After global step `step` (1-based) at `lr_fraction` of the peak learning rate."""
        if self.lookahead is not None:
            self.lookahead.maybe_update(step, self.total_steps)
        if self.ema is not None:
            self.ema.update(lr_fraction)

    def finish(self, lr_fraction: float) -> None:
        """At the end of the last epoch: the model takes the lookahead average, and the EMA one more step
        toward it (at `lr_fraction`, the schedule's last)."""
        if self.lookahead is None:
            return
        self.lookahead.update(1.0)
        if self.ema is not None:
            self.ema.update(lr_fraction)

    def applied(self) -> contextlib.AbstractContextManager:
        """Inside, the model holds the weights a run evaluates and keeps: the EMA if any, else its own."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def saved(self) -> dict:
        """The checkpoint entries for the model's weights (averaged and trained)."""
        if self.ema is not None:
            return {"model_state": self.ema.state_dict(self.model),
                    "train_model_state": self.model.state_dict()}
        return {"model_state": self.model.state_dict()}

    def saved_lookahead(self) -> dict:
        return self.lookahead.average if self.lookahead is not None else {}

    def restore(self, checkpoint: dict) -> None:
        """The trained weights and the averages a checkpoint saved."""
        self.model.load_state_dict(checkpoint.get("train_model_state") or checkpoint["model_state"])
        if self.ema is not None:
            for name, value in checkpoint["model_state"].items():
                if name in self.ema.average:
                    self.ema.average[name].copy_(value)
        if self.lookahead is not None:
            for name, value in checkpoint["lookahead"].items():
                self.lookahead.average[name].copy_(value)
