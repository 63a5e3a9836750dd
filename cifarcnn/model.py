"""Model architectures and the registry that builds them by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SimpleCNNConfig:
    channels: tuple[int, ...] = (32, 64, 128)
    hidden: int = 512
    num_classes: int = 10
    image_size: int = 32


class ConvBlock(nn.Module):
    """conv3x3 (padding 1) -> BatchNorm -> ReLU -> max-pool 2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)


class SimpleCNN(nn.Module):
    """Three conv blocks (32/64/128 channels), then FC 2048 -> 512 -> classes."""

    def __init__(self, config: SimpleCNNConfig):
        super().__init__()
        self.config = config
        widths = (3, *config.channels)
        self.blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in zip(widths, widths[1:])))
        side = config.image_size // 2 ** len(config.channels)
        self.fc1 = nn.Linear(config.channels[-1] * side * side, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "simple_cnn": lambda num_classes: SimpleCNN(SimpleCNNConfig(num_classes=num_classes)),
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a registered architecture; add new ones to MODELS."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
