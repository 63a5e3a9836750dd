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
from ..base.errors import UsageError
from ..base.inference import Settings, checkpoint_settings, infer, probabilities
from ..data.dataset import MEAN, STD
from ..data.images import SIZE, find_images, to_model_input
from ..data.sources import checkpoint_dataset
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .results import (
    FileResult,
    check_output,
    classify_files,
    folder_label,
    mark_trained_on,
    print_table,
    report_accuracy,
    write_results,
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
    files, skipped = find_images(paths)
    if not files:
        raise UsageError(f"no image files found in {' '.join(map(str, paths))} "
                         f"(looked for {', '.join(('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp'))})")
    loaded = load_model(target, device, tta)
    ckpt_path, classes, torch_device, settings = loaded.path, loaded.classes, loaded.device, loaded.settings
    if not 1 <= top_k <= len(classes):
        raise UsageError(f"--top-k must be between 1 and {len(classes)} (the number of classes), got {top_k}")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    started = time.perf_counter()
    results = predict_files(loaded.model, files, classes, device=torch_device, batch_size=batch_size,
                            top_k=top_k, workers=workers, progress=not quiet and sys.stderr.isatty(),
                            settings=settings, image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
    seconds = time.perf_counter() - started
    if labels_from_folders:
        for r in results:
            r.label = folder_label(r.path, classes)
        trained = mark_trained_on(results, loaded.checkpoint.get("split"),
                                  loaded.checkpoint["config"]["data"].get("path"))

    if not quiet:
        print_table(results, top_k)
    failed = [r for r in results if r.error is not None]
    for r in failed:
        print(f"error: {r.path}: {r.error}", file=sys.stderr)
    print(f"\npredicted {len(results) - len(failed)} of {len(results)} files with {ckpt_path} on "
          f"{torch_device} in {seconds:.1f}s" + (f"; {len(failed)} could not be read" if failed else ""))
    print(f"inference: {settings.describe()}")
    print(settings.describe_probabilities())
    if skipped:
        print(f"skipped {skipped} file(s) in the folders without an image extension")

    summary: dict = {"checkpoint": str(ckpt_path), "classes": classes, "top_k": top_k, "tta": settings.tta,
                     "precision": settings.precision, "temperature": settings.temperature,
                     "num_files": len(results), "num_failed": len(failed)}
    if labels_from_folders:
        if trained:
            print(f"split: {trained} of these files are images the model trained on (by their path in "
                  f"{loaded.checkpoint['config']['data']['path']} or their pixels): LEFT OUT of the accuracy "
                  f"below")
            summary["trained_on_left_out"] = trained
        scores = report_accuracy(results, classes)
        if scores is not None:
            summary["accuracy"] = scores
    if output is not None:
        write_results(output, results, top_k, summary)
        print(f"wrote {output}")
    return 1 if failed else 0
