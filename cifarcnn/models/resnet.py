"""ResNet-18 in its CIFAR form: a 3x3 stem conv, no max-pool, four stages of BasicBlocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import ClassifierHead, Model


@dataclass
class ResNetConfig:
    """Four stages of BasicBlocks, the first at stride 1 and the others halving the side."""
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 10


class BasicBlock(nn.Module):
    """ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN where the shape
    changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(Model):
    """stem (conv3x3 + BN + ReLU) -> stages of BasicBlocks -> global average pool -> linear head."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(nn.Conv2d(3, config.widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(config.widths[0]), nn.ReLU())
        stages, c_in = [], config.widths[0]
        for i, (width, count) in enumerate(zip(config.widths, config.blocks)):
            strides = [1 if i == 0 else 2] + [1] * (count - 1)
            stages.append(nn.Sequential(*(BasicBlock(c_in if j == 0 else width, width, s)
                                          for j, s in enumerate(strides))))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(config.widths[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
