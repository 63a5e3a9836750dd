"""`cifarcnn predict`: classify image files with a trained checkpoint, in batches, and report or save the
results."""

from __future__ import annotations

import csv
import functools
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..base.device import select_device
from ..base.errors import UsageError
from ..base.inference import Settings, checkpoint_settings, infer, probabilities
from ..base.progress import bar_disabled
from ..base.storage import atomic_write_json, atomic_write_text
from ..data.dataset import MEAN, STD
from ..data.images import SIZE, find_images, read_image, to_model_input
from ..data.sources import checkpoint_dataset
from ..data.splits import SCHEME, path_ids, pixel_ids
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint

OUTPUT_FORMATS = (".csv", ".json")


@dataclass
class FileResult:
    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), most likely first
    error: str | None = None
    label: str | None = None  # the class its folder names, with --labels-from-folders
    pixels: int | None = None  # the decoded image's identity (splits.pixel_ids): was it a training image?
    # with --labels-from-folders: an image the model trained on (left out of the accuracy)
    trained_on: bool = False


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


def _decoded(files: Sequence[Path], workers: int, size: int) -> Iterator[np.ndarray | str]:
    """Decoded images (or error strings) in file order; Pillow releases the GIL while decoding."""
    read = functools.partial(read_image, size=size)
    if workers <= 1:
        yield from map(read, files)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(read, files)


@torch.inference_mode()
def predict_files(model: nn.Module, files: Sequence[Path], classes: Sequence[str], *, device: torch.device,
                  settings: Settings, batch_size: int = 256, top_k: int = 1, workers: int = 4,
                  progress: bool = False, image_size: int = SIZE, mean: tuple[float, ...] = MEAN,
                  std: tuple[float, ...] = STD) -> list[FileResult]:
    """One FileResult per file, in order: its top-k classes (through `inference.infer`, as `evaluate`), or why
    it could not be read. Images are shrunk to `image_size` and normalized with `mean` and `std`, as the model
    was trained (default: CIFAR-10)."""
    model.eval()
    results = [FileResult(path) for path in files]
    pending: list[int] = []
    arrays: list[np.ndarray] = []

    def flush() -> None:
        tops = classify(model, np.stack(arrays), classes, device=device, top_k=top_k, settings=settings,
                        mean=mean, std=std)
        # pixel identities as the split records them: (3, S, S) per image, not the (S, S, 3) decoded arrays
        for i, top, pixels in zip(pending, tops, pixel_ids(np.stack(arrays).transpose(0, 3, 1, 2))):
            results[i].top = top
            results[i].pixels = int(pixels)
        pending.clear()
        arrays.clear()

    bar = tqdm(total=len(files), desc="predict", unit="file", leave=False, disable=bar_disabled(progress),
               dynamic_ncols=True)
    for i, item in enumerate(_decoded(files, workers, image_size)):
        if isinstance(item, str):
            results[i].error = item
        else:
            pending.append(i)
            arrays.append(item)
            if len(arrays) == batch_size:
                flush()
        bar.update()
    if arrays:
        flush()
    bar.close()
    return results


def folder_label(path: Path, classes: Sequence[str]) -> str | None:
    """The class named by the file's parent folder (`.../<class_name>/<file>`), case-insensitively."""
    by_name = {c.lower(): c for c in classes}
    return by_name.get(path.parent.name.lower())


def accuracy_by_class(results: Sequence[FileResult], classes: Sequence[str]) -> dict | None:
    """Accuracy over the predicted files that have a folder label; None when there are none."""
    scored = [r for r in results if r.label is not None and r.error is None and not r.trained_on]
    if not scored:
        return None
    correct = {c: 0 for c in classes}
    total = {c: 0 for c in classes}
    for r in scored:
        total[r.label] += 1
        correct[r.label] += r.top[0][0] == r.label
    return {
        "accuracy": sum(correct.values()) / len(scored), "num_images": len(scored),
        "per_class": {c: {"accuracy": correct[c] / total[c] if total[c] else None, "correct": correct[c],
                          "total": total[c]} for c in classes},
    }


def _record(r: FileResult) -> dict:
    record = {"path": str(r.path)}
    if r.label is not None:
        record["label"] = r.label
    record["predictions"] = [{"class": c, "probability": p} for c, p in r.top]
    record["error"] = r.error
    return record


def write_results(path: Path, results: Sequence[FileResult], top_k: int, summary: dict) -> None:
    """CSV (one row per file) or JSON (summary plus one record per file), chosen by the extension."""
    if path.suffix.lower() == ".json":
        atomic_write_json(path, {**summary, "results": [_record(r) for r in results]})
        return
    labelled = any(r.label is not None for r in results)
    header = ["path", *(["label"] if labelled else [])]
    for k in range(1, top_k + 1):
        header += [f"class_{k}", f"probability_{k}"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*header, "error"])
    for r in results:
        row = [str(r.path), *([r.label or ""] if labelled else [])]
        for k in range(top_k):
            row += [r.top[k][0], f"{r.top[k][1]:.6f}"] if k < len(r.top) else ["", ""]
        writer.writerow([*row, r.error or ""])
    atomic_write_text(path, buffer.getvalue())


def _print_table(results: Sequence[FileResult], top_k: int) -> None:
    ok = [r for r in results if r.error is None]
    if not ok:
        return
    width = min(max(len(str(r.path)) for r in ok), 60)
    header = f"{'file':<{width}}  {'class':<12}{'probability':>11}"
    print(header + (f"  top-{top_k}" if top_k > 1 else ""))
    for r in ok:
        line = f"{str(r.path):<{width}}  {r.top[0][0]:<12}{r.top[0][1]:>11.2%}"
        if top_k > 1:
            line += "  " + ", ".join(f"{c} {p:.1%}" for c, p in r.top)
        print(line)


def _check_output(output: Path | None) -> None:
    if output is None:
        return
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise UsageError(f"--output {output}: the file name must end in .csv or .json")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist")


def predict(target: str | Path, paths: Sequence[str], *, device: str | None = None, batch_size: int = 256,
            top_k: int = 1, output: Path | None = None, labels_from_folders: bool = False,
            quiet: bool = False, workers: int | None = None, tta: int | None = None) -> int:
    """The `predict` command; returns the exit code (1 when any file could not be read). `tta` overrides the
    checkpoint's test-time augmentation level."""
    _check_output(output)
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
        trained = mark_trained_on(results, loaded.checkpoint)

    if not quiet:
        _print_table(results, top_k)
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
        scores = _report_accuracy(results, classes)
        if scores is not None:
            summary["accuracy"] = scores
    if output is not None:
        write_results(output, results, top_k, summary)
        print(f"wrote {output}")
    return 1 if failed else 0


def mark_trained_on(results: Sequence[FileResult], checkpoint: dict) -> int:
    """Mark the files the model trained on (the checkpoint's recorded training side, by path relative to its
    dataset folder or by pixels, and for a fine-tuned run its source model's, by pixels); returns how many. 0
    for checkpoints without such a record (CIFAR, older runs)."""
    record = checkpoint.get("split") or {}
    if record.get("scheme") != SCHEME:
        return 0
    root = Path(checkpoint["config"]["data"]["path"])
    ids, pixels = set(record["train"]["ids"].tolist()), set(record["train"]["pixels"].tolist())
    pixels |= set(record["source_train"]["pixels"].tolist()) if record.get("source_train") else set()
    for r in results:
        if r.error is not None:
            continue
        inside = r.path.resolve().is_relative_to(root)
        key = r.path.resolve().relative_to(root).as_posix() if inside else None
        r.trained_on = r.pixels in pixels or (key is not None and int(path_ids([key])[0]) in ids)
    return sum(r.trained_on for r in results)


def _report_accuracy(results: Sequence[FileResult], classes: Sequence[str]) -> dict | None:
    """Print the accuracy over the files in class folders and its per-class table; returns it (None: no such
    file)."""
    scores = accuracy_by_class(results, classes)
    if scores is None:
        print(f"--labels-from-folders: no readable file lies in a folder named after a class "
              f"({', '.join(classes)}), so there is no accuracy to report")
        return None
    left_out = len(results) - scores["num_images"]
    print(f"accuracy: {scores['accuracy']:.2%} on {scores['num_images']} labelled images"
          + (f" ({left_out} file(s) left out: unreadable, outside class folders or trained on)"
             if left_out else ""))
    print(f"{'class':<12}{'accuracy':>10}{'correct':>10}{'total':>8}")
    for name, row in scores["per_class"].items():
        acc = f"{row['accuracy']:.2%}" if row["accuracy"] is not None else "-"
        print(f"{name:<12}{acc:>10}{row['correct']:>10}{row['total']:>8}")
    return scores
