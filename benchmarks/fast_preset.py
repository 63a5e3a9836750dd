"""Accuracy and time of a recipe over several seeds, the way the CIFAR-10 speed records are measured.

    python benchmarks/fast_preset.py --seeds 5 [--preset fast] [--data-dir DIR] [KEY=VALUE ...] [--out FILE]

Each seed trains with `data.val_size=0` (all 50,000 training images, no per-epoch validation) and `--test`
semantics: the clock (CUDA-synchronized) runs from the first step to the final test predictions with TTA,
checkpoints and logging included; the data upload and the trainer's warm-up (torch.compile, cuDNN autotuning,
CUDA graph capture, all batch shapes) happen before it starts. All seeds run in one process; the median is
the figure to quote.
"""

from __future__ import annotations

import json
import statistics
import sys

from recipe_args import recipe_parser

from cifarcnn.base.config import load_preset
from cifarcnn.base.device import keep_freed_memory, select_device
from cifarcnn.base.storage import atomic_write_json
from cifarcnn.training.train import train


def main() -> int:
    parser = recipe_parser(__doc__, "cifarcnn-bench-", "fast_preset.json")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory(select_device(args.device))  # owns its process, as cifarcnn does
    runs = []
    for seed in range(args.seeds):
        cfg = load_preset(args.preset, ["data.val_size=0", *args.overrides, f"seed={seed}"])
        state = train(cfg, args.runs_dir / f"{args.preset}-seed{seed}", data_dir=args.data_dir,
                      device=args.device, test=True)
        runs.append({"seed": seed, "test_acc": state["test"]["test_acc"], "seconds": state["train_seconds"],
                     "epochs": state["epoch"],
                     "epoch_seconds": [round(m["seconds"], 4) for m in state["history"]]})
        print(json.dumps(runs[-1]), flush=True)
    accs, secs = [r["test_acc"] for r in runs], [r["seconds"] for r in runs]
    summary = {
        "preset": args.preset, "overrides": args.overrides, "runs": runs,
        "mean_test_acc": statistics.mean(accs), "std_test_acc": statistics.pstdev(accs),
        "mean_seconds": statistics.mean(secs), "median_seconds": statistics.median(secs),
    }
    print(f"{args.preset}: test accuracy {summary['mean_test_acc']:.2%} +- {summary['std_test_acc']:.2%} "
          f"over {len(runs)} seeds; time {summary['mean_seconds']:.2f}s mean, "
          f"{summary['median_seconds']:.2f}s median")
    atomic_write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
