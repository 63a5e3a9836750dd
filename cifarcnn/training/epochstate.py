"""Where a run stands inside an epoch: the running sums and RNG states that a mid-epoch checkpoint carries, so
a resumed epoch ends with the same metrics as an uninterrupted one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import Dist


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch begins: at its first step, in the order its seed gives, with zero sums; or where a
    mid-epoch checkpoint left it (`start_from`)."""

    step: int = 0
    order: torch.Tensor | None = None  # the epoch's permutation of the training images
    totals: dict | None = None  # this rank's running sums so far (EpochTotals)

    @staticmethod
    def start_from(checkpoint: dict, dist: Dist) -> EpochStart:
        """The position a checkpoint saved: mid-epoch, or the start of the epoch after its last one."""
        step = checkpoint.get("step", 0)
        return EpochStart(step, checkpoint.get("order"), saved_totals(checkpoint, dist) if step else None)


class EpochTotals:
    """Running sums of an epoch, kept on the device and read only at logging intervals and checkpoints: loss x
    images, correct predictions, images seen, gradient norms. Under torchrun each rank sums its own shard."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = torch.zeros((), device=device, dtype=torch.long)
        self.grad_norm = torch.zeros((), device=device)
        for name, value in (saved or {}).items():
            getattr(self, name).copy_(value)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        self.grad_norm += grad_norm

    def finite(self) -> bool:
        return bool(torch.isfinite(self.loss) & torch.isfinite(self.grad_norm))

    def global_sums(self, dist: Dist) -> dict:
        """Loss, correct and seen summed over all ranks (copies); the gradient norm is the same on every rank
        (measured on the all-reduced gradients)."""
        sums = {"loss": self.loss.clone(), "correct": self.correct.clone(), "seen": self.seen.clone()}
        dist.sum_(*sums.values())
        return {**sums, "grad_norm": self.grad_norm.clone()}

    def local(self) -> dict:
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "grad_norm": self.grad_norm}


def saved_totals(checkpoint: dict | None, dist: Dist) -> dict | None:
    """This rank's share of a mid-epoch checkpoint's sums (one entry per rank): its own with the same number
    of processes, else rank 0 carries the old ranks' sums and the others start from zero."""
    saved = (checkpoint or {}).get("totals")
    if not saved:
        return None
    if len(saved) == dist.world_size:
        return saved[dist.rank]
    grad_norm = {"grad_norm": saved[0]["grad_norm"]}
    if not dist.is_main:
        return grad_norm
    return {**{k: sum(s[k] for s in saved) for k in ("loss", "correct", "seen")}, **grad_norm}


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(checkpoint: dict, device: torch.device, dist: Dist) -> None:
    ranks = checkpoint.get("rng_ranks") or []
    state = ranks[dist.rank] if len(ranks) == dist.world_size else checkpoint["rng"]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
