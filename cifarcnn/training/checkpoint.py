"""Checkpoint files: written atomically (by `CheckpointWriter` on a background thread during training, with
the metrics file), read with weights_only (a checkpoint cannot run code), checked on load."""

from __future__ import annotations

import json
import pickle
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from ..base.errors import UsageError, UserError
from ..base.storage import atomic_write, atomic_write_text
from ..models.registry import MODELS, build_model

FORMAT = 1
REQUIRED_KEYS = ("format", "model", "num_classes", "classes", "config", "model_state")


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(Path(path), lambda f: torch.save(state, f))


def store_calibration(path: Path, record: dict) -> None:
    """Rewrite the checkpoint at `path` (atomically) with `record` as its `calibration`."""
    checkpoint = load_checkpoint(path)
    checkpoint["calibration"] = record
    save_checkpoint(path, checkpoint)


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """RUN/metrics.jsonl: one JSON object a line (each epoch's metrics, then with --test the test result)."""
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


class CheckpointWriter:
    """Writes checkpoints and the metrics file on a background thread, so training goes on while the disk
    works. On a GPU the tensors' copies to (pinned) host memory are queued behind the steps already launched,
    and the thread waits for them, not the training loop. Any write error surfaces at the next write or at
    close()."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def write(self, run_dir: Path, state: dict, best: bool) -> None:
        """last.pt (and best.pt when `best`) holding `state`, and the metrics file of its history."""
        self.wait()
        snapshot = to_cpu(state, non_blocking=True)
        copied = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
        self._pending = self._pool.submit(self._write, run_dir, snapshot, best, copied)

    @staticmethod
    def _write(run_dir: Path, state: dict, best: bool, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        if best:
            save_checkpoint(run_dir / "best.pt", state)
        save_checkpoint(run_dir / "last.pt", state)
        write_metrics(run_dir, state["history"])

    def wait(self) -> None:
        """Until the last write is on disk (raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def to_cpu(obj, non_blocking: bool = False):
    """A copy of `obj` with its tensors on the CPU. `non_blocking`: copies from a GPU land in pinned memory
    and are valid only once the stream has reached them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_cpu(v, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, non_blocking) for v in obj)
    return obj


def resolve_checkpoint(target: str | Path) -> Path:
    """A run folder means its best checkpoint; a file is taken as it is."""
    target = Path(target)
    if target.is_dir():
        for name in ("best.pt", "last.pt"):
            if (target / name).exists():
                return target / name
        raise UsageError(f"{target} holds no checkpoint (best.pt or last.pt); pass a run folder or a .pt "
                         f"file")
    if not target.exists():
        raise UsageError(f"{target}: no such run folder or checkpoint file")
    return target


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a readable checkpoint (not a PyTorch checkpoint file, or truncated)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise UserError(f"{path}: refusing to load: it holds objects other than tensors and plain data, "
                        f"which could run code when loaded (weights_only). {culprit}".strip()) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{path}: not a cifarcnn checkpoint (missing {', '.join(missing)})")
    if checkpoint["format"] != FORMAT:
        raise UserError(f"{path}: checkpoint format {checkpoint['format']} is not supported "
                        f"(expected {FORMAT})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the architecture a checkpoint names, for its classes and image size (32 in checkpoints from
    before image sizes were recorded), and load its weights; a mismatch is a clear error."""
    name, num_classes = checkpoint["model"], checkpoint["num_classes"]
    image_size = checkpoint.get("image_size", 32)
    if name not in MODELS:
        raise UserError(f"{path}: architecture {name!r} is not known here "
                        f"(known: {', '.join(sorted(MODELS))})")
    model = build_model(name, num_classes, image_size)
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n", 1)[-1].split())[:300]
        raise UserError(f"{path}: weights do not fit {name} with {num_classes} classes at "
                        f"{image_size}x{image_size}: {detail}") from None
    return model
