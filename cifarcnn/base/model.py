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
    whiten_bias_epochs: int = 3  # 0: the whitening bias never trains (no gradient into the first conv block's input)


class FastBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale: only the shift is learned.

    Its eps travels in the state dict (key `eps`, a 0-d float32 tensor), so a checkpoint runs with the eps it
    was trained with: a state dict without one, written before eps was stored, loads with OLD_EPS."""

    OLD_EPS = 1e-12  # the eps of every FastBatchNorm before it was stored (it is 1e-5 since)

    def __init__(self, num_features: int, momentum: float):
        super().__init__(num_features, eps=1e-5, momentum=momentum)
        self.weight.requires_grad = False

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "eps"] = self.running_mean.new_tensor(self.eps)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        stored = state_dict.pop(prefix + "eps", None)  # load_state_dict passes its own copy of the dict
        super()._load_from_state_dict(state_dict, prefix, *args)
        # float32's shortest decimal: 1e-05 is read back as the float 1e-5 it was, not as 9.99999974737875e-06
        self.eps = self.OLD_EPS if stored is None else float(str(stored.detach().float().cpu().numpy()))


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
        self.blocks = self.make_blocks((config.whiten_width, *config.widths))
        self.head = ClassifierHead(config.widths[-1], config.num_classes, bias=False)
        # The whitening bias learns in the first epochs only, then stays (the trainer reads this).
        self.train_epochs = {"whiten.bias": config.whiten_bias_epochs} if config.whiten_bias_epochs else {}
        self.whiten.bias.requires_grad = bool(config.whiten_bias_epochs)

    def make_blocks(self, widths: tuple[int, ...]) -> nn.Sequential:
        """One block per step from widths[i] to widths[i + 1] channels, each halving the image side."""
        return nn.Sequential(*(FastBlock(a, b, self.config.bn_momentum) for a, b in zip(widths, widths[1:])))

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4, min_variance: float = 1e-2) -> None:
        """Set the whitening filters from normalised training images: the eigenvectors of the 2x2 patches'
        second moment (uncentred, as published), scaled by 1/sqrt(eigenvalue + eps), each followed by its
        negation.

        Only directions the images vary in are used: one whose whitened variance, (eigenvalue - the squared
        mean along it) / (eigenvalue + eps), is under `min_variance` is dropped, and the filters kept are
        repeated to fill the layer. Such a direction carries rounding noise, which 1/sqrt(eps) amplifies, or a
        constant: the 8 colour directions of grey-scale images, or a constant channel, which the dataset's
        rounded mean and floored std turn into a constant that need not be 0. Where every direction varies
        (CIFAR-10), all are kept and the filters are those of the plain method."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (n, c, h', w', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        moment = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
        variance = eigenvalues - (patches.mean(0) @ eigenvectors) ** 2  # along each eigenvector
        whitened = variance / (eigenvalues + eps)
        keep = whitened >= min_variance
        keep[whitened.argmax()] = True  # at least one: images of one colour have no direction that varies
        eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
        filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).reshape(-1, 3, k, k)
        filters = torch.cat([filters, -filters])
        filters = filters.repeat(-(-self.config.whiten_width // len(filters)), 1, 1, 1)[: self.config.whiten_width]
        self.whiten.weight.copy_(filters.to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.config.logit_scale


@dataclass
class FastNet96Config(FastNetConfig):
    """FastNet scaled up as in the published 96% method (Jordan 2024, airbench96): wider blocks, each with
    residual pairs of convs, and PyTorch's default BatchNorm momentum (the method dropped its custom one)."""
    widths: tuple[int, int, int] = (128, 384, 512)
    residual_pairs: int = 1  # per block; the published net has one (10 convs in all, the whitening included)
    bn_momentum: float = 0.1


class ResidualPair(nn.Module):
    """GELU(x + BN(conv(GELU(BN(conv(x)))))): two identity-initialised convs around a skip connection, the last
    activation after the sum."""

    def __init__(self, width: int, bn_momentum: float):
        super().__init__()
        self.conv1 = IdentityInitConv(width, width)
        self.norm1 = FastBatchNorm(width, bn_momentum)
        self.conv2 = IdentityInitConv(width, width)
        self.norm2 = FastBatchNorm(width, bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(x + self.norm2(self.conv2(y)))


class FastResBlock(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU, then `pairs` residual pairs at the new width."""

    def __init__(self, c_in: int, c_out: int, pairs: int, bn_momentum: float):
        super().__init__()
        self.conv = IdentityInitConv(c_in, c_out)
        self.norm = FastBatchNorm(c_out, bn_momentum)
        self.pairs = nn.Sequential(*(ResidualPair(c_out, bn_momentum) for _ in range(pairs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pairs(F.gelu(self.norm(F.max_pool2d(self.conv(x), 2))))


class FastNet96(FastNet):
    """FastNet with residual blocks (`--preset best`): the same whitening layer, initialisation, frozen BatchNorm
    scales and scaled head; blocks of conv, pool, BN, GELU and residual pairs. As in FastNet, the last pool is a
    global max over the 4x4 map (the published net's MaxPool2d(3) reads only its top-left 3x3 window)."""

    config: FastNet96Config

    def __init__(self, config: FastNet96Config):
        super().__init__(config)
        nn.init.zeros_(self.whiten.bias)  # the published method starts the whitening bias at zero

    def make_blocks(self, widths: tuple[int, ...]) -> nn.Sequential:
        pairs, momentum = self.config.residual_pairs, self.config.bn_momentum
        return nn.Sequential(*(FastResBlock(a, b, pairs, momentum) for a, b in zip(widths, widths[1:])))


@dataclass
class ResNetConfig:
    """The CIFAR ResNet-18 (He et al. 2016, as popularised by pytorch-cifar): a 3x3 stem conv, no max-pool, four
    stages of BasicBlocks, the first at stride 1 and the others halving the side."""
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 10


class BasicBlock(nn.Module):
    """ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
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


# name -> builder(num_classes, image_size); every model takes square RGB images of `image_size` pixels (the
# fully convolutional ones end in a global pool, so only SimpleCNN's first linear layer depends on the size).
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "simple_cnn": lambda num_classes, image_size: SimpleCNN(SimpleCNNConfig(num_classes=num_classes,
                                                                            image_size=image_size)),
    "fastnet": lambda num_classes, image_size: FastNet(FastNetConfig(num_classes=num_classes)),
    # the quick preset's net, sized for accuracy per CPU-second (docs/presets.md, "The quick preset")
    "quicknet": lambda num_classes, image_size: FastNet(FastNetConfig(widths=(48, 96, 96), whiten_bias_epochs=0,
                                                                      num_classes=num_classes)),
    "fastnet96": lambda num_classes, image_size: FastNet96(FastNet96Config(num_classes=num_classes)),
    "resnet18": lambda num_classes, image_size: ResNet(ResNetConfig(num_classes=num_classes)),
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
