"""Training time until a recipe's checkpoint first reaches a test accuracy (the figure a laptop user sees).

    python benchmarks/time_to_accuracy.py [--preset fast] [--target 0.85] [--from-epoch 1] [--data-dir DIR]
                                          [KEY=VALUE ...] [--out FILE]

Trains one run with `data.val_size=0` (all 50,000 training images). After each epoch from `--from-epoch` on,
the checkpoint just written is evaluated on the test set with the recipe's TTA, as `cifarcnn evaluate` would;
that evaluation is outside the clock. The time reported is the run's training time up to and including the
first epoch whose checkpoint reaches the target (per-epoch wall time, checkpoints and logging included). The
run stops there.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from recipe_args import recipe_parser

from cifarcnn.checkpoint import load_checkpoint, model_from_checkpoint
from cifarcnn.config import load_preset
from cifarcnn.data import Loader, load_cifar10
from cifarcnn.device import select_device
from cifarcnn.distributed import Dist
from cifarcnn.evaluate import evaluate_split
from cifarcnn.precision import choose
from cifarcnn.storage import atomic_write_json
from cifarcnn.train import train


def main() -> int:
    parser = recipe_parser(__doc__, "cifarcnn-tta-", "time_to_accuracy.json")
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--from-epoch", type=int, default=1, help="first epoch whose checkpoint is evaluated")
    args = parser.parse_args()

    cfg = load_preset(args.preset, ["data.val_size=0", *args.overrides])
    run_dir = args.runs_dir / args.preset
    device = select_device(args.device)
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
            model = model_from_checkpoint(checkpoint, run_dir / "last.pt").to(device, memory_format=torch.channels_last)
            precision = choose(cfg.precision, device).name
            _, point["test_acc"], _ = evaluate_split(model, test_loader, Dist(), None, cfg.tta, precision)
            point["eval_seconds"] = time.perf_counter() - started
        curve.append(point)
        print(json.dumps(point), flush=True)
        return point.get("test_acc", 0.0) >= args.target

    train(cfg, run_dir, data_dir=args.data_dir, device=args.device, on_epoch_end=evaluate_checkpoint)
    reached = next((p for p in curve if p.get("test_acc", 0.0) >= args.target), None)
    summary = {"preset": args.preset, "overrides": args.overrides, "target": args.target, "device": str(device),
               "torch_threads": torch.get_num_threads(), "curve": curve,
               "seconds_to_target": reached and reached["train_seconds"],
               "epochs_to_target": reached and reached["epoch"]}
    if reached:
        print(f"{args.preset}: test accuracy {reached['test_acc']:.2%} >= {args.target:.0%} after epoch "
              f"{reached['epoch']}, {reached['train_seconds']:.0f}s of training on {device}")
    else:
        print(f"{args.preset}: test accuracy never reached {args.target:.0%} "
              f"(best {max((p.get('test_acc', 0.0) for p in curve), default=0.0):.2%})")
    atomic_write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
