"""`cifarcnn predict`: classify image files with a trained checkpoint, in batches, and report or save the
results."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..base.device import select_device
from ..base.inference import Settings, checkpoint_settings, infer, probabilities
from ..data.dataset import MEAN, STD
from ..data.images import SIZE, to_model_input
from ..data.sources import checkpoint_dataset
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .results import (
    FileResult,
    check_output,
    check_top_k,
    classify_files,
    finish,
    folder_label,
    image_files,
    mark_trained_on,
)


@dataclass
class LoadedModel:
    """A checkpoint ready to classify images, as `predict` (and `serve`) run it: on `device`, in eval mode,
    with the TTA level and precision `evaluate` would use (unless overridden) and its dataset's size, mean and
    std."""

    path: Path
    checkpoint: dict
    model: nn.Module
    classes: list[str]
    device: torch.device
    settings: Settings
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def classify(self, images: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """`classify` for a stack of decoded (N, H, W, 3) uint8 images."""
        return classify(self.model, images, self.classes, device=self.device, top_k=top_k,
                        settings=self.settings, mean=self.mean, std=self.std)


def load_model(target: str | Path, device: str | None = None, tta: int | None = None) -> LoadedModel:
    """The checkpoint a run folder or file names, loaded onto `device` (default: the fastest available); `tta`
    overrides the checkpoint's test-time augmentation level."""
    path = resolve_checkpoint(target)
    checkpoint = load_checkpoint(path)
    torch_device = select_device(device)
    model = model_from_checkpoint(checkpoint, path).to(torch_device, memory_format=torch.channels_last).eval()
    settings = checkpoint_settings(checkpoint, torch_device, tta)  # as evaluate, unless --tta says otherwise
    info = checkpoint_dataset(checkpoint)
    return LoadedModel(path, checkpoint, model, list(checkpoint["classes"]), torch_device, settings,
                       info["image_size"], info["mean"], info["std"])


@torch.inference_mode()
def classify(model: nn.Module, images: np.ndarray, classes: Sequence[str], *, device: torch.device,
             top_k: int, settings: Settings, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD
             ) -> list[list[tuple[str, float]]]:
    """Each image's top-k (class, probability), most likely first, through `inference.infer` in one forward
    pass (per TTA view) and `inference.probabilities` (the settings' temperature); `images` is (N, H, W, 3)
    uint8 as `read_image` decodes them."""
    x = to_model_input(images, device, mean, std).contiguous(memory_format=torch.channels_last)
    probs = probabilities(infer(model, x, settings), settings)
    # a stable sort breaks exact ties toward the lower class index, as evaluate's argmax does
    values, indices = (t[:, :top_k] for t in probs.sort(dim=1, descending=True, stable=True))
    return [[(classes[c], p) for c, p in zip(idx, vals)]
            for vals, idx in zip(values.tolist(), indices.tolist())]


@torch.inference_mode()
def predict_files(model: nn.Module, files: Sequence[Path], classes: Sequence[str], *, device: torch.device,
                  settings: Settings, batch_size: int = 256, top_k: int = 1, workers: int = 4,
                  progress: bool = False, image_size: int = SIZE, mean: tuple[float, ...] = MEAN,
                  std: tuple[float, ...] = STD) -> list[FileResult]:
    """One FileResult per file, in order: its top-k classes (through `inference.infer`, as `evaluate`), or why
    it could not be read. Images are shrunk to `image_size` and normalized with `mean` and `std`, as the model
    was trained (default: CIFAR-10)."""
    model.eval()
    return classify_files(lambda images: classify(model, images, classes, device=device, top_k=top_k,
                                                  settings=settings, mean=mean, std=std),
                          files, batch_size=batch_size, workers=workers, progress=progress,
                          image_size=image_size)


def predict(target: str | Path, paths: Sequence[str], *, device: str | None = None, batch_size: int = 256,
            top_k: int = 1, output: Path | None = None, labels_from_folders: bool = False,
            quiet: bool = False, workers: int | None = None, tta: int | None = None) -> int:
    """The `predict` command; returns the exit code (1 when any file could not be read). `tta` overrides the
    checkpoint's test-time augmentation level."""
    check_output(output)
    files, skipped = image_files(paths)
    loaded = load_model(target, device, tta)
    classes, settings = loaded.classes, loaded.settings
    check_top_k(top_k, classes)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    started = time.perf_counter()
    results = predict_files(loaded.model, files, classes, device=loaded.device, batch_size=batch_size,
                            top_k=top_k, workers=workers, progress=not quiet and sys.stderr.isatty(),
                            settings=settings, image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
    seconds = time.perf_counter() - started
    trained, root = None, loaded.checkpoint["config"]["data"].get("path")
    if labels_from_folders:
        for r in results:
            r.label = folder_label(r.path, classes)
        trained = mark_trained_on(results, loaded.checkpoint.get("split"), root)
    summary = {"checkpoint": str(loaded.path), "classes": classes, "top_k": top_k, "tta": settings.tta,
               "precision": settings.precision, "temperature": settings.temperature}
    return finish(results, classes, top_k=top_k, quiet=quiet,
                  ran=f"{loaded.path} on {loaded.device} in {seconds:.1f}s",
                  inference=[f"inference: {settings.describe()}", settings.describe_probabilities()],
                  skipped=skipped, summary=summary, trained=trained, root=root, output=output)
