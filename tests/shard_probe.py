"""`torchrun ... tests/shard_probe.py OUT_DIR train ARGS...` runs `python -m cifarcnn train ARGS...` with each
rank recording, as uint8 images, what the trainer handed its training step (per epoch) and each evaluation,
saved to OUT_DIR/rank<RANK>.pt: the shards a rank actually worked on. Run with augmentation off, so the images
are exact."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

from cifarcnn.cli import main
from cifarcnn.data.dataset import denormalize
from cifarcnn.training import train as train_module
from cifarcnn.training.step import TrainStep

SEEN: dict[str, list[torch.Tensor]] = defaultdict(list)


def as_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (denormalize(x.float(), mean, std) * 255).round().to(torch.uint8).contiguous()


def record_steps() -> None:
    original_epoch, original_step = train_module.train_epoch, TrainStep.__call__
    current: dict = {}  # the epoch under way: its key and its loader

    def train_epoch(epoch, cfg, step, loader, *args, **kwargs):
        current.update(key=f"train epoch {epoch + 1}", loader=loader)
        try:
            return original_epoch(epoch, cfg, step, loader, *args, **kwargs)
        finally:
            current.clear()

    def step(self, x: torch.Tensor, y: torch.Tensor):
        if current:
            SEEN[current["key"]].append(as_uint8(x, current["loader"].mean, current["loader"].std))
        return original_step(self, x, y)

    train_module.train_epoch = train_epoch
    TrainStep.__call__ = step


def record_evaluations() -> None:
    original = train_module.evaluate_split

    def evaluate(model, loader, dist, desc, *args, **kwargs):
        SEEN[str(desc)].extend(as_uint8(x, loader.mean, loader.std) for x, _ in loader)
        return original(model, loader, dist, desc, *args, **kwargs)

    train_module.evaluate_split = evaluate


if __name__ == "__main__":
    out = Path(sys.argv[1])
    record_steps()
    record_evaluations()
    code = main(sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.cat(v) for k, v in SEEN.items()}, out / f"rank{os.environ['RANK']}.pt")
    sys.exit(code)
