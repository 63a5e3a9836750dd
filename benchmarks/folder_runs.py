"""Shared by the small-folder and CIFAR-10-LT benchmarks: class folders written from chosen CIFAR-10 training
images (PNG, so the pixels are the copy's), and one training run in its own process, timed in CPU seconds."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cifarcnn.data.cifar import load_cifar10

DONE = "written.json"  # marks a finished folder, with the counts per class


def first_per_class(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """The indices of the first `counts[c]` images of each class c, in file order."""
    return np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)])


def write_folder(out: Path, counts: list[int], data_dir: str | None) -> Path:
    """out/train/<class>/<n>.png: the first counts[c] training images of class c; out/test/: all 10,000 test
    images. A folder written before (its DONE file lists the same counts) is reused; one written with other
    counts is an error, since its extra images would stay."""
    marker = out / DONE
    if marker.exists():
        written = json.loads(marker.read_text())["counts"]
        if written == list(counts):
            return out
        raise SystemExit(f"error: {out} holds a folder with other class counts ({written}); "
                         "pick another --folder or delete it")
    data = load_cifar10(data_dir, download=False)
    train_labels = data.train_labels.numpy()
    sides = [("train", data.train_images.numpy(), train_labels, first_per_class(train_labels, counts)),
             ("test", data.test_images.numpy(), data.test_labels.numpy(), np.arange(len(data.test_labels)))]
    for side, images, labels, chosen in sides:
        for name in data.classes:
            (out / side / name).mkdir(parents=True, exist_ok=True)
        for n in chosen:
            path = out / side / data.classes[labels[n]] / f"{n}.png"
            Image.fromarray(images[n].transpose(1, 2, 0)).save(path)
    marker.write_text(json.dumps({"counts": list(counts)}) + "\n")
    return out


def train_run(folder: Path, runs_dir: Path, name: str, preset: str, overrides: list[str]) -> dict:
    """`cifarcnn train --preset PRESET --test` on the folder in a child process; its test accuracy, epochs,
    steps, and the child's CPU seconds (user + system) and wall seconds."""
    command = [sys.executable, "-m", "cifarcnn", "train", "--preset", preset, "data.dataset=folder",
               f"data.path={folder}", *overrides, "--test", "--runs-dir", str(runs_dir), "--name", name]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    log = runs_dir / f"{name}.log"
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run = runs_dir / name
    test = json.loads((run / "test.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = sum(1 for h in history if "epoch" in h and "test" not in h)
    return {"test_acc": test["test_acc"], "epochs": epochs, "cpu_seconds": round(cpu, 1),
            "wall_seconds": round(time.perf_counter() - started, 1)}
