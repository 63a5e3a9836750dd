"""What a run is built from, shared by the trainer and `bench`: the loaders (channels_last, normalized with
the dataset's mean and std, each rank on its shard), the model, and its optimizer and training step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..base.config import Config
from ..data.dataset import MEAN, STD, Dataset, normalize_
from ..data.loader import Loader
from ..models.registry import build_model
from .distributed import Dist
from .optimizers import build_optimizer
from .step import TrainStep

CHANNELS_LAST = torch.channels_last


def train_loader(cfg: Config, images: torch.Tensor, labels: torch.Tensor, data: Dataset, device: torch.device,
                 dist: Dist | None = None) -> Loader:
    """Shuffled, augmented training batches of `cfg.batch_size` (under torchrun: this rank's share)."""
    return Loader(images, labels, cfg.batch_size, augment=cfg.augment, shuffle=True, seed=cfg.seed,
                  balanced=cfg.data.balance == "sampling", **_placement(data, device, dist))


def eval_loader(cfg: Config, images: torch.Tensor, labels: torch.Tensor, data: Dataset, device: torch.device,
                dist: Dist | None = None) -> Loader:
    """Validation or test batches of `cfg.eval_batch_size`, in order (under torchrun: this rank's shard)."""
    return Loader(images, labels, cfg.eval_batch_size, **_placement(data, device, dist))


def _placement(data: Dataset, device: torch.device, dist: Dist | None) -> dict:
    dist = dist or Dist()
    return {"rank": dist.rank, "world_size": dist.world_size, "device": device,
            "memory_format": CHANNELS_LAST, "mean": data.mean, "std": data.std}


def make_model(cfg: Config, num_classes: int, train_images: torch.Tensor, device: torch.device, *,
               mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> nn.Module:
    """The configured model for `num_classes` classes at the training images' size, seeded, initialized from
    the first `model.init_image_count` training images (normalized with the dataset's `mean` and `std`) when
    it declares any (the model contract, `models.contract.Model`), in channels_last on `device`."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, train_images.shape[-1])
    if model.init_image_count:
        model.init_from_data(normalize_(train_images[:model.init_image_count].float() / 255, mean, std))
    return model.to(device, memory_format=CHANNELS_LAST)


def make_step(cfg: Config, model: nn.Module, device: torch.device, precision: str, dist: Dist | None = None,
              train_mode: Callable[[nn.Module], object] = nn.Module.train,
              class_counts: torch.Tensor | None = None) -> TrainStep:
    """The training step of `model` with its optimizer, over the parameters that require a gradient now; under
    torchrun the step runs the model wrapped in DistributedDataParallel (sharing its parameters).
    `class_counts`: the training images per class, for `data.balance`."""
    trained = (dist or Dist()).wrap(model, cfg.sync_batchnorm)
    return TrainStep(trained, build_optimizer(cfg, model, device), cfg, device, precision, train_mode,
                     class_counts)
