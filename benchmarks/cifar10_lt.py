"""CIFAR-10-LT (imbalance factor 100, or --imbalance F) trained with each `data.balance` option: test accuracy
on the balanced 10,000-image test set (there, the same as balanced accuracy) and CPU seconds per run.

    python benchmarks/cifar10_lt.py [--presets quick fast] [--seeds 2] [--balance none ...] [--imbalance F]
                                    [--data-dir DIR] [--folder DIR] [--runs-dir DIR] [--out FILE] [KEY=VALUE]

The training set keeps n_c = floor(5000 x F^(-c / 9)) images of class c (at F = 100: 5,000 of airplane down
to 50 of truck, 12,406 in all), the first n_c of each class in the files' order, as Cao et al. (2019) build
it; the test set is the standard balanced one. Each run is `cifarcnn train --preset P data.dataset=folder
data.val_size=0 data.balance=B seed=S --test` in its own process (no validation split: the smallest classes
have too few images to spare), with the preset's own schedule and step budget (min_steps). Results go to --out
as they finish; a run already there is not trained again.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from folder_runs import train_run, write_folder

from cifarcnn.base.config import BALANCE
from cifarcnn.base.storage import atomic_write_json

IMBALANCE = 100


def lt_counts(largest: int = 5000, classes: int = 10, factor: float = IMBALANCE) -> list[int]:
    """Images per class, falling exponentially from `largest` to `largest / factor`."""
    return [math.floor(largest * factor ** (-c / (classes - 1))) for c in range(classes)]


def table(runs: list[dict]) -> str:
    """One line per preset and option: each seed's test accuracy and CPU seconds, and their mean."""
    lines = ["| preset | data.balance | test accuracy per seed | mean | CPU seconds per run |",
             "| --- | --- | --- | --- | --- |"]
    keys = dict.fromkeys((r["preset"], r["balance"]) for r in runs)
    for preset, balance in keys:
        mine = sorted((r for r in runs if (r["preset"], r["balance"]) == (preset, balance)),
                      key=lambda r: r["seed"])
        accs = ", ".join(f"{r['test_acc']:.2%}" for r in mine)
        mean = sum(r["test_acc"] for r in mine) / len(mine)
        secs = ", ".join(f"{r['cpu_seconds']:.0f}" for r in mine)
        lines.append(f"| {preset} | {balance} | {accs} | {mean:.2%} | {secs} |")
    return "\n".join(lines)


def earlier_runs(out: Path, counts: list[int]) -> list[dict]:
    """The runs already in `out`, which must have trained on the same class counts."""
    if not out.exists():
        return []
    earlier = json.loads(out.read_text())
    if earlier["train_counts"] != counts:
        raise SystemExit(f"error: {out} holds runs on other class counts ({earlier['train_counts']}); "
                         "pick another --out for this --imbalance")
    return earlier["runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE added to every run")
    parser.add_argument("--presets", nargs="+", default=["quick", "fast"])
    # auto is one of the others, by the imbalance (training/balance.py): not a run of its own by default
    parser.add_argument("--balance", nargs="+", default=[b for b in BALANCE if b != "auto"], choices=BALANCE)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--imbalance", type=float, default=IMBALANCE, help="largest class / smallest class")
    parser.add_argument("--data-dir", help="the CIFAR-10 copy (python format)")
    parser.add_argument("--folder", type=Path, default=Path("cifar10-lt"), help="where the folder is written")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs-cifar10-lt"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cifar10_lt.json"))
    args = parser.parse_args()
    counts = lt_counts(factor=args.imbalance)
    runs = earlier_runs(args.out, counts)
    folder = write_folder(args.folder, counts, args.data_dir)
    extras = args.overrides
    extra = " ".join(extras)
    for seed in range(args.seeds):
        for preset in args.presets:
            for balance in args.balance:
                key = (preset, balance, seed, extra)
                if any((r["preset"], r["balance"], r["seed"], r["overrides"]) == key for r in runs):
                    continue
                name = "-".join([preset, balance, f"seed{seed}", *(o.replace("=", "") for o in extras)])
                overrides = ["data.val_size=0", f"data.balance={balance}", f"seed={seed}", *args.overrides]
                result = train_run(folder, args.runs_dir, name, preset, overrides)
                runs.append({"preset": preset, "balance": balance, "seed": seed, "overrides": extra,
                             **result})
                print(json.dumps(runs[-1]), flush=True)
                atomic_write_json(args.out, {"imbalance": args.imbalance, "train_counts": counts,
                                             "test_images": 10000, "runs": runs})
    print(table([r for r in runs if r["overrides"] == extra]))


if __name__ == "__main__":
    main()
