"""The train/validation split and the Loader serving batches, with its augmentation.

The whole dataset lives as one uint8 tensor on the training device. Batches are picked, augmented
(flip, padded crop, brightness/contrast jitter, cutout, independent parameters per image) and normalized there
with a few vectorized ops, a whole epoch at a time. Randomness is keyed by (seed, epoch), so any batch of
any epoch can be reproduced without replaying the epochs before it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..base.config import AugmentConfig, DataConfig
from ..base.errors import ConfigError
from .dataset import MEAN, STD, Dataset, normalize_
from .splits import hash_held_out


def val_count(val_size: int | float | str, n: int) -> int:
    """How many of `n` training images `data.val_size` holds out for validation: auto is a tenth (5,000 of
    CIFAR's 50,000), a fraction that share (rounded), a number itself."""
    if val_size == "auto":
        return n // 10
    if isinstance(val_size, float):
        return round(n * val_size)
    return int(val_size)


def validation_mask(data: Dataset, cfg: DataConfig) -> torch.Tensor | None:
    """Which training images are validation images (None: no validation set). CIFAR: a seeded random choice of
    `val_count` images. A folder dataset: each image by its keyed path hash (`splits.hash_held_out`), the
    fraction being val_size's (auto: 0.1; a number N: N / the training images), so files coming and going move
    no image."""
    n = len(data.train_images)
    count = val_count(cfg.val_size, n)
    if not count:
        return None
    if not 0 < count < n:
        raise ConfigError(f"config key 'data.val_size' is {cfg.val_size}, but it must be between 1 and the "
                          f"{n} training images minus one (or 0: no validation set), e.g. "
                          f"data.val_size={n // 10}")
    if data.train_ids is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[perm[:count]] = True
        return mask
    fraction = (cfg.val_size if isinstance(cfg.val_size, float)
                else 0.1 if cfg.val_size == "auto" else count / n)
    held = hash_held_out(data.train_ids, data.train_labels.numpy(), fraction, cfg.split_seed, b"val")
    return torch.from_numpy(held) if held.any() else None


def training_split(data: Dataset, cfg: DataConfig
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """The (images, labels) to train on and the validation pair held out of them (None without validation)."""
    return split_by_mask(data, validation_mask(data, cfg))


def split_by_mask(data: Dataset, mask: torch.Tensor | None
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """`training_split` for a `validation_mask` already computed."""
    if mask is None:
        return (data.train_images, data.train_labels), None
    return ((data.train_images[~mask], data.train_labels[~mask]),
            (data.train_images[mask], data.train_labels[mask]))


# --------------------------------------------------------------------------- augmentation and batching

def _source_positions(starts: torch.Tensor, positions: torch.Tensor, size: int, padding: int, reflect: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop windows starting at `starts` (n, 1) of an image side padded by `padding`: the unpadded position
    each output position reads (n, size), and whether it lies inside the image (False: zero padding)."""
    source = starts + positions - padding
    inside = (source >= 0) & (source < size)
    if reflect:  # mirror about the first and last pixel, as F.pad(mode="reflect") does
        source = source.abs()
        source = torch.where(source > size - 1, 2 * (size - 1) - source, source)
    return source.clamp(0, size - 1), inside


def crop_and_flip(images: torch.Tensor, padding: int, mode: str, flips: torch.Tensor | None,
                  generator: torch.Generator) -> torch.Tensor:
    """Each uint8 image padded by `padding` (zeros or reflection), cropped back at its own random offset and
    mirrored where `flips` says, as one gather; returns channels_last uint8."""
    n, c, h, w = images.shape
    dev = images.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator)
    columns = torch.arange(w, device=dev).expand(n, w)
    if flips is not None:  # a mirrored crop reads its columns right to left
        columns = torch.where(flips[:, None], w - 1 - columns, columns)
    reflect = mode == "reflect"
    rows, rows_inside = _source_positions(dy, torch.arange(h, device=dev), h, padding, reflect)
    cols, cols_inside = _source_positions(dx, columns, w, padding, reflect)
    # Indexed as (n, h, w, c): the result, permuted to (n, c, h, w), is channels_last without another copy.
    out = images[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev),
                 rows[:, :, None, None], cols[:, None, :, None]]
    if padding and not reflect:
        out *= (rows_inside[:, :, None, None] & cols_inside[:, None, :, None])
    return out.permute(0, 3, 1, 2)


def _uniform_factors(n: int, spread: float, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, 1, 1, 1, device=device, generator=generator)
    return 1 + spread * (2 * u - 1)


def color_jitter_(x: torch.Tensor, brightness: float, contrast: float,
                  generator: torch.Generator) -> torch.Tensor:
    """In place: brightness then contrast, factors uniform in [1-s, 1+s] per image, on floats in [0, 1]."""
    if brightness:
        x.mul_(_uniform_factors(len(x), brightness, x.device, generator)).clamp_(0, 1)
    if contrast:  # blend with the image's mean gray level: f * x + (1 - f) * mean
        gray = (x.mean((2, 3)) @ x.new_tensor([0.299, 0.587, 0.114]))[:, None, None, None]
        factors = _uniform_factors(len(x), contrast, x.device, generator)
        x.mul_(factors).add_((1 - factors) * gray).clamp_(0, 1)
    return x


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Floats in [0, 1] with one `size` x `size` square per image, at a random position wholly inside it, set
    to the dataset's mean colour, which normalization maps to zero (as the published method zeroes normalized
    pixels)."""
    n, c, h, w = x.shape
    size = min(size, h, w)
    top = torch.randint(0, h - size + 1, (n, 1, 1), device=x.device, generator=generator)
    left = torch.randint(0, w - size + 1, (n, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    square = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)  # (n, h, w)
    return torch.where(square[:, None], x.new_tensor(MEAN)[None, :, None, None], x)


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator,
            flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images -> augmented floats in [0, 1]: padded crop, horizontal flip, brightness, contrast, cutout,
    each image with its own random parameters.

    `flips` (bool per image) overrides the coin toss, for alternating flips; otherwise each image has a 50%
    chance of being mirrored.
    """
    if cfg.flip == "random" and flips is None:
        flips = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    elif cfg.flip == "none":
        flips = None
    if cfg.crop_padding or flips is not None:
        images = crop_and_flip(images, cfg.crop_padding, cfg.padding_mode, flips, generator)
    x = color_jitter_(images.float().div_(255), cfg.brightness, cfg.contrast, generator)
    return cutout(x, cfg.cutout, generator) if cfg.cutout else x


class Loader:
    """Shuffled, normalized batches from uint8 images kept on `device`; augmented when `augment` is set,
    normalized with the dataset's `mean` and `std` (default CIFAR-10's).

    Each epoch's images are gathered, augmented and normalized at its start in a few vectorized ops, and its
    batches are slices of that one tensor: no work per batch beyond a view, so a GPU never waits on launches.

    `epoch(e, start_step)` is a pure function of (seed, e): the same batches, augmented the same way, whether
    an epoch runs whole or resumes half way. With alternating flips, each image is mirrored in every other
    epoch, starting from a random half of the images.

    Under torchrun (`world_size` > 1) `batch_size` is the global batch: every rank walks the same permutation
    and takes every `world_size`-th image of each batch from position `rank`, so the ranks' shards are
    disjoint and together cover each batch exactly once.

    `balanced` (with `shuffle`; `data.balance: sampling`): each epoch is as many images drawn with
    replacement, every class equally likely and every image equally likely within its class.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 device: torch.device | str, augment: AugmentConfig | None = None, shuffle: bool = False,
                 seed: int = 0, memory_format: torch.memory_format = torch.contiguous_format, rank: int = 0,
                 world_size: int = 1, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD,
                 balanced: bool = False):
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.rank, self.world_size = rank, world_size
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self._draw_weights = None  # balanced: each image's chance, 1 / its class's count
        if balanced:
            self._draw_weights = 1 / torch.bincount(self.labels)[self.labels].double()
        self.memory_format = memory_format
        self._generator = torch.Generator(device=self.device)
        self._first_flips = torch.rand(len(images), device=self.device, generator=self._keyed(-2)) < 0.5
        # Which positions of an epoch's order are this rank's, and where each of its batches starts among
        # them.
        position = torch.arange(len(images))
        mine = position % batch_size % world_size == rank
        self._positions = position[mine].to(self.device)
        per_batch = torch.bincount(position[mine] // batch_size, minlength=len(self))
        self._bounds = [0, *per_batch.cumsum(0).tolist()]

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def _keyed(self, *key: int) -> torch.Generator:
        return self._generator.manual_seed(hash((self.seed, *key)) & (2**63 - 1))

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        if self._draw_weights is not None:
            return torch.multinomial(self._draw_weights, n, replacement=True,
                                     generator=self._keyed(epoch, -1))
        return torch.randperm(n, device=self.device, generator=self._keyed(epoch, -1))

    def epoch(self, epoch: int, start_step: int = 0,
              order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of `epoch` from `start_step` on; `order` (default `self.order(epoch)`) is the
        epoch's permutation, e.g. the one a mid-epoch checkpoint saved."""
        order = self.order(epoch) if order is None else order.to(self.device)
        idx = order[self._positions]
        images = self.images[idx]
        if self.augment is None:
            x = images.float().div_(255)
        else:
            flips = self._first_flips[idx] ^ bool(epoch % 2) if self.augment.flip == "alternate" else None
            # Each rank draws its own augmentation; a single process keeps the (seed, epoch) key.
            key = () if self.world_size == 1 else (self.rank,)
            x = augment(images, self.augment, self._keyed(epoch, *key), flips)
        x = normalize_(x, self.mean, self.std).contiguous(memory_format=self.memory_format)
        labels = self.labels[idx]
        for step in range(start_step, len(self)):
            start, end = self._bounds[step], self._bounds[step + 1]
            yield x[start:end], labels[start:end]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
