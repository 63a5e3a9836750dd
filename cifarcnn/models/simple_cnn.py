"""SimpleCNN, the default recipe's net: three conv blocks and two fully connected layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import ClassifierHead, Model


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


class SimpleCNN(Model):
    """Three conv blocks (32/64/128 channels), then FC 2048 -> 512 -> classes at 32x32; the first FC layer
    takes the last block's output at any image size (128 x (size / 8)^2 inputs, rounded down)."""

    def __init__(self, config: SimpleCNNConfig):
        super().__init__()
        self.config = config
        widths = (3, *config.channels)
        self.blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in zip(widths, widths[1:])))
        side = config.image_size // 2 ** len(config.channels)
        if side < 1:
            raise ValueError(f"SimpleCNN needs images of at least {2 ** len(config.channels)} pixels, got "
                             f"{config.image_size}")
        self.fc1 = nn.Linear(config.channels[-1] * side * side, config.hidden)
        self.fc2 = ClassifierHead(config.hidden, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))
