"""A run's folder and what the run tells its user: the folder opened (locked; a new run refuses one that holds
a run, a resumed one reads its last.pt), its outputs (config.yaml, environment.json, TensorBoard events), the
lines a run starts with, the test result's files, and the closing lines. Under torchrun only rank 0 writes and
prints; the other ranks get a TensorBoard writer that does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..base.config import Config, save_config
from ..base.errors import UsageError
from ..base.inference import Settings, tta_views
from ..base.storage import atomic_write_text, ensure_writable_dir, remove_stale_temp_files
from ..data.loader import Loader
from ..data.splits import SplitChange
from .checkpoint import load_checkpoint, write_metrics
from .distributed import Dist
from .environment import record_session
from .finetune import source_overlap
from .monitor import best_text
from .runlock import RunLock

EPOCH_SCALARS = (("Loss/train", "train_loss"), ("Loss/val", "val_loss"), ("Accuracy/train", "train_acc"),
                 ("Accuracy/val", "val_acc"), ("Accuracy/val_balanced", "val_balanced_acc"),
                 ("Accuracy/test", "test_acc"), ("LearningRate", "lr"),
                 ("GradientNorm", "grad_norm"))  # TensorBoard tag, metrics key


class _NoWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunFolder:
    """The folder `path` of one run, locked with `lock` while this process trains there."""

    def __init__(self, path: Path, lock: RunLock, dist: Dist):
        self.path, self.lock, self.dist = Path(path), lock, dist
        self.writer = _NoWriter()  # TensorBoard's SummaryWriter on rank 0, once `open_outputs` ran

    def open(self, resume: bool) -> dict | None:
        """Lock the folder (before reading last.pt: another process may be training there); the checkpoint to
        resume from, or None for a new run, which must not overwrite an earlier one."""
        if self.dist.is_main and self.path.is_dir():
            self.lock.acquire()
        if resume:
            return load_checkpoint(self.path / "last.pt")
        if (self.path / "last.pt").exists():
            raise UsageError(f"run folder {self.path} already holds a run: continue it with --resume "
                             f"{self.path}, or pick another --name")
        return None

    def open_outputs(self, cfg: Config, device: torch.device, settings: Settings, first_epoch: int,
                     purge_step: int | None) -> None:
        """On rank 0: a writable, locked folder without stale temp files, its config.yaml, this session (from
        epoch `first_epoch`, 1-based) in environment.json and the TensorBoard writer (`purge_step`: a resumed
        run drops the events logged after its last checkpoint)."""
        if not self.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

        ensure_writable_dir(self.path)  # an unwritable folder fails here, before any training
        if not self.lock.held:
            self.lock.acquire()
        remove_stale_temp_files(self.path)  # from a killed run; the lock makes them surely no one else's
        save_config(cfg, self.path / "config.yaml")
        record_session(self.path, device, first_epoch, self.dist.world_size,
                       {"precision": settings.precision, "precision_reason": settings.precision_reason})
        self.writer = SummaryWriter(str(self.path / "tensorboard"), purge_step=purge_step)

    def announce(self, cfg: Config, device: torch.device, settings: Settings, dataset: str, train: Loader,
                 val: Loader | None, split: dict, split_change: SplitChange | None) -> None:
        """The lines a run starts with: what trains on what, where, in which precision; for a folder dataset
        its copies across the split and its mirroring; a fine-tuning source's overlap with this split."""
        if not self.dist.is_main:
            return
        held_out = f"{len(val.images)} val" if val is not None else "no validation"
        processes = f", {self.dist.world_size} processes" if self.dist.active else ""
        print(f"training {cfg.model} on {dataset} on {device} for {cfg.epochs} epochs "
              f"({len(train.images)} train / {held_out} images, {len(train)} steps per epoch"
              f"{processes}) -> {self.path}")
        print(f"precision: {settings.precision} ({settings.precision_reason})")
        if cfg.data.dataset == "folder":
            _announce_copies(split_change)
            _announce_mirroring(cfg, settings)
        overlap = source_overlap(split, cfg) if cfg.init_from else None
        if overlap:
            print(overlap)

    def log_epoch(self, metrics: dict, step: int) -> None:
        """Epoch scalars at the global step where the epoch ended, so a resume's purge_step applies to all
        tags."""
        for tag, key in EPOCH_SCALARS:
            if metrics.get(key) is not None:
                self.writer.add_scalar(tag, metrics[key], step)
        self.writer.flush()

    def record_test(self, result: dict, history: list[dict], step: int) -> None:
        """The best model's test result: in TensorBoard, as metrics.jsonl's last line, and as test.json."""
        if not self.dist.is_main:
            return
        self.writer.add_scalar("Accuracy/test", result["test_acc"], step)
        write_metrics(self.path, history + [{"test": result}])
        atomic_write_text(self.path / "test.json", json.dumps(result, indent=2) + "\n")

    def farewell(self, state: dict, validated: bool, tested: bool, split_change: SplitChange | None) -> None:
        """The closing lines: the best validation accuracy, the training time, where the checkpoints are, and
        with --test the test accuracy."""
        if not self.dist.is_main:
            return
        if validated:
            print(f"best validation {best_text(state)} at epoch {state['best_epoch']}; ", end="")
        print(f"trained {state['train_seconds']:.1f}s; checkpoints in {self.path} "
              f"(evaluate with: cifarcnn evaluate {self.path})")
        test = state.get("test")
        if test is not None and tested:
            copies = split_change.copies if split_change is not None else 0
            left_out = f" ({copies} copies of training images left out)" if copies else ""
            print(f"test accuracy {test['test_acc']:.2%} on {test['test_images']} test images{left_out}, "
                  f"model of epoch {test['epoch']} ({self.path / 'best.pt'}); balanced accuracy "
                  f"{test['test_balanced_acc']:.2%}, macro-F1 {test['test_macro_f1']:.2%}")


def _announce_copies(change: SplitChange | None) -> None:
    """A folder run says how many of its test images have a training image's pixels (left out of every test
    accuracy: `--test` and `evaluate` alike)."""
    if change is not None and change.copies:
        print(f"split: {change.copies} of the {change.test_images} test images have the pixels of a "
              f"training image (copies across the split): test accuracies (--test, evaluate) count the "
              f"{change.test_images - change.copies} others")


def _announce_mirroring(cfg: Config, settings: Settings) -> None:
    """A folder run says whether its images are mirrored in training and test-time views, and how not to."""
    flip, tta = cfg.augment.flip, cfg.tta
    flips = {"random": "each training image mirrored left-right with probability 1/2",
             "alternate": "each training image mirrored left-right every other epoch",
             "none": "no training image mirrored"}[flip]
    views = tta_views(tta, settings.mirror)
    print(f"mirroring: augment.flip={flip} ({flips}); test-time views: tta {tta} ({views})")
    if flip != "none":
        print("  if mirroring changes what an image shows (digits, text, signs, left/right classes), train "
              "with augment.flip=none tta=0")
