"""CIFAR-10 and CIFAR-100 in the official python format: find the files or download the archive (MD5 checked,
extracted safely), read the batches with a restricted unpickler, and return them as a Dataset."""

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..base.progress import bar_disabled, on_terminal
from .dataset import DataError, Dataset

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
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


CIFAR10_FILES = CifarFiles("CIFAR-10", "CIFAR10_DIR", URL, MD5, ARCHIVE, FOLDER, TRAIN_FILES, TEST_FILE,
                           META_FILE)
CIFAR100_FILES = CifarFiles("CIFAR-100", "CIFAR100_DIR",
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz", "cifar-100-python",
                            ("train",), "test", "meta")


# --------------------------------------------------------------------------- finding and fetching the files

def resolve_data_root(data_dir: str | Path | None = None, env: str = "CIFAR10_DIR") -> Path:
    """--data-dir, else $CIFAR10_DIR (`env`: $CIFAR100_DIR for CIFAR-100), else ./data."""
    return Path(data_dir or os.environ.get(env) or "data")


def _how_to_point_at_a_copy(root: Path, files: CifarFiles = CIFAR10_FILES) -> str:
    return (f"put the {files.folder}/ folder or {files.archive} in {root}, or point --data-dir or "
            f"{files.env} at the folder that holds them")


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
            with response, tqdm(total=int(response.headers.get("Content-Length") or 0) or None,
                                unit="B", unit_scale=True, desc=f"downloading {dest.name}",
                                disable=bar_disabled()) as bar:
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
        raise DataError(f"{path}: file missing from the {files.title} folder; delete the folder to fetch it "
                        f"again, or {_how_to_point_at_a_copy(path.parent.parent, files)}")
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except _ForbiddenObject as e:
        raise DataError(f"{path}: refusing to load {e}: a {files.title} batch holds only arrays and lists, "
                        f"and this file would run code; replace it with a copy from the official archive"
                        ) from None
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
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else repr(type(data)))
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if not isinstance(labels, list) or len(labels) != len(data):
        count = len(labels) if isinstance(labels, list) else "no"
        raise DataError(f"{path}: expected {len(data)} '{label_key}' to match the images, found {count}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


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


def load_cifar100(data_dir: str | Path | None = None, *, labels: str = "fine",
                  download: bool = True) -> Dataset:
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
