"""Training time until a recipe's checkpoint first reaches a test accuracy (the figure a laptop user sees).

    python benchmarks/time_to_accuracy.py [--preset fast] [--target 0.85 ...] [--whole-schedule]
                                          [--from-epoch 1] [--data-dir DIR] [KEY=VALUE ...] [--out FILE]

Trains one run with `data.val_size=0` (all 50,000 training images). After each epoch from `--from-epoch` on,
the checkpoint just written is evaluated on the test set with the recipe's TTA, as `cifarcnn evaluate` would;
that evaluation is outside the clock. The time reported for a target is the run's training time up to and
including the first epoch whose checkpoint reaches it (per-epoch wall time, checkpoints and logging included).
`--target` may be given several times; the run stops once the highest is reached, unless `--whole-schedule`.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from recipe_args import recipe_parser

from cifarcnn.base.config import load_preset
from cifarcnn.base.device import keep_freed_memory, select_device
from cifarcnn.base.inference import checkpoint_settings
from cifarcnn.base.storage import atomic_write_json
from cifarcnn.data.cifar import load_cifar10
from cifarcnn.data.loader import Loader
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint
from cifarcnn.training.distributed import Dist
from cifarcnn.training.train import evaluate_split, train


def main() -> int:
    parser = recipe_parser(__doc__, "cifarcnn-tta-", "time_to_accuracy.json")
    parser.add_argument("--target", type=float, action="append", help="test accuracy to reach (default 0.85)")
    parser.add_argument("--whole-schedule", action="store_true", help="train every epoch, past the targets")
    parser.add_argument("--from-epoch", type=int, default=1, help="first epoch whose checkpoint is evaluated")
    args = parser.parse_args()
    targets = sorted(args.target or [0.85])

    cfg = load_preset(args.preset, ["data.val_size=0", *args.overrides])
    run_dir = args.runs_dir / args.preset
    device = select_device(args.device)
    keep_freed_memory(device)  # owns its process, as cifarcnn does
    data = load_cifar10(args.data_dir)
    test_loader = Loader(data.test_images, data.test_labels, cfg.eval_batch_size, device=device,
                         memory_format=torch.channels_last)
    curve: list[dict] = []

    def evaluate_checkpoint(metrics: dict) -> bool:
        elapsed = (curve[-1]["train_seconds"] if curve else 0.0) + metrics["seconds"]
        point = {"epoch": metrics["epoch"], "train_seconds": elapsed}
        if metrics["epoch"] >= args.from_epoch:
            started = time.perf_counter()
            checkpoint = load_checkpoint(run_dir / "last.pt")
            model = model_from_checkpoint(checkpoint, run_dir / "last.pt")
            model = model.to(device, memory_format=torch.channels_last)
            settings = checkpoint_settings(checkpoint, device)  # the views and precision evaluate uses
            _, point["test_acc"], _, _ = evaluate_split(model, test_loader, Dist(), None, settings)
            point["eval_seconds"] = time.perf_counter() - started
        curve.append(point)
        print(json.dumps(point), flush=True)
        return not args.whole_schedule and point.get("test_acc", 0.0) >= targets[-1]

    state = train(cfg, run_dir, data_dir=args.data_dir, device=args.device, on_epoch_end=evaluate_checkpoint)
    summary = {"preset": args.preset, "overrides": args.overrides, "targets": targets, "device": str(device),
               "precision": state.get("precision"), "torch_threads": torch.get_num_threads(), "curve": curve,
               "reached": [report(args.preset, target, curve, device) for target in targets]}
    summary["seconds_to_target"] = summary["reached"][-1]["seconds"]
    summary["epochs_to_target"] = summary["reached"][-1]["epoch"]
    atomic_write_json(args.out, summary)
    return 0


def report(preset: str, target: float, curve: list[dict], device: torch.device) -> dict:
    """Print and return when `target` was first reached (epoch, seconds and accuracy; None when never)."""
    reached = next((p for p in curve if p.get("test_acc", 0.0) >= target), None)
    if reached:
        print(f"{preset}: test accuracy {reached['test_acc']:.2%} >= {target:.1%} after epoch "
              f"{reached['epoch']}, {reached['train_seconds']:.0f}s of training on {device}")
    else:
        print(f"{preset}: test accuracy never reached {target:.1%} "
              f"(best {max((p.get('test_acc', 0.0) for p in curve), default=0.0):.2%})")
    return {"target": target, "epoch": reached and reached["epoch"],
            "seconds": reached and reached["train_seconds"], "test_acc": reached and reached["test_acc"]}


if __name__ == "__main__":
    sys.exit(main())
