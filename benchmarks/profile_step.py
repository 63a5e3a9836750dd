"""Where a preset's training step spends its time: torch.profiler over a few steps of the trainer's own
TrainStep (the preset's model, batch size, precision and optimizer) on random images, self time grouped by
kind of op, and the optimizer's step timed alone.

    python benchmarks/profile_step.py [--preset fast] [--steps 5] [--device cpu] [KEY=VALUE ...]

Self time is time on the calling thread, so on a CPU each op's share includes its intra-op threads' work.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cifarcnn.base.config import load_preset
from cifarcnn.base.device import keep_freed_memory, select_device
from cifarcnn.base.inference import settings_for
from cifarcnn.training.build import CHANNELS_LAST, make_model, make_step
from cifarcnn.training.step import sync

# op-name substring -> kind, first match wins (convolution first: its backward fills and copies too)
KINDS = [("convolution", "convolutions"), ("mm", "matmuls (Newton-Schulz, classifier)"),
         ("max_pool", "max-pool"), ("gelu", "GELU"), ("relu", "ReLU"), ("batch_norm", "BatchNorm"),
         ("copy", "copies and casts"), ("_to", "copies and casts"), ("fill", "fills"), ("zero", "fills")]


def kind_of(op: str) -> str:
    return next((kind for key, kind in KINDS if key in op), "everything else")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device")
    args = parser.parse_args()
    cfg = load_preset(args.preset, args.overrides)
    device = select_device(args.device)
    keep_freed_memory(device)  # owns its process, as cifarcnn does
    torch.manual_seed(0)
    images = torch.randint(0, 256, (max(cfg.batch_size, 5000), 3, 32, 32), dtype=torch.uint8)
    model = make_model(cfg, 10, images, device)
    step = make_step(cfg, model, device, settings_for(cfg.to_dict(), device).precision)
    optimizer = step.optimizer
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).contiguous(memory_format=CHANNELS_LAST)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    for _ in range(2):  # warm-up: oneDNN primitives, optimizer state
        step(x, y)
    sync(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(x, y)
        sync(device)
    step_seconds = (time.perf_counter() - started) / args.steps
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        kind = kind_of(event.key)
        shares[kind] = shares.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    started = time.perf_counter()
    for _ in range(args.steps):  # the optimizer alone, on the last step's gradients
        optimizer.step()
    sync(device)
    optimizer_seconds = (time.perf_counter() - started) / args.steps
    print(f"{args.preset} ({cfg.model}, batch {cfg.batch_size}, {step.precision}, {cfg.optimizer.name}) on "
          f"{device}: {step_seconds * 1000:.0f} ms per step under the profiler, "
          f"{cfg.batch_size / step_seconds:.0f} images/s")
    for kind, micros in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"  {kind:40s} {micros / total:6.1%}")
    print(f"  optimizer step alone: {optimizer_seconds * 1000:.1f} ms "
          f"({optimizer_seconds / step_seconds:.1%} of a step)")


if __name__ == "__main__":
    main()
