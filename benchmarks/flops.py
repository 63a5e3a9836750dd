"""FLOPs per training image of each registered model: forward and backward of the cross-entropy loss, counted
by torch.utils.flop_counter.FlopCounterMode on the CPU (matrix multiplies and convolutions; elementwise ops
are not counted).

    python benchmarks/flops.py [--batch 8] [--out flops.json]

Every trainable parameter gets its gradient, as in a training step; for FastNet-style models this includes the
whitening bias, frozen after its first epochs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cifarcnn.base.storage import atomic_write_json
from cifarcnn.models.registry import MODELS, build_model, count_parameters
from cifarcnn.reports.bench import train_flops_per_image


def training_flops(name: str, batch: int) -> dict:
    """Forward + backward FLOPs per image of model `name`, with its parameter count."""
    torch.manual_seed(0)
    model = build_model(name).train()
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(torch.randn(batch, 3, 32, 32))
    return {"model": name, "parameters": count_parameters(model)[0],
            # as `cifarcnn bench` counts them
            "train_gflops_per_image": train_flops_per_image(model, batch=batch) / 1e9,
            "forward_gflops_per_image": forward.get_total_flops() / batch / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [training_flops(name, args.batch) for name in sorted(MODELS)]
    for r in rows:
        print(f"{r['model']:<11} {r['parameters']:>11,} parameters  {r['train_gflops_per_image']:.3f} GFLOPs "
              f"per training image (forward + backward), {r['forward_gflops_per_image']:.3f} forward")
    if args.out:
        atomic_write_json(args.out, {"batch": args.batch, "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
