"""Which side of a folder dataset's split (training, validation or test) each image is on, what a checkpoint
records of the split, and how the split changed since a checkpoint was trained.

A folder image's side follows from its own path relative to the dataset root, never from its position in a
list: a blake2b hash keyed with `data.split_seed` (personalized per split, "test" or "val") maps the path to a
number u in [0, 1), and the image is held out when u < the fraction. Adding, removing or renaming other files
therefore never moves an image to another side. The one exception keeps every class trainable: when every
image of a class would be held out, the one with the largest u stays on the training side.

Each class is split by its own images' hashes, so its held-out count is that of independent coin flips (within
the tolerance docs/datasets.md states).

CIFAR keeps its official train/test split and its seeded validation permutation; its record holds counts and
digests.

A test accuracy never counts a test image the model trained on (by its path or by its pixels):
`train --test` and `evaluate` both take their test images from `untrained_test`, so they count the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .dataset import DataError, Dataset
from .pixels import SCHEME, path_ids, pixel_ids


def _unit(key: str, seed: int, side: bytes) -> float:
    """u in [0, 1) for `key` (a path relative to the dataset root), keyed by the split seed, one hash per
    side."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=str(seed).encode(), person=side).digest()
    return int.from_bytes(digest, "big") / 2**64


def hash_held_out(keys: list[str] | tuple[str, ...], labels: np.ndarray, fraction: float, seed: int,
                  side: bytes) -> np.ndarray:
    """The held-out mask: images whose keyed hash u is below `fraction`; in a class that would lose all its
    images, the one with the largest u is kept for training."""
    u = np.array([_unit(k, seed, side) for k in keys], dtype=np.float64)
    held = u < fraction
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if held[members].all():
            held[members[np.argmax(u[members])]] = False
    return held


def _digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(ids).tobytes()).hexdigest()[:16]


def _pairs_digest(ids: np.ndarray, pixels: np.ndarray) -> str:
    """A digest of (path, pixels) pairs: another file, or other pixels under the same name, changes it."""
    order = np.argsort(ids, kind="stable")
    return hashlib.sha256(np.stack([ids[order], pixels[order]], 1).tobytes()).hexdigest()[:16]


def _side(ids: np.ndarray, pixels: np.ndarray | None) -> dict:
    side = {"count": int(len(ids)), "digest": _digest(ids)}
    if pixels is not None:
        side.update(ids=torch.from_numpy(ids), pixels=torch.from_numpy(pixels))
    return side


def split_record(train_keys: tuple[str, ...] | None, train_images: torch.Tensor,
                 val_mask: torch.Tensor | None, test_keys: tuple[str, ...] | None,
                 test_images: torch.Tensor, excluded: dict | None = None) -> dict:
    """What a checkpoint records of its split: per side (train, val, test) the count and a digest of the
    images' keys; for a folder dataset also each image's path and pixel identity (to tell later what
    moved); and what data.exclude left out (`excluded`, `Exclusion.record()`), when it did."""
    record = _record(train_keys, train_images, val_mask, test_keys, test_images)
    if excluded is not None:
        record["exclude"] = excluded
    return record


def _record(train_keys: tuple[str, ...] | None, train_images: torch.Tensor, val_mask: torch.Tensor | None,
            test_keys: tuple[str, ...] | None, test_images: torch.Tensor) -> dict:
    mask = val_mask.numpy() if val_mask is not None else np.zeros(len(train_images), dtype=bool)
    if train_keys is None:  # CIFAR: the keys are positions in the official files
        positions = np.arange(len(train_images), dtype=np.int64)
        return {"scheme": "cifar", "train": _side(positions[~mask], None),
                "val": _side(positions[mask], None),
                "test": _side(np.arange(len(test_images), dtype=np.int64), None)}
    ids, pixels = path_ids(train_keys), pixel_ids(train_images)
    return {"scheme": SCHEME, "train": _side(ids[~mask], pixels[~mask]),
            "val": _side(ids[mask], pixels[mask]),
            "test": _side(path_ids(test_keys or ()), pixel_ids(test_images))}


@dataclass
class SplitChange:
    """How the current test set relates to the split a checkpoint recorded."""

    test_images: int
    trained_on: np.ndarray  # bool per current test image: the model trained on it (by path or by pixels)
    was_train: int  # current test images whose path was a training image's
    was_val: int  # current test images whose path was a validation image's
    copies: int  # test images under a path not trained on, with the pixels of a training image (duplicates)
    new: int  # current test images the checkpoint never saw on any side
    gone: int  # images trained on that are no longer in the dataset under their name
    test_digest: str  # the test images a test accuracy counts (not trained on): their paths and pixels
    by_source: int = 0  # fine-tuned runs: other test images with pixels the source model trained on

    @property
    def moved(self) -> int:
        return self.was_train + self.was_val

    def describe(self) -> str:
        if not self.moved and not self.copies and not self.new and not self.gone and not self.by_source:
            return f"split: unchanged since training ({self.test_images} test images, none trained on)"
        parts = []
        if self.moved:
            parts.append(f"{self.moved} of the {self.test_images} test images changed sides since training "
                         f"({self.was_train} were training images, {self.was_val} validation images)")
        if self.copies:
            parts.append(f"{self.copies} of the {self.test_images} test images have the pixels of a training "
                         f"image (the same picture under another name, at the decoded size)")
        if self.by_source:
            parts.append(f"{self.by_source} of the {self.test_images} test images are images the source "
                         f"model (init_from) trained on")
        if self.new:
            parts.append(f"{self.new} test image(s) are new since training")
        if self.gone:
            parts.append(f"{self.gone} image(s) the model trained on are gone or renamed")
        return "split: " + "; ".join(parts)


def compare_split(record: dict | None, data: Dataset) -> SplitChange | None:
    """The change since training of a folder dataset's test set (by path and by pixels), and for a fine-tuned
    run the test images its source model trained on (`source_train`, by pixels); None when there is nothing to
    compare (CIFAR, or a checkpoint written before splits were recorded)."""
    if not record or record.get("scheme") != SCHEME or data.test_ids is None or data.train_ids is None:
        return None
    ids, pixels = path_ids(data.test_ids), pixel_ids(data.test_images)

    def by_path(side: str) -> np.ndarray:
        return np.isin(ids, record[side]["ids"].numpy())

    def by_pixels(side: str) -> np.ndarray:
        return np.isin(pixels, record[side]["pixels"].numpy())

    was_train = by_path("train")
    was_val = by_path("val") & ~was_train
    copies = by_pixels("train") & ~was_train
    source = record.get("source_train")
    by_source = np.isin(pixels, source["pixels"].numpy()) if source else np.zeros_like(copies)
    by_source &= ~(was_train | copies)
    trained = was_train | copies | by_source
    seen = (was_train | by_path("val") | by_path("test") | by_pixels("train") | by_pixels("val")
            | by_pixels("test"))
    now_ids = np.concatenate([ids, path_ids(data.train_ids)])
    now_pixels = np.concatenate([pixels, pixel_ids(data.train_images)])
    then = record["train"]
    gone = ~np.isin(then["ids"].numpy(), now_ids) & ~np.isin(then["pixels"].numpy(), now_pixels)
    return SplitChange(len(ids), trained, int(was_train.sum()), int((was_val & ~copies).sum()),
                       int(copies.sum()), int((~seen).sum()), int(gone.sum()),
                       _pairs_digest(ids[~trained], pixels[~trained]), int(by_source.sum()))


def untrained_test(data: Dataset, change: SplitChange | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels a test accuracy counts, the one rule of `train --test` and `evaluate`:
    all but those the model trained on (`change.trained_on`); all of them when there is nothing to compare
    (None). Raises DataError when the model trained on every test image."""
    if change is None or not change.trained_on.any():
        return data.test_images, data.test_labels
    if change.trained_on.all():
        raise DataError(f"every one of the {change.test_images} test images of {data.name} is an image the "
                        f"model trained on (by its path or its pixels): there is no test accuracy to measure")
    keep = torch.from_numpy(~change.trained_on)
    return data.test_images[keep], data.test_labels[keep]
