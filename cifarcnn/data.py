"""CIFAR-10 and CIFAR-100: find or download the official python-format files, read them safely; the Dataset every
source ends as (folder datasets are read by folders.py); the train/validation split; and the Loader serving batches.

The whole dataset lives as one uint8 tensor on the training device. Batches are picked, augmented
(flip, padded crop, brightness/contrast jitter, cutout, independent parameters per image) and normalised there
with a few vectorised ops, a whole epoch at a time. Randomness is keyed by (seed, epoch), so any batch of
any epoch can be reproduced without replaying the epochs before it.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import AugmentConfig, DataConfig
from .errors import ConfigError, UserError
from .progress import bar_disabled, on_terminal

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)
# CIFAR-100's training-set mean and std per channel (over all pixels, as CIFAR-10's above)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class DataError(UserError):
    exit_code = 1


@dataclass(frozen=True)
class CifarFiles:
    """Where one CIFAR version is published and how its official python-format copy is laid out."""

    title: str
    env: str  # the environment variable naming its data root
    url: str
    md5: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str


CIFAR10_FILES = CifarFiles("CIFAR-10", "CIFAR10_DIR", URL, MD5, ARCHIVE, FOLDER, TRAIN_FILES, TEST_FILE, META_FILE)
CIFAR100_FILES = CifarFiles("CIFAR-100", "CIFAR100_DIR", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz", "cifar-100-python",
                            ("train",), "test", "meta")


# --------------------------------------------------------------------------- finding and fetching the files

def resolve_data_root(data_dir: str | Path | None = None, env: str = "CIFAR10_DIR") -> Path:
    """--data-dir, else $CIFAR10_DIR (`env`: $CIFAR100_DIR for CIFAR-100), else ./data."""
    return Path(data_dir or os.environ.get(env) or "data")


def _how_to_point_at_a_copy(root: Path, files: CifarFiles = CIFAR10_FILES) -> str:
    return (f"put the {files.folder}/ folder or {files.archive} in {root}, or point --data-dir or {files.env} "
            f"at the folder that holds them")


def locate_cifar(root: Path, files: CifarFiles, *, download: bool = True, url: str | None = None,
                 md5: str | None = None) -> Path:
    """Return the folder holding `files`' batch files under `root`, extracting or downloading as needed."""
    root, url, md5 = Path(root), url or files.url, md5 or files.md5
    if (root / files.train_files[0]).is_file() or (root / files.meta_file).is_file():
        return root  # root is the batches folder itself
    folder = root / files.folder
    if folder.is_dir():
        return folder
    archive = root / files.archive
    if not archive.exists():
        if not download:
            raise DataError(f"no {files.title} copy in {root}: {_how_to_point_at_a_copy(root, files)}")
        download_file(url, archive, md5, files)
    elif file_md5(archive) != md5:
        raise DataError(f"{archive}: MD5 does not match the official archive ({md5}); the file is "
                        f"truncated or not {files.title}. Delete it to download it again, or "
                        f"{_how_to_point_at_a_copy(root, files)}")
    extract_archive(archive, root)
    if not folder.is_dir():
        raise DataError(f"{archive} does not contain a {files.folder}/ folder")
    return folder


def locate_cifar10(root: Path, *, download: bool = True, url: str = URL, md5: str = MD5) -> Path:
    """The CIFAR-10 batches folder under `root` (see `locate_cifar`)."""
    return locate_cifar(root, CIFAR10_FILES, download=download, url=url, md5=md5)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, files: CifarFiles = CIFAR10_FILES) -> None:
    """Download `url` to `dest` with a progress bar, check its MD5, and only then move it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=30)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise DataError(f"could not download {files.title} from {url} ({reason}). If this machine is "
                                f"offline, {_how_to_point_at_a_copy(dest.parent, files)}") from None
            if not on_terminal():  # a log gets this line instead of the bar
                print(f"downloading {url}", file=sys.stderr, flush=True)
            with response, tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                                unit_scale=True, desc=f"downloading {dest.name}", disable=bar_disabled()) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = file_md5(Path(tmp))
        if got != md5:
            raise DataError(f"downloaded {url} but its MD5 is {got}, expected {md5}: the download was "
                            f"corrupted or truncated; run the command again")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def extract_archive(archive: Path, root: Path) -> None:
    """Extract into a temp folder beside the target, refusing members that would land outside it, then
    rename into place, so an interrupted extraction never leaves a half-written dataset."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extracting-"))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter=_safe_member)
        except tarfile.FilterError as e:
            raise DataError(f"{archive}: refusing to extract an unsafe member ({e})") from None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{archive}: cannot extract ({e}); delete it and try again") from None
        for entry in tmp.iterdir():
            target = root / entry.name
            if not target.exists():
                os.rename(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (no `..` escapes, no links pointing out, no devices), and absolute names are
    refused outright rather than silently made relative."""
    if member.name.startswith(("/", os.sep)) or os.path.isabs(member.name):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


# --------------------------------------------------------------------------- reading the batch files

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class _ForbiddenObject(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """The batches are pickles; allow only what a numpy array needs, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes at protocol 2
            return codecs.encode
        raise _ForbiddenObject(f"{module}.{name}")


def _unpickle(path: Path, files: CifarFiles = CIFAR10_FILES) -> dict:
    if not path.exists():
        raise DataError(f"{path}: file missing from the {files.title} folder; delete the folder to fetch it again, "
                        f"or {_how_to_point_at_a_copy(path.parent.parent, files)}")
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except _ForbiddenObject as e:
        raise DataError(f"{path}: refusing to load {e}: a {files.title} batch holds only arrays and lists, and "
                        f"this file would run code; replace it with a copy from the official archive") from None
    except Exception as e:  # truncation and corruption surface as many different exception types
        raise DataError(f"{path}: not a readable {files.title} batch file, it is truncated or corrupt "
                        f"({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a {files.title} batch file (holds a {type(obj).__name__}, not a dict)")
    return obj


def read_batch(path: Path, label_key: str = "labels", num_classes: int = len(CLASSES),
               files: CifarFiles = CIFAR10_FILES) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one batch file, with every field checked; the
    labels are `label_key` (CIFAR-100: fine_labels or coarse_labels), each below `num_classes`."""
    batch = _unpickle(path, files)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else repr(type(data))
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if not isinstance(labels, list) or len(labels) != len(data):
        count = len(labels) if isinstance(labels, list) else "no"
        raise DataError(f"{path}: expected {len(data)} '{label_key}' to match the images, found {count}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


@dataclass
class Dataset:
    """What every dataset ends as: uint8 images (N, 3, S, S) and int64 labels, its class names, the per-channel
    mean and std its images are normalised with, and a name for titles and checkpoints."""

    train_images: torch.Tensor  # (N, 3, S, S) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = "CIFAR-10"
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


def load_cifar10(data_dir: str | Path | None = None, *, download: bool = True) -> Dataset:
    folder = locate_cifar10(resolve_data_root(data_dir), download=download)
    meta = _unpickle(folder / META_FILE)
    classes = tuple(meta.get("label_names") or CLASSES)
    if len(classes) != len(CLASSES):
        raise DataError(f"{folder / META_FILE}: expected {len(CLASSES)} class names, found {len(classes)}")
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_x, test_y = read_batch(folder / TEST_FILE)
    return Dataset(
        train_images=torch.from_numpy(np.concatenate([x for x, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_images=torch.from_numpy(test_x),
        test_labels=torch.from_numpy(test_y),
        classes=classes,
    )


def load_cifar100(data_dir: str | Path | None = None, *, labels: str = "fine", download: bool = True) -> Dataset:
    """CIFAR-100 with its 100 fine labels, or (`labels="coarse"`) its 20 superclasses."""
    files = CIFAR100_FILES
    folder = locate_cifar(resolve_data_root(data_dir, files.env), files, download=download)
    count = 100 if labels == "fine" else 20
    names = _unpickle(folder / files.meta_file, files).get(f"{labels}_label_names")
    if not isinstance(names, list) or len(names) != count:
        found = len(names) if isinstance(names, list) else "no"
        raise DataError(f"{folder / files.meta_file}: expected {count} '{labels}_label_names', found {found}")
    train_x, train_y = read_batch(folder / files.train_files[0], f"{labels}_labels", count, files)
    test_x, test_y = read_batch(folder / files.test_file, f"{labels}_labels", count, files)
    return Dataset(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                   torch.from_numpy(test_y), tuple(map(str, names)),
                   name="CIFAR-100" if labels == "fine" else "CIFAR-100 superclasses",
                   mean=CIFAR100_MEAN, std=CIFAR100_STD)


def split_train_val(images: torch.Tensor, labels: torch.Tensor, val_size: int, seed: int
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A random (train, val) split of the training set, the same for the same seed."""
    n = len(images)
    if not 0 < val_size < n:
        raise ConfigError(f"config key 'data.val_size' is {val_size}, but it must be between 1 and the "
                          f"{n} training images minus one (or 0: no validation set), e.g. data.val_size={n // 10}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def training_split(data: Dataset, cfg: DataConfig
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """The (images, labels) to train on and the validation pair held out of them (None when val_size is 0)."""
    if not cfg.val_size:
        return (data.train_images, data.train_labels), None
    return split_train_val(data.train_images, data.train_labels, cfg.val_size, cfg.split_seed)


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


def color_jitter_(x: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator) -> torch.Tensor:
    """In place: brightness then contrast, factors uniform in [1-s, 1+s] per image, on floats in [0, 1]."""
    if brightness:
        x.mul_(_uniform_factors(len(x), brightness, x.device, generator)).clamp_(0, 1)
    if contrast:  # blend with the image's mean gray level: f * x + (1 - f) * mean
        gray = (x.mean((2, 3)) @ x.new_tensor([0.299, 0.587, 0.114]))[:, None, None, None]
        factors = _uniform_factors(len(x), contrast, x.device, generator)
        x.mul_(factors).add_((1 - factors) * gray).clamp_(0, 1)
    return x


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Floats in [0, 1] with one `size` x `size` square per image, at a random position wholly inside it, set to
    the dataset's mean colour, which normalisation maps to zero (as the published method zeroes normalised
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


def normalize_(x: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """In place: per-channel mean and std (by default CIFAR-10's)."""
    return x.sub_(x.new_tensor(mean)[None, :, None, None]).div_(x.new_tensor(std)[None, :, None, None])


def denormalize(x: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    return (x * x.new_tensor(std)[None, :, None, None] + x.new_tensor(mean)[None, :, None, None]).clamp(0, 1)


class Loader:
    """Shuffled, normalised batches from uint8 images kept on `device`; augmented when `augment` is set, normalised
    with the dataset's `mean` and `std` (default CIFAR-10's).

    Each epoch's images are gathered, augmented and normalised at its start in a few vectorised ops, and its
    batches are slices of that one tensor: no work per batch beyond a view, so a GPU never waits on launches.

    `epoch(e, start_step)` is a pure function of (seed, e): the same batches, augmented the same way, whether an
    epoch runs whole or resumes half way. With alternating flips, each image is mirrored in every other epoch,
    starting from a random half of the images.

    Under torchrun (`world_size` > 1) `batch_size` is the global batch: every rank walks the same permutation
    and takes every `world_size`-th image of each batch from position `rank`, so the ranks' shards are disjoint
    and together cover each batch exactly once.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, device: torch.device | str,
                 augment: AugmentConfig | None = None, shuffle: bool = False, seed: int = 0,
                 memory_format: torch.memory_format = torch.contiguous_format, rank: int = 0, world_size: int = 1,
                 mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD):
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.rank, self.world_size = rank, world_size
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.memory_format = memory_format
        self._generator = torch.Generator(device=self.device)
        self._first_flips = torch.rand(len(images), device=self.device, generator=self._keyed(-2)) < 0.5
        # Which positions of an epoch's order are this rank's, and where each of its batches starts among them.
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
