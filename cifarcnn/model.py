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


class ClassifierHead(nn.Linear):
    """The last linear layer, computed in fp32 even under bf16 autocast: bf16 logits carry about three significant
    digits, so two close classes would often tie, and the loss would see rounded logits. (Under no autocast,
    e.g. in an ONNX export, it is a plain Linear.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class SimpleCNN(nn.Module):
    """Three conv blocks (32/64/128 channels), then FC 2048 -> 512 -> classes at 32x32; the first FC layer takes
    the last block's output at any image size (128 x (size / 8)^2 inputs, rounded down)."""

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


@dataclass
class FastNetConfig:
    widths: tuple[int, int, int] = (64, 256, 256)
    whiten_width: int = 24  # 2 x the 12 dimensions of a 2x2x3 patch: each whitening filter and its negation
    num_classes: int = 10
    bn_momentum: float = 0.4
    logit_scale: float = 1 / 9
    whiten_bias_epochs: int = 3


class FastBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale: only the shift is learned."""

    def __init__(self, num_features: int, momentum: float):
        super().__init__(num_features, eps=1e-12, momentum=momentum)
        self.weight.requires_grad = False


class IdentityInitConv(nn.Conv2d):
    """conv3x3 without bias whose first c_in filters start as the identity, so each block starts near a skip."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


class FastBlock(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = IdentityInitConv(c_in, c_out)
        self.norm1 = FastBatchNorm(c_out, bn_momentum)
        self.conv2 = IdentityInitConv(c_out, c_out)
        self.norm2 = FastBatchNorm(c_out, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """The speed-record style network (after Page 2018 and Jordan 2024): a frozen 2x2 patch-whitening layer
    set from the training data, three identity-initialised conv blocks, global max-pool, a scaled linear head.
    The global pool makes it work at any image size of 16 pixels or more."""

    def __init__(self, config: FastNetConfig):
        super().__init__()
        self.config = config
        self.whiten = nn.Conv2d(3, config.whiten_width, kernel_size=2, bias=True)
        self.whiten.weight.requires_grad = False
        widths = (config.whiten_width, *config.widths)
        self.blocks = nn.Sequential(*(FastBlock(a, b, config.bn_momentum) for a, b in zip(widths, widths[1:])))
        self.head = ClassifierHead(widths[-1], config.num_classes, bias=False)
        # The whitening bias learns in the first epochs only, then stays (the trainer reads this).
        self.train_epochs = {"whiten.bias": config.whiten_bias_epochs}

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images: the eigenvectors of the 2x2 patch
        covariance, scaled by 1/sqrt(eigenvalue), each followed by its negation."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (n, c, h', w', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).reshape(-1, 3, k, k)
        filters = torch.cat([filters, -filters])[: self.config.whiten_width]
        self.whiten.weight.copy_(filters.to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.config.logit_scale


# name -> builder(num_classes, image_size); every model takes square RGB images of `image_size` pixels.
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "simple_cnn": lambda num_classes, image_size: SimpleCNN(SimpleCNNConfig(num_classes=num_classes,
                                                                            image_size=image_size)),
    "fastnet": lambda num_classes, image_size: FastNet(FastNetConfig(num_classes=num_classes)),
}


def build_model(name: str, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """Build a registered architecture for `num_classes` classes and `image_size` x `image_size` inputs; add new
    ones to MODELS."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, image_size)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
