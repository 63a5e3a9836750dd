"""What every image source ends as: a Dataset of uint8 tensors with its classes and normalization, and the
normalization itself. CIFAR-10's mean and std are the defaults (checkpoints from before datasets were recorded
are CIFAR-10 models)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..base.errors import UserError
from .pixels import MEAN, STD


class DataError(UserError):
    exit_code = 1


@dataclass
class Dataset:
    """What every dataset ends as: uint8 images (N, 3, S, S) and int64 labels, its class names, the
    per-channel mean and std its images are normalized with, and a name for titles and checkpoints."""

    train_images: torch.Tensor  # (N, 3, S, S) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = "CIFAR-10"
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    # folder datasets: each image's path relative to the dataset root (its key in the split); None for CIFAR
    train_ids: tuple[str, ...] | None = None
    test_ids: tuple[str, ...] | None = None
    excluded: Exclusion | None = None  # what data.exclude left out (exclude.py)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


@dataclass
class Exclusion:
    """What `data.exclude` left out of a dataset: the file, how many of its names matched each side, how
    many matched nothing, and the kept images' original positions (CIFAR names them by position)."""

    file: str
    listed: int
    train: int
    test: int
    unknown: int
    digest: str  # of the sorted names left out: the same file on the same data gives the same digest
    kept_train: np.ndarray
    kept_test: np.ndarray

    def record(self) -> dict:
        """What the checkpoint's split record keeps."""
        return {"file": self.file, "listed": self.listed, "train": self.train, "test": self.test,
                "unknown": self.unknown, "digest": self.digest}

    def describe(self) -> str:
        unknown = f"; {self.unknown} listed name(s) match no image" if self.unknown else ""
        return (f"data.exclude {self.file}: left out {self.train + self.test} image(s) ({self.train} "
                f"training, {self.test} test){unknown}")


def normalize_(x: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """In place: per-channel mean and std (by default CIFAR-10's)."""
    return x.sub_(x.new_tensor(mean)[None, :, None, None]).div_(x.new_tensor(std)[None, :, None, None])


def denormalize(x: torch.Tensor, mean: tuple[float, ...] = MEAN,
                std: tuple[float, ...] = STD) -> torch.Tensor:
    return (x * x.new_tensor(std)[None, :, None, None] + x.new_tensor(mean)[None, :, None, None]).clamp(0, 1)
