"""The step budget (`min_steps`) on small folders: a preset's fixed-epoch schedule (min_steps=0) against
its schedule raised to the budget, on class folders of the first N CIFAR-10 training images of each class,
tested on the balanced 10,000-image test set; test accuracy and CPU seconds per run.

    python benchmarks/small_folders.py [--preset quick] [--folders 500 2000 5000 lt2000] [--min-steps 0 880]
                                       [--data-dir DIR] [--root DIR] [--out FILE] [KEY=VALUE ...]

A folder named by a number N holds N / 10 images of each class; `lt2000` holds 400 down to 40 images per
class (imbalance factor 10, exponential: 1,630 images). Each run is `cifarcnn train --preset P
data.dataset=folder min_steps=M --test` in its own process, with the preset's validation split. Results go to
--out as they finish; a run already there is not trained again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar10_lt import lt_counts
from folder_runs import train_run, write_folder

from cifarcnn.base.storage import atomic_write_json


def folder_counts(name: str) -> list[int]:
    """Images per class of a folder named N (balanced) or ltN (imbalance factor 10 from N / 5 per class)."""
    if name.startswith("lt"):
        return lt_counts(int(name[2:]) // 5, factor=10)
    return [int(name) // 10] * 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE added to every run")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--folders", nargs="+", default=["500", "2000", "5000", "lt2000"])
    parser.add_argument("--min-steps", nargs="+", type=int, default=[0, 880])
    parser.add_argument("--data-dir", help="the CIFAR-10 copy (python format)")
    parser.add_argument("--root", type=Path, default=Path("small-folders"),
                        help="where the folders are written")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs-small-folders"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/small_folders.json"))
    args = parser.parse_args()
    runs = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    for name in args.folders:
        counts = folder_counts(name)
        folder = write_folder(args.root / name, counts, args.data_dir)
        for min_steps in args.min_steps:
            key = (args.preset, name, min_steps)
            if any((r["preset"], r["folder"], r["min_steps"]) == key for r in runs):
                continue
            result = train_run(folder, args.runs_dir, f"{args.preset}-{name}-min{min_steps}", args.preset,
                               [f"min_steps={min_steps}", *args.overrides])
            runs.append({"preset": args.preset, "folder": name, "train_counts": counts,
                         "min_steps": min_steps, **result})
            print(json.dumps(runs[-1]), flush=True)
            atomic_write_json(args.out, {"runs": runs})
    print("| preset | folder | images | min_steps | epochs | test accuracy | CPU seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['preset']} | {r['folder']} | {sum(r['train_counts'])} | {r['min_steps']} "
              f"| {r['epochs']} | {r['test_acc']:.2%} | {r['cpu_seconds']:.0f} |")


if __name__ == "__main__":
    main()
