"""How well `cifarcnn audit` finds wrong labels, and what leaving them out gives back.

    python benchmarks/label_noise.py --data-dir DIR [--noise 0.1] [--folds 5] [--preset quick]
        [--clean-run RUN_DIR] [--work DIR] [--out FILE]

Moves `--noise` of the CIFAR-10 copy's training labels to a random other class (seeded; the positions, old and
new labels go to moved.json), writes the noisy set in the official python format, and runs `cifarcnn audit` on
it (each command a child process; CPU seconds are the children's user + system time). The flagged set is the
audit's `label_issue` rows on the training side (the test labels are not moved); precision and recall are
against the moved images. Then trains the preset (seed 0, --test) on the noisy set, and on the noisy set with
`data.exclude` = the flagged training images; the clean figure is the test accuracy of `--clean-run` (a run of
the same preset on the clean copy; trained here when not given).
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cifarcnn.base.storage import atomic_write_json

BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str], log: Path) -> float:
    """`python -m cifarcnn ARGS`, output to `log`; its CPU seconds. A failure stops the benchmark."""
    before = children_cpu()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "cifarcnn", *args], stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"cifarcnn {' '.join(args)} failed with exit code {code}: see {log}")
    return children_cpu() - before


def write_noisy(source: Path, target: Path, noise: float, seed: int) -> list[dict]:
    """A copy of CIFAR-10 under target/cifar-10-batches-py with `noise` of the training labels moved; the
    moved images as {position, old, new}."""
    folder = target / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for name in BATCHES:
        with open(source / name, "rb") as f:
            batches.append(pickle.load(f, encoding="latin1"))
    labels = np.concatenate([np.array(b["labels"]) for b in batches])
    rng = np.random.default_rng(seed)
    moved = np.sort(rng.choice(len(labels), round(noise * len(labels)), replace=False))
    new = labels.copy()
    new[moved] = (labels[moved] + rng.integers(1, 10, len(moved))) % 10
    offset = 0
    for name, batch in zip(BATCHES, batches):
        count = len(batch["labels"])
        batch["labels"] = new[offset:offset + count].tolist()
        offset += count
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    for name in ("test_batch", "batches.meta"):
        shutil.copyfile(source / name, folder / name)
    return [{"position": int(i), "old": int(labels[i]), "new": int(new[i])} for i in moved]


def flagged_training_images(csv_path: Path) -> list[str]:
    import csv

    with open(csv_path) as f:
        return [row["path"] for row in csv.DictReader(f)
                if row["issue"] == "label_issue" and row["path"].startswith("train/")]


def test_accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "test.json").read_text())["test_acc"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the folder holding cifar-10-batches-py/")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="which labels move, and to what")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--clean-run", type=Path, help="a --test run of the preset on the clean copy")
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="label-noise-")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/label_noise.json"))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.data_dir) / "cifar-10-batches-py"
    moved = write_noisy(source, work / "noisy", args.noise, args.seed)
    atomic_write_json(work / "moved.json", moved)
    print(f"moved {len(moved)} training labels; positions in {work / 'moved.json'}", flush=True)

    started = time.time()
    audit_cpu = run(["audit", "--data-dir", str(work / "noisy"), "--preset", args.preset, "--folds",
                     str(args.folds), "--out", str(work / "audit")], work / "audit.log")
    audit_wall = time.time() - started
    flagged = flagged_training_images(work / "audit" / "audit.csv")
    truth = {f"train/{m['position']}" for m in moved}
    hits = len(truth.intersection(flagged))
    precision, recall = hits / max(len(flagged), 1), hits / len(truth)
    print(f"audit: {len(flagged)} training images flagged, {hits} of them moved: precision {precision:.3f}, "
          f"recall {recall:.3f} ({audit_cpu:.0f} CPU seconds)", flush=True)
    (work / "exclude.txt").write_text("\n".join(flagged) + "\n")

    common = ["train", "--preset", args.preset, "--data-dir", str(work / "noisy"), "--runs-dir",
              str(work / "runs"), "--test", "seed=0"]
    noisy_cpu = run([*common, "--name", "noisy"], work / "noisy.log")
    excluded_cpu = run([*common, "--name", "excluded", f"data.exclude={work / 'exclude.txt'}"],
                       work / "excluded.log")
    clean_cpu = None
    clean_run = args.clean_run
    if clean_run is None or not (clean_run / "test.json").is_file():
        clean_run = work / "runs" / "clean"
        clean_cpu = run(["train", "--preset", args.preset, "--data-dir", args.data_dir, "--runs-dir",
                         str(work / "runs"), "--name", "clean", "--test", "seed=0"], work / "clean.log")
    accuracy = {"clean": test_accuracy(clean_run), "noisy": test_accuracy(work / "runs" / "noisy"),
                "noisy_minus_flagged": test_accuracy(work / "runs" / "excluded")}
    cost = accuracy["clean"] - accuracy["noisy"]
    recovered = (accuracy["noisy_minus_flagged"] - accuracy["noisy"]) / cost if cost > 0 else None
    result = {"noise": args.noise, "seed": args.seed, "moved": len(moved), "preset": args.preset,
              "folds": args.folds, "flagged": len(flagged), "flagged_and_moved": hits,
              "precision": precision, "recall": recall, "audit_cpu_seconds": audit_cpu,
              "audit_wall_seconds": audit_wall, "test_accuracy": accuracy, "recovered_share": recovered,
              "train_cpu_seconds": {"noisy": noisy_cpu, "noisy_minus_flagged": excluded_cpu,
                                    "clean": clean_cpu},
              "clean_run": str(clean_run), "work": str(work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"\n{'training set':<28}{'test accuracy':>14}")
    for name, value in accuracy.items():
        print(f"{name:<28}{value:>14.2%}")
    print(f"\nprecision {precision:.3f} (target 0.8), recall {recall:.3f} (target 0.7); leaving the flagged "
          f"images out recovers {recovered if recovered is None else f'{recovered:.0%}'} of the "
          f"{cost:.2%} the noise cost (target 50%)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
