"""Folder datasets: labelled image files in DIR/train/<class>/... and DIR/test/<class>/... (any depth below a
class folder, the formats `predict` reads), turned into the same uint8 Dataset as CIFAR.

Each file goes through predict's preprocessing (`images.load_image`) to `data.image_size`, once: files are
decoded in parallel into a cache (DIR/.cifarcnn-cache/images-SIZE.npz, or the user's cache folder when DIR is
read-only) keyed by their paths, sizes and modification times, so a later run decodes only new or changed
files. Unreadable files are listed and left out, and tried again on the next run. Without test/,
`data.test_fraction` of each class is held out as the test set by a keyed hash of each file's path
(splits.py), so files added, removed or renamed never move another image to the other side. Mean and std come
from the training images. The memory the dataset needs is estimated, and checked against the device's, before
anything is decoded.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..base.config import DataConfig
from ..base.errors import ConfigError
from ..base.progress import bar_disabled
from ..base.storage import StorageError, atomic_write
from .dataset import DataError, Dataset
from .images import read_image, walk_images
from .splits import hash_held_out

CACHE_DIR = ".cifarcnn-cache"
CACHE_VERSION = 1
MAX_LISTED = 20  # unreadable files listed by name; any more are counted
# Bytes per pixel of a training image while it is used: 1 as the stored uint8 image, about 10 more for one
# epoch's gathered, augmented and normalized float32 copies.
TRAIN_BYTES_PER_PIXEL = 11


@dataclass
class Scan:
    """The image files under a folder dataset, before decoding: (file, class folder name) pairs."""

    root: Path
    train: list[tuple[Path, str]]
    test: list[tuple[Path, str]] | None  # None: no test/ folder
    notes: list[str]


def scan_folder(root: Path) -> Scan:
    """Find the class folders and their image files; what is left out goes to `notes`."""
    if not root.is_dir():
        raise ConfigError(f"config key 'data.path': {root} is not a folder (it should hold train/<class>/ "
                          f"and optionally test/<class>/)")
    notes: list[str] = []
    train_root, test_root = root / "train", root / "test"
    if train_root.is_dir():
        extras = sorted(p.name for p in root.iterdir()
                        if p.name not in ("train", "test") and p.name[0] != ".")
        if extras:
            notes.append(f"left out {len(extras)} entr{'y' if len(extras) == 1 else 'ies'} at the top level "
                         f"of {root} ({', '.join(extras[:5])}{', ...' if len(extras) > 5 else ''}): only "
                         f"train/ and test/ are read")
    elif test_root.is_dir():
        raise DataError(f"{root} has a test/ folder but no train/ folder: put the training images in "
                        f"{train_root}/<class>/")
    else:
        train_root, test_root = root, None
        notes.append(f"{root} has no train/ folder: its class folders are the training set")
    train = _class_files(train_root, notes)
    test = _class_files(test_root, notes) if test_root is not None and test_root.is_dir() else None
    return Scan(root, train, test, notes)


def _class_files(folder: Path, notes: list[str]) -> list[tuple[Path, str]]:
    """(file, class) for the image files in each class folder of `folder`, sorted."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    loose = [p.name for p in entries if not p.is_dir()]
    if loose:
        notes.append(f"left out {len(loose)} file(s) directly in {folder}, outside any class folder "
                     f"({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}): put each image in "
                     f"{folder}/<class>/")
    pairs, skipped = [], 0
    for class_dir in (p for p in entries if p.is_dir()):
        files, others = walk_images(class_dir)
        skipped += others
        if not files:
            notes.append(f"class folder {class_dir} holds no image files: left out")
        pairs += [(f, class_dir.name) for f in files]
    if skipped:
        notes.append(f"skipped {skipped} file(s) without an image extension in the class folders of {folder}")
    return pairs


# --------------------------------------------------------------------------- memory

def _bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _available_bytes(device: torch.device | None) -> int | None:
    """Free memory on `device` (None: this machine's RAM), or None when it cannot be told."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device is not None and device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def memory_needed(num_images: int, num_train: int, size: int, device: torch.device | None) -> int:
    """Bytes the dataset needs on `device`: the uint8 images plus an epoch's float copies of the training
    images; in host memory while decoding (device None), about three uint8 copies (decoded, cached,
    rearranged). On the CPU both happen in the same memory, so the larger counts."""
    pixels = 3 * size * size
    decoding = 3 * pixels * num_images
    if device is None:
        return decoding
    training = pixels * (num_images + (TRAIN_BYTES_PER_PIXEL - 1) * num_train)
    return max(decoding, training) if device.type == "cpu" else training


def check_memory(num_images: int, num_train: int, size: int, device: torch.device | None) -> None:
    """Stop before decoding when the dataset cannot fit: the estimate, what is free, and what to change."""
    # None stands for host memory while decoding; on the CPU, training uses that same memory
    targets = [device] if device is None or device.type == "cpu" else [None, device]
    for target in targets:
        available = _available_bytes(target)
        need = memory_needed(num_images, num_train, size, target)
        if available is None or need <= available:
            continue
        where = f"on {target}" if target is not None else "in this machine's memory while decoding"
        smaller = [s for s in (256, 192, 128, 96, 64, 48, 32, 16)
                   if s < size and memory_needed(num_images, num_train, s, target) <= available]
        advice = (f"lower data.image_size (data.image_size={smaller[0]} needs about "
                  f"{_bytes(memory_needed(num_images, num_train, smaller[0], target))}), or "
                  if smaller else "")
        raise DataError(f"the folder dataset's {num_images:,} images at {size}x{size} need about "
                        f"{_bytes(need)} {where}, but only {_bytes(available)} is free: {advice}train on "
                        f"fewer images"
                        + (" or on a device with more memory (--device)" if target is not None else ""))


# --------------------------------------------------------------------------- decoding and the cache

def _cache_dirs(root: Path) -> list[Path]:
    """Where the cache may live: inside the dataset folder, else (read-only folder) in the user's cache
    folder."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifarcnn" / "folders"
    return [root / CACHE_DIR, user / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"]


def relative_paths(files: list[Path], root: Path) -> list[str]:
    """Each file's path relative to the dataset root, with / between folders: its key in the cache and the
    split."""
    prefix = len(str(root)) + 1  # every file was found by walking the root
    return [str(path)[prefix:].replace(os.sep, "/") for path in files]


def _file_keys(files: list[Path], root: Path) -> list[tuple[str, int, int]]:
    """(path relative to the root, size, modification time in ns) per file: what a cache entry must match."""
    keys = []
    for path, relative in zip(map(str, files), relative_paths(files, root)):
        try:
            st = os.stat(path)
            keys.append((relative, st.st_size, st.st_mtime_ns))
        except OSError:
            keys.append((relative, -1, -1))  # never matches: decoding reports why
    return keys


def _read_cache(root: Path, size: int
                ) -> tuple[dict[tuple[str, int, int], int], np.ndarray, list[str]] | None:
    """(key -> row, images, errors) from the first readable cache file for this image size, or None."""
    for folder in _cache_dirs(root):
        path = folder / f"images-{size}.npz"
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as saved:
                if int(saved["version"]) != CACHE_VERSION:
                    continue
                images = saved["images"]  # each access reads the file again
                keys = zip(saved["paths"].tolist(), saved["sizes"].tolist(), saved["mtimes"].tolist())
                rows = {key: i for i, key in enumerate(keys)}
                if not rows or images.shape != (len(rows), size, size, 3):
                    continue
                return rows, images, saved["errors"].tolist()
        except Exception as e:  # a truncated or foreign file: decode again and overwrite it
            print(f"note: ignoring the unreadable cache {path} ({type(e).__name__}); decoding again",
                  file=sys.stderr)
    return None


def _write_cache(root: Path, size: int, keys: list[tuple[str, int, int]], images: np.ndarray,
                 errors: list[str]) -> Path | None:
    """Save the decoded images atomically in the first cache folder that takes them; None when none does."""
    paths, sizes, mtimes = zip(*keys) if keys else ((), (), ())
    arrays = {"version": np.array(CACHE_VERSION), "paths": np.array(paths, dtype=str),
              "sizes": np.array(sizes, dtype=np.int64), "mtimes": np.array(mtimes, dtype=np.int64),
              "images": images, "errors": np.array(errors, dtype=str)}
    for folder in _cache_dirs(root):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"images-{size}.npz", lambda f: np.savez(f, **arrays))
            return folder / f"images-{size}.npz"
        except (OSError, StorageError):
            continue
    return None


def decode_files(files: list[Path], root: Path, size: int, workers: int | None = None
                 ) -> tuple[np.ndarray, list[str]]:
    """(len(files), size, size, 3) uint8 images and, per file, why it could not be read ('' when it could):
    from the cache where a file's path, size and modification time match, the rest decoded in parallel with a
    progress bar. The cache is rewritten when anything changed."""
    keys = _file_keys(files, root)
    cached = _read_cache(root, size)
    if cached is None:
        rows = np.full(len(keys), -1, dtype=np.int64)
        images, errors = np.zeros((len(files), size, size, 3), dtype=np.uint8), [""] * len(files)
    else:
        index, cached_images, cached_errors = cached
        rows = np.fromiter((index.get(key, -1) for key in keys), dtype=np.int64, count=len(keys))
        # a file that failed to decode is tried again: the failure may have been passing (permissions, a copy
        # still being written)
        rows[[i for i, row in enumerate(rows.tolist()) if row >= 0 and cached_errors[row]]] = -1
        images = cached_images[np.maximum(rows, 0)]  # rows not in the cache are decoded over below
        errors = [cached_errors[row] if row >= 0 else "" for row in rows.tolist()]
    hits = np.flatnonzero(rows >= 0)
    missing = np.flatnonzero(rows < 0).tolist()
    if missing:
        workers = workers or min(8, os.cpu_count() or 1)
        print(f"decoding {len(missing):,} images of {root} to {size}x{size} with {workers} threads "
              f"({len(hits):,} from the cache)", flush=True)
        pool = ThreadPoolExecutor(workers)
        try:
            with tqdm(total=len(missing), desc="decoding images", unit="img", leave=False,
                      disable=bar_disabled()) as bar:
                for i, item in zip(missing, pool.map(lambda i: read_image(files[i], size), missing)):
                    if isinstance(item, str):
                        errors[i] = item
                    else:
                        images[i] = item
                    bar.update()
        finally:  # on Ctrl-C, drop the files not started yet instead of decoding them all first
            pool.shutdown(cancel_futures=True)
    if missing or cached is None or len(cached[0]) != len(files):
        written = _write_cache(root, size, keys, images, errors)
        if written is None:
            print(f"note: could not write a cache of the decoded images in {_cache_dirs(root)[0]} or "
                  f"{_cache_dirs(root)[1]}: the next run decodes them again", file=sys.stderr)
        elif missing:
            print(f"cached the decoded images in {written}")
    return images, errors


# --------------------------------------------------------------------------- the dataset

def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (over all pixels, in [0, 1], rounded to 4 places) of uint8 (N, 3, S, S)
    images, exactly, from each channel's histogram of the 256 pixel values."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(3):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        m = float((counts * values).sum() / counts.sum())
        variance = float((counts * values.square()).sum() / counts.sum()) - m * m
        mean.append(round(m, 4))
        # a one-colour channel must not divide by 0
        std.append(max(round(max(variance, 0.0) ** 0.5, 4), 1e-4))
    return tuple(mean), tuple(std)


def _listed_errors(files: list[Path], errors: list[str]) -> list[str]:
    bad = [(path, reason) for path, reason in zip(files, errors) if reason]
    if not bad:
        return []
    lines = ([f"left out {len(bad)} unreadable file(s):"]
             + [f"  {path}: {reason}" for path, reason in bad[:MAX_LISTED]])
    return lines + ([f"  ... and {len(bad) - MAX_LISTED} more"] if len(bad) > MAX_LISTED else [])


def _select(pairs: list[tuple[Path, str]], readable: np.ndarray, index: dict[str, int]
            ) -> tuple[list[int], list[int]]:
    """Positions of the readable files of known classes, and their labels."""
    keep = [i for i, (_, name) in enumerate(pairs) if readable[i] and name in index]
    return keep, [index[pairs[i][1]] for i in keep]


def _as_tensors(images: np.ndarray, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) uint8 tensor, and int64 labels."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(labels, dtype=torch.int64).reshape(-1))


def _classes(scan: Scan, readable: np.ndarray) -> list[str]:
    """The class folders with at least one readable training image, sorted by name; a reason to stop
    otherwise."""
    found = sorted({name for (_, name), ok in zip(scan.train, readable) if ok})
    lost = sorted({name for _, name in scan.train} - set(found))
    if lost:
        scan.notes.append(f"left out class(es) {', '.join(lost)}: none of their training images could be "
                          f"read")
    if len(found) < 2:
        raise DataError(f"{scan.root}: a folder dataset needs at least 2 class folders with readable images, "
                        f"found {len(found)}{' (' + found[0] + ')' if found else ''}: put each class's "
                        f"images in {scan.root}/train/<class>/")
    return found


def _test_set(scan: Scan, images: np.ndarray, readable: np.ndarray, index: dict[str, int], keys: list[str]):
    """The test images, labels and keys from test/, or None when there is none (or none usable)."""
    if scan.test is None:
        return None
    offset = len(scan.train)
    unknown = sorted({name for _, name in scan.test} - set(index))
    if unknown:
        scan.notes.append(f"left out test/ class folder(s) that are not training classes: "
                          f"{', '.join(unknown)}")
    keep, labels = _select(scan.test, readable[offset:], index)
    if not keep:
        scan.notes.append(f"{scan.root}/test holds no readable image of a training class: holding out "
                          f"data.test_fraction of the training images instead")
        return None
    return (*_as_tensors(images[offset:][keep], labels), tuple(keys[offset + i] for i in keep))


def load_folder(cfg: DataConfig, device: torch.device | None = None) -> Dataset:
    """The folder dataset `cfg.path` at `cfg.image_size`; `device` (the training device) is checked for
    room."""
    started = time.perf_counter()
    root = Path(cfg.path).expanduser().resolve()
    scan = scan_folder(root)
    pairs = scan.train + (scan.test or [])
    if not scan.train:
        raise DataError(f"{root}: no image files found in class folders: put each class's images in "
                        f"{root}/train/<class>/ (PNG, JPEG, BMP, GIF or WebP)")
    check_memory(len(pairs), len(scan.train), cfg.image_size, device)
    files = [path for path, _ in pairs]
    keys = relative_paths(files, root)
    images, errors = decode_files(files, root, cfg.image_size)
    readable = np.array([not reason for reason in errors], dtype=bool)
    classes = _classes(scan, readable[:len(scan.train)])
    index = {name: i for i, name in enumerate(classes)}
    keep, labels = _select(scan.train, readable, index)
    train_x, train_y = _as_tensors(images[keep], labels)
    train_ids = tuple(keys[i] for i in keep)
    test = _test_set(scan, images, readable, index, keys)
    if test is None:  # held out by each image's keyed path hash: other files coming and going never move it
        held = hash_held_out(train_ids, train_y.numpy(), cfg.test_fraction, cfg.split_seed, b"test")
        test = (train_x[held], train_y[held], tuple(k for k, h in zip(train_ids, held) if h))
        train_x, train_y = train_x[~held], train_y[~held]
        train_ids = tuple(k for k, h in zip(train_ids, held) if not h)
    _note_small_classes(scan, classes, train_y, test[1])
    mean, std = channel_stats(train_x)
    for line in scan.notes + _listed_errors(files, errors):
        print(line if line.startswith("  ") else f"note: {line}", file=sys.stderr)
    print(f"folder dataset {root}: {len(classes)} classes, {len(train_x):,} training and {len(test[0]):,} "
          f"test images at {cfg.image_size}x{cfg.image_size}, mean {mean} std {std} "
          f"({time.perf_counter() - started:.1f}s)", flush=True)
    return Dataset(train_x, train_y, test[0], test[1], classes=tuple(classes), name=root.name, mean=mean,
                   std=std, train_ids=train_ids, test_ids=test[2])


def _note_small_classes(scan: Scan, classes: list[str], train_y: torch.Tensor, test_y: torch.Tensor) -> None:
    train_counts = torch.bincount(train_y, minlength=len(classes)).tolist()
    test_counts = torch.bincount(test_y, minlength=len(classes)).tolist()
    untested = [name for name, n in zip(classes, test_counts) if not n]
    single = [name for name, n in zip(classes, train_counts) if n == 1]
    if single:
        scan.notes.append(f"class(es) with a single training image: {', '.join(single)}")
    if untested:
        scan.notes.append(f"class(es) without test images (trained on, never tested): {', '.join(untested)}")
