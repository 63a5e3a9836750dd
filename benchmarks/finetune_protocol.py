"""Fine-tuning protocol: does starting from a model trained on other classes beat training from scratch on few
images?

    python benchmarks/finetune_protocol.py --data-dir /path/to/cifar10 [--work DIR] [--sizes 100 1000]
        [--seeds 3] [--compare-normalization] [--out finetune_protocol.json] [KEY=VALUE ...]

Source: CIFAR-10's first five classes (airplane, automobile, bird, cat, deer), all 25,000 training images,
written as a folder dataset (PNG, pixels unchanged) and trained with the quick preset (`data.val_size=0`, test
accuracy on their 5,000 official test images). Target: the other five classes (dog, frog, horse, ship, truck)
as folder datasets of N training images per class (a seeded choice, the same for every seed and way) with all
their 5,000 official test images as test/. Per target size and seed (0, 1, 2) three ways are trained with the
same preset and epochs: from scratch, `init_from` + `finetune=all`, and `finetune=head` (a linear probe).
Epochs: the quick preset's 5, raised to give at least MIN_STEPS optimizer steps (at 100 images per class, 500
images are 2 batches of 256 a epoch, so 5 epochs would be 10 steps; 50 epochs are 100).
`--compare-normalization` also runs `finetune=all` at the first size normalized with the target dataset's own
mean and std instead of the source model's. Seconds are the trainer's `train_seconds` (training plus the final
test with TTA). KEY=VALUE overrides apply to every run (source included). The work folder keeps the datasets
and the source run: a rerun with the same --work reuses them (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cifarcnn.base.config import load_preset
from cifarcnn.base.device import keep_freed_memory, select_device
from cifarcnn.base.storage import atomic_write_json
from cifarcnn.data.cifar import load_cifar10
from cifarcnn.training import finetune
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.train import train

SOURCE_CLASSES = (0, 1, 2, 3, 4)  # airplane, automobile, bird, cat, deer
TARGET_CLASSES = (5, 6, 7, 8, 9)  # dog, frog, horse, ship, truck
PRESET = "quick"
MIN_STEPS = 100
CHOICE_SEED = 0  # which target training images are picked
WAYS = ("scratch", "finetune all", "finetune head")


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> None:
    """images (N, 3, H, W) uint8 as root/<class>/<n>.png; `labels` index `names`."""
    for name in set(names[i] for i in labels):
        (root / name).mkdir(parents=True, exist_ok=True)

    def save(n: int) -> None:
        Image.fromarray(images[n].transpose(1, 2, 0), "RGB").save(root / names[labels[n]] / f"{n}.png")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save, range(len(images)), chunksize=256))


def prepare(work: Path, data_dir: str | None, sizes: list[int], source_limit: int | None) -> dict[str, Path]:
    """The source dataset and one target dataset per size under `work` (kept when already written)."""
    data = load_cifar10(data_dir, download=False)
    train_x, train_y = data.train_images.numpy(), data.train_labels.numpy()
    test_x, test_y = data.test_images.numpy(), data.test_labels.numpy()
    folders = {"source": work / "source-data", **{f"target{n}": work / f"target{n}-data" for n in sizes}}
    rng = np.random.default_rng(CHOICE_SEED)
    order = {c: rng.permutation(np.flatnonzero(train_y == c)) for c in TARGET_CLASSES}
    for key, root in folders.items():
        if (root / ".done").exists():
            continue
        classes = SOURCE_CLASSES if key == "source" else TARGET_CLASSES
        if key == "source":
            picked = np.concatenate([np.flatnonzero(train_y == c)[:source_limit] for c in classes])
        else:
            per_class = int(key.removeprefix("target"))
            picked = np.concatenate([order[c][:per_class] for c in classes])
        tested = np.flatnonzero(np.isin(test_y, classes))
        write_folder(root / "train", train_x[picked], train_y[picked], data.classes)
        write_folder(root / "test", test_x[tested], test_y[tested], data.classes)
        (root / ".done").write_text(f"{len(picked)} train, {len(tested)} test\n")
        print(f"wrote {root}: {len(picked)} training and {len(tested)} test images", flush=True)
    return folders


def epochs_for(images: int, batch_size: int, preset_epochs: int, min_steps: int = MIN_STEPS) -> int:
    """The preset's epochs, raised to give at least `min_steps` optimizer steps."""
    return max(preset_epochs, math.ceil(min_steps / math.ceil(images / batch_size)))


def train_source(work: Path, folder: Path, overrides: list[str], device: str | None) -> dict:
    run_dir = work / "source-run"
    if (run_dir / "last.pt").exists():
        state = load_checkpoint(run_dir / "last.pt")
        if state["epoch"] >= state["config"]["epochs"]:
            print(f"reusing the source model {run_dir}", flush=True)
            return {"run": str(run_dir), "test_acc": state["history"][-1]["test_acc"],
                    "seconds": state["train_seconds"], "epochs": state["epoch"]}
    cfg = load_preset(PRESET, ["data.dataset=folder", f"data.path={folder}", "data.val_size=0", *overrides])
    state = train(cfg, run_dir, device=device, test=True, resume=(run_dir / "last.pt").exists())
    return {"run": str(run_dir), "test_acc": state["history"][-1]["test_acc"],
            "seconds": state["train_seconds"], "epochs": state["epoch"]}


def run_cell(work: Path, folder: Path, per_class: int, way: str, seed: int, source: str, overrides: list[str],
             device: str | None, normalization: str = "source", min_steps: int = MIN_STEPS) -> dict:
    base = load_preset(PRESET, overrides)
    epochs = epochs_for(per_class * len(TARGET_CLASSES), base.batch_size, base.epochs, min_steps)
    extra = [] if way == "scratch" else [f"init_from={source}", f"finetune={way.split()[-1]}"]
    cfg = load_preset(PRESET, ["data.dataset=folder", f"data.path={folder}", "data.val_size=0",
                               f"epochs={epochs}", f"seed={seed}", *extra, *overrides])
    tag = f"{per_class}-{way.replace(' ', '-')}-{normalization}-seed{seed}"
    finetune.NORMALIZATION = normalization
    try:
        state = train(cfg, work / "runs" / tag, device=device, test=True)
    finally:
        finetune.NORMALIZATION = "source"
    cell = {"per_class": per_class, "way": way,
            "normalization": normalization if way != "scratch" else "dataset", "seed": seed, "epochs": epochs,
            "test_acc": state["history"][-1]["test_acc"], "seconds": round(state["train_seconds"], 2)}
    print(json.dumps(cell), flush=True)
    return cell


def summarize(cells: list[dict]) -> list[dict]:
    rows: dict[tuple, list[dict]] = {}
    for c in cells:
        rows.setdefault((c["per_class"], c["way"], c["normalization"]), []).append(c)
    return [{"per_class": k[0], "way": k[1], "normalization": k[2], "epochs": v[0]["epochs"],
             "test_acc": [c["test_acc"] for c in v],
             "mean_test_acc": statistics.mean(c["test_acc"] for c in v),
             "mean_seconds": statistics.mean(c["seconds"] for c in v)} for k, v in rows.items()]


def table(rows: list[dict]) -> str:
    lines = ["| images/class | way | normalization | epochs | test accuracy per seed | mean | mean seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{a:.2%}" for a in r["test_acc"])
        lines.append(f"| {r['per_class']} | {r['way']} | {r['normalization']} | {r['epochs']} | {per_seed} | "
                     f"{r['mean_test_acc']:.2%} | {r['mean_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--data-dir", help="CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    parser.add_argument("--device")
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="cifarcnn-finetune-")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="training images per class")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--min-steps", type=int, default=MIN_STEPS,
                        help="raise the epochs to this many steps")
    parser.add_argument("--source-per-class", type=int,
                        help="fewer source images (for trying the script out)")
    parser.add_argument("--source-only", action="store_true",
                        help="prepare the data and train the source, then stop")
    parser.add_argument("--compare-normalization", action="store_true",
                        help="also fine-tune the first size with the target dataset's own mean and std")
    parser.add_argument("--out", type=Path, default=Path("finetune_protocol.json"))
    args = parser.parse_args()
    keep_freed_memory(select_device(args.device))  # owns its process, as cifarcnn does
    args.work.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.work, args.data_dir, args.sizes, args.source_per_class)
    source = train_source(args.work, folders["source"], args.overrides, args.device)
    print(f"source: {source['test_acc']:.2%} test accuracy on its 5 classes, {source['seconds']:.1f}s",
          flush=True)
    if args.source_only:
        return 0
    plan = [(n, way, seed, "source") for n in args.sizes for seed in range(args.seeds) for way in WAYS]
    if args.compare_normalization:  # after the first size's cells
        plan[args.seeds * len(WAYS):args.seeds * len(WAYS)] = [(args.sizes[0], "finetune all", seed, "target")
                                                               for seed in range(args.seeds)]
    cells = []
    for n, way, seed, normalization in plan:
        cells.append(run_cell(args.work, folders[f"target{n}"], n, way, seed, source["run"], args.overrides,
                              args.device, normalization, args.min_steps))
        atomic_write_json(args.out, {"preset": PRESET, "overrides": args.overrides, "source": source,
                                     "cells": cells, "complete": False})
    rows = summarize(cells)
    mean = {(r["per_class"], r["way"], r["normalization"]): r["mean_test_acc"] for r in rows}
    small = args.sizes[0]
    gain = mean[(small, "finetune all", "source")] - mean[(small, "scratch", "dataset")]
    print(table(rows))
    print(f"source model: {source['test_acc']:.2%}; at {small} images per class, finetune all - scratch = "
          f"{gain * 100:+.1f} points (target: >= +8)")
    atomic_write_json(args.out, {"preset": PRESET, "overrides": args.overrides, "source": source,
                                 "cells": cells, "rows": rows, "gain_points": gain * 100, "complete": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
