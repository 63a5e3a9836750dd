"""What every image source ends as: a Dataset of uint8 tensors with its classes and normalization, and the
normalization itself. CIFAR-10's mean and std are the defaults (checkpoints from before datasets were recorded
are CIFAR-10 models)."""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


def normalize_(x: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """In place: per-channel mean and std (by default CIFAR-10's)."""
    return x.sub_(x.new_tensor(mean)[None, :, None, None]).div_(x.new_tensor(std)[None, :, None, None])


def denormalize(x: torch.Tensor, mean: tuple[float, ...] = MEAN,
                std: tuple[float, ...] = STD) -> torch.Tensor:
    return (x * x.new_tensor(std)[None, :, None, None] + x.new_tensor(mean)[None, :, None, None]).clamp(0, 1)
