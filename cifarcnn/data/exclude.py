"""`data.exclude`: images left out of training and test, listed in a file (one path a line, or the `path`
column of an `audit.csv`).

An image is named as `cifarcnn audit` names it: a folder image by its path relative to the dataset root (an
absolute path inside the root also matches), a CIFAR image as `train/N` or `test/N` (its position in the
official files). Names that match no image are counted, not an error. What was left out (counts and a digest
of the names) goes into the checkpoint's split record, so `evaluate` can tell the same exclusion from another.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from ..base.errors import UsageError
from .dataset import Dataset, Exclusion


def read_names(path: str | Path) -> list[str]:
    """The image names a file lists: an audit.csv's `path` column, else one name a line (blank lines and
    lines starting with # skipped). A missing file is a UsageError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"config key 'data.exclude': {path} is not a file (give a list of image paths, one "
                         f"a line, or an audit.csv written by cifarcnn audit)")
    text = path.read_text(encoding="utf-8", errors="replace")
    first = text.split("\n", 1)[0]
    if "," in first and "path" in [c.strip() for c in first.split(",")]:
        return [row["path"].strip() for row in csv.DictReader(text.splitlines()) if row.get("path")]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def image_names(data: Dataset) -> tuple[list[str], list[str]]:
    """The name of each training and test image, as the audit writes them and data.exclude reads them."""
    if data.train_ids is not None:
        return list(data.train_ids), list(data.test_ids or ())
    kept = data.excluded
    train = kept.kept_train if kept is not None else np.arange(len(data.train_labels))
    test = kept.kept_test if kept is not None else np.arange(len(data.test_labels))
    return [f"train/{i}" for i in train.tolist()], [f"test/{i}" for i in test.tolist()]


def _normalized(name: str, root: str | None) -> str:
    name = name.replace(os.sep, "/")
    if root and os.path.isabs(name):
        prefix = root.rstrip("/") + "/"
        return name[len(prefix):] if name.startswith(prefix) else name
    return name.removeprefix("./")


def exclude(data: Dataset, file: str | Path, root: str | None = None) -> Dataset:
    """`data` without the images `file` names (`root`: a folder dataset's root, for absolute paths); prints
    what was left out, and warns about names that match nothing."""
    names = {_normalized(n, root) for n in read_names(file)}
    train_names, test_names = image_names(data)
    drop_train = np.array([n in names for n in train_names], dtype=bool)
    drop_test = np.array([n in names for n in test_names], dtype=bool)
    dropped = sorted([n for n, d in zip(train_names, drop_train) if d] +
                     [n for n, d in zip(test_names, drop_test) if d])
    exclusion = Exclusion(str(Path(file).expanduser().resolve()), len(names), int(drop_train.sum()),
                          int(drop_test.sum()), len(names) - len(dropped),
                          hashlib.sha256("\n".join(dropped).encode()).hexdigest()[:16],
                          np.flatnonzero(~drop_train), np.flatnonzero(~drop_test))
    if drop_train.all():
        raise UsageError(f"config key 'data.exclude': {file} lists every training image")
    keep_train, keep_test = ~drop_train, ~drop_test

    def kept(ids: tuple[str, ...] | None, keep: np.ndarray) -> tuple[str, ...] | None:
        return None if ids is None else tuple(i for i, k in zip(ids, keep) if k)

    print(exclusion.describe(), flush=True)
    if exclusion.unknown:
        print(f"warning: {exclusion.unknown} of the {len(names)} names in {file} match no image of "
              f"{data.name} (already removed, renamed, or another dataset's)", file=sys.stderr)
    return dataclasses.replace(
        data, train_images=data.train_images[keep_train], train_labels=data.train_labels[keep_train],
        test_images=data.test_images[keep_test], test_labels=data.test_labels[keep_test],
        train_ids=kept(data.train_ids, keep_train), test_ids=kept(data.test_ids, keep_test),
        excluded=exclusion)


def exclusion_note(record: dict | None, data: Dataset) -> str | None:
    """How the exclusion now compares with the one a checkpoint recorded; None when neither left anything
    out."""
    then = (record or {}).get("exclude")
    now = data.excluded.record() if data.excluded is not None else None
    if then is None and now is None:
        return None
    if then is None:
        return (f"exclude: this run trained with no data.exclude, but now {now['train'] + now['test']} "
                f"image(s) are left out ({now['file']})")
    if now is None:
        return (f"exclude: the run left out {then['train'] + then['test']} image(s) ({then['file']}); none "
                f"are left out now")
    if now["digest"] == then["digest"]:
        return (f"exclude: the same {now['train'] + now['test']} image(s) left out as in training "
                f"({now['test']} of them test images)")
    return (f"exclude: changed since training: {then['train'] + then['test']} image(s) left out then, "
            f"{now['train'] + now['test']} now ({now['file']})")
