"""Which source a dataset comes from: the one a config names (`data.dataset`: cifar10, cifar100 or folder),
loaded as one `data.Dataset`, and the one a checkpoint was trained on, with the description it carries
(classes, mean, std, image size; CIFAR-10's for older checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..base.config import DataConfig, data_config
from .cifar import CLASSES, load_cifar10, load_cifar100
from .dataset import MEAN, STD, DataError, Dataset
from .exclude import exclude, exclusion_note, read_names
from .folders import load_folder, scan_folder


def load_dataset(cfg: DataConfig, data_dir: str | Path | None = None, *, device: torch.device | None = None,
                 download: bool = True) -> Dataset:
    """The configured dataset; `data_dir` is the CIFAR data root (--data-dir), `device` the training device a
    folder dataset must fit on; `data.exclude` is applied (exclude.py)."""
    if cfg.exclude:
        read_names(cfg.exclude)  # a missing file stops before any image is read
    if cfg.dataset == "cifar100":
        data = load_cifar100(data_dir, labels=cfg.labels, download=download)
    elif cfg.dataset == "folder":
        data = load_folder(cfg, device)
    else:
        data = load_cifar10(data_dir, download=download)
    if cfg.exclude:
        data = exclude(data, cfg.exclude, str(Path(cfg.path).expanduser().resolve()) if cfg.path else None)
    return data


def dataset_shape(cfg: DataConfig) -> tuple[int, int]:
    """(number of classes, image size) of the configured dataset without reading its images (a folder
    dataset's class folders are counted)."""
    if cfg.dataset == "cifar100":
        return (100 if cfg.labels == "fine" else 20), 32
    if cfg.dataset == "folder":
        scan = scan_folder(Path(cfg.path).expanduser().resolve())
        return len({name for _, name in scan.train}), cfg.image_size
    return len(CLASSES), 32


def checkpoint_dataset(checkpoint: dict) -> dict:
    """What a checkpoint says about its data: dataset name, classes, mean, std, image size (CIFAR-10's
    defaults for checkpoints written before these were recorded)."""
    return {"dataset": checkpoint.get("dataset", "CIFAR-10"), "classes": list(checkpoint["classes"]),
            "mean": tuple(checkpoint.get("mean", MEAN)), "std": tuple(checkpoint.get("std", STD)),
            "image_size": int(checkpoint.get("image_size", 32))}


def dataset_of_checkpoint(checkpoint: dict, data_dir: str | Path | None = None) -> Dataset:
    """The dataset a checkpoint was trained on, as its config names it; its classes must be the
    checkpoint's."""
    data = load_dataset(data_config(checkpoint["config"].get("data") or {}), data_dir)
    if list(data.classes) != list(checkpoint["classes"]):
        raise DataError(f"{data.name} now has {len(data.classes)} classes ({_few(data.classes)}), not the "
                        f"{len(checkpoint['classes'])} this model was trained on "
                        f"({_few(checkpoint['classes'])}): the dataset changed since training, or --data-dir "
                        f"points at another one")
    note = exclusion_note(checkpoint.get("split"), data)
    if note:
        print(note)
    return data


def _few(names) -> str:
    return ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "")
