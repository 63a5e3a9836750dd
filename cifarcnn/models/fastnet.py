"""FastNet, the speed-record style network of the fast and quick presets, and FastNet96, its residual version
for the best preset: a frozen 2x2 patch-whitening layer set from the training data, identity-initialized conv
blocks with frozen BatchNorm scales, a global max-pool and a scaled linear head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import ClassifierHead, Model


@dataclass
class FastNetConfig:
    widths: tuple[int, int, int] = (64, 256, 256)
    whiten_width: int = 24  # 2 x the 12 dimensions of a 2x2x3 patch: each whitening filter and its negation
    whiten_images: int = 5000  # the whitening is set from the first this many training images
    num_classes: int = 10
    bn_momentum: float = 0.4
    logit_scale: float = 1 / 9
    whiten_bias_epochs: int = 3  # 0: the whitening bias never trains (no backward into the whitening layer)


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
    """conv3x3 without bias whose first c_in filters start as the identity: each block starts near a skip."""

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


class FastNet(Model):
    """A frozen 2x2 patch-whitening layer set from the training data (init_from_data), three
    identity-initialized conv blocks, global max-pool, a scaled linear head. The global pool makes it work at
    any image size of 16 pixels or more. The whitening bias trains for its first `whiten_bias_epochs` epochs
    only (train_epochs)."""

    def __init__(self, config: FastNetConfig):
        limited = {"whiten.bias": config.whiten_bias_epochs} if config.whiten_bias_epochs else {}
        super().__init__(train_epochs=limited, init_image_count=config.whiten_images)
        self.config = config
        self.whiten = nn.Conv2d(3, config.whiten_width, kernel_size=2, bias=True)
        self.whiten.weight.requires_grad = False
        self.blocks = self.make_blocks((config.whiten_width, *config.widths))
        self.head = ClassifierHead(config.widths[-1], config.num_classes, bias=False)
        self.whiten.bias.requires_grad = bool(config.whiten_bias_epochs)

    def make_blocks(self, widths: tuple[int, ...]) -> nn.Sequential:
        """One block per step from widths[i] to widths[i + 1] channels, each halving the image side."""
        momentum = self.config.bn_momentum
        return nn.Sequential(*(FastBlock(a, b, momentum) for a, b in zip(widths, widths[1:])))

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4, min_variance: float = 1e-2) -> None:
        """Set the whitening filters from normalized training images: the eigenvectors of the 2x2 patches'
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
        width = self.config.whiten_width
        filters = filters.repeat(-(-width // len(filters)), 1, 1, 1)[:width]
        self.whiten.weight.copy_(filters.to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.config.logit_scale


@dataclass
class FastNet96Config(FastNetConfig):
    """FastNet scaled up (`--preset best`): wider blocks, each with residual pairs of convs, and PyTorch's
    default BatchNorm momentum."""
    widths: tuple[int, int, int] = (128, 384, 512)
    residual_pairs: int = 1  # per block (one: 10 convs in all, the whitening included)
    bn_momentum: float = 0.1


class ResidualPair(nn.Module):
    """GELU(x + BN(conv(GELU(BN(conv(x)))))): two identity-initialized convs around a skip connection, the
    last activation after the sum."""

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
    """FastNet with residual blocks: the same whitening layer (its bias starting at zero), initialization,
    frozen BatchNorm scales, scaled head and global max-pool; blocks of conv, pool, BN, GELU and residual
    pairs."""

    config: FastNet96Config

    def __init__(self, config: FastNet96Config):
        super().__init__(config)
        nn.init.zeros_(self.whiten.bias)

    def make_blocks(self, widths: tuple[int, ...]) -> nn.Sequential:
        pairs, momentum = self.config.residual_pairs, self.config.bn_momentum
        return nn.Sequential(*(FastResBlock(a, b, pairs, momentum) for a, b in zip(widths, widths[1:])))
