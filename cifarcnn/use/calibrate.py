"""`cifarcnn calibrate RUN`: fit the temperature of a trained run on its validation split (the images its
checkpoint recorded as validation images), with the checkpoint's TTA, and store it in the run's checkpoint(s)
under `calibration`, as training does at its end with `calibrate: true` (`base.calibration`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..base.calibration import calibration_record, describe
from ..base.config import data_config
from ..base.device import select_device
from ..base.errors import UserError
from ..base.inference import checkpoint_settings, predict_logits
from ..data.dataset import Dataset
from ..data.loader import Loader, validation_mask
from ..data.sources import checkpoint_dataset, dataset_of_checkpoint
from ..data.splits import SCHEME, path_ids, split_record
from ..training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    store_calibration,
)
from ..training.runlock import RunLock


def calibrate(target: str | Path, *, data_dir: str | Path | None = None, device: str | None = None,
              batch_size: int = 1000) -> dict:
    """Fit and store the temperature of a run's best checkpoint (and of last.pt when it holds the same
    weights), or of one checkpoint file; returns the stored `calibration` record."""
    path = resolve_checkpoint(target)
    lock = RunLock(path.parent)  # training rewrites these files: not while it runs
    lock.acquire()
    try:
        checkpoint = load_checkpoint(path)
        torch_device = select_device(device)
        data = dataset_of_checkpoint(checkpoint, data_dir)
        images, labels = validation_images(checkpoint, data, path)
        info = checkpoint_dataset(checkpoint)
        loader = Loader(images, labels, batch_size, device=torch_device, memory_format=torch.channels_last,
                        mean=info["mean"], std=info["std"])
        model = model_from_checkpoint(checkpoint, path).to(torch_device, memory_format=torch.channels_last)
        settings = checkpoint_settings(checkpoint, torch_device)
        logits, labels = predict_logits(model, loader, settings, desc="validation")
        record = calibration_record(logits, labels, settings.tta)
        paths = [path, *same_model(path, checkpoint)]
        for each in paths:
            store_calibration(each, record)
    finally:
        lock.release()
    previous = checkpoint.get("calibration")
    if previous:
        print(f"replaced the temperature {previous['temperature']:.4f} fitted before")
    print(describe(record))
    print(f"stored in {', '.join(map(str, paths))}; predict, serve and evaluate now use it (the test set's "
          f"figures: cifarcnn evaluate {target})")
    return record


def validation_images(checkpoint: dict, data: Dataset, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels the checkpoint's run validated on: a folder's by the paths its split recorded,
    CIFAR's by its seeded permutation (checked against the recorded digest); a UserError when the run had no
    validation split or it cannot be found again."""
    record = checkpoint.get("split") or {}
    cfg = data_config(checkpoint["config"].get("data") or {})
    if (record.get("val") or {}).get("count") == 0 or cfg.val_size == 0:
        raise UserError(f"{path}: this run was trained without a validation split (data.val_size=0), so "
                        f"there are no held-out images to fit a temperature on; its probabilities stay "
                        f"uncalibrated (train with a validation split, e.g. data.val_size=auto)")
    if record.get("scheme") == SCHEME:
        mask = np.isin(path_ids(data.train_ids), record["val"]["ids"].numpy())
        if not mask.any():
            raise UserError(f"{path}: none of the {record['val']['count']} validation images this run "
                            f"recorded is on the training side of {data.name} now; restore the folder as it "
                            f"was")
        if mask.sum() < record["val"]["count"]:
            print(f"split: {int(mask.sum())} of the {record['val']['count']} validation images the run "
                  f"recorded are still there; fitting on those")
        mask = torch.from_numpy(mask)
    else:
        mask = validation_mask(data, cfg)
        if mask is None:  # a folder whose hash draw held out no image
            raise UserError(f"{path}: no validation split to fit a temperature on")
        recorded = (record.get("val") or {}).get("digest")
        now = split_record(None, data.train_images, mask, None, data.test_images)["val"]["digest"]
        if recorded is not None and recorded != now:
            raise UserError(f"{path}: the validation images cannot be drawn again as the run drew them (the "
                            f"split's digest differs): is --data-dir the dataset it was trained on?")
    return data.train_images[mask], data.train_labels[mask]


def same_model(path: Path, checkpoint: dict) -> list[Path]:
    """The run's other checkpoint (last.pt beside best.pt, or best.pt beside last.pt) when it holds the same
    weights, so it gets the same temperature."""
    name = {"best.pt": "last.pt", "last.pt": "best.pt"}.get(path.name)
    other = path.with_name(name) if name else None
    if other is None or not other.exists():
        return []
    weights = load_checkpoint(other)["model_state"]
    mine = checkpoint["model_state"]
    same = weights.keys() == mine.keys() and all(torch.equal(weights[k], mine[k]) for k in mine)
    return [other] if same else []
