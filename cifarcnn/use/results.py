"""`predict`'s files and results, whichever model runs them (a checkpoint through torch, an ONNX file through
ONNX Runtime), without torch: the files decoded in order and classified in batches, a record per file, the
split check against a recorded training side, the accuracy over class folders, the table and the CSV/JSON
output."""

from __future__ import annotations

import csv
import functools
import io
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..base.errors import UsageError
from ..base.progress import bar_disabled
from ..base.storage import atomic_write_json, atomic_write_text
from ..data.images import SIZE, find_images, read_image
from ..data.pixels import SCHEME, path_ids, pixel_ids

OUTPUT_FORMATS = (".csv", ".json")
# (N, H, W, 3) uint8 images -> each image's top-k (class, probability), most likely first
Classify = Callable[[np.ndarray], list[list[tuple[str, float]]]]


@dataclass
class FileResult:
    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), most likely first
    error: str | None = None
    label: str | None = None  # the class its folder names, with --labels-from-folders
    pixels: int | None = None  # the decoded image's identity (pixels.pixel_ids): was it a training image?
    # with --labels-from-folders: an image the model trained on (left out of the accuracy)
    trained_on: bool = False


def decoded(files: Sequence[Path], workers: int, size: int) -> Iterator[np.ndarray | str]:
    """Decoded images (or error strings) in file order; Pillow releases the GIL while decoding."""
    read = functools.partial(read_image, size=size)
    if workers <= 1:
        yield from map(read, files)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(read, files)


def classify_files(classify: Classify, files: Sequence[Path], *, batch_size: int = 256, workers: int = 4,
                   progress: bool = False, image_size: int = SIZE) -> list[FileResult]:
    """One FileResult per file, in order: its top-k classes by `classify`, in batches of `batch_size`, or why
    it could not be read."""
    results = [FileResult(path) for path in files]
    pending: list[int] = []
    arrays: list[np.ndarray] = []

    def flush() -> None:
        tops = classify(np.stack(arrays))
        # pixel identities as the split records them: (3, S, S) per image, not the (S, S, 3) decoded arrays
        for i, top, pixels in zip(pending, tops, pixel_ids(np.stack(arrays).transpose(0, 3, 1, 2))):
            results[i].top = top
            results[i].pixels = int(pixels)
        pending.clear()
        arrays.clear()

    bar = tqdm(total=len(files), desc="predict", unit="file", leave=False, disable=bar_disabled(progress),
               dynamic_ncols=True)
    for i, item in enumerate(decoded(files, workers, image_size)):
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


def print_table(results: Sequence[FileResult], top_k: int) -> None:
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


def check_output(output: Path | None) -> None:
    if output is None:
        return
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise UsageError(f"--output {output}: the file name must end in .csv or .json")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist")


def mark_trained_on(results: Sequence[FileResult], record: dict | None, root: str | Path | None) -> int:
    """Mark the files the model trained on: by the split `record` a checkpoint keeps (`splits.split_record`,
    its arrays numpy or tensors), its training side by path relative to the dataset folder `root` or by
    pixels, and for a fine-tuned run its source model's, by pixels; returns how many. 0 without such a record
    (CIFAR, older runs)."""
    record = record or {}
    if record.get("scheme") != SCHEME or root is None:
        return 0
    root = Path(root)
    ids, pixels = set(record["train"]["ids"].tolist()), set(record["train"]["pixels"].tolist())
    pixels |= set(record["source_train"]["pixels"].tolist()) if record.get("source_train") else set()
    for r in results:
        if r.error is not None:
            continue
        inside = r.path.resolve().is_relative_to(root)
        key = r.path.resolve().relative_to(root).as_posix() if inside else None
        r.trained_on = r.pixels in pixels or (key is not None and int(path_ids([key])[0]) in ids)
    return sum(r.trained_on for r in results)


def report_accuracy(results: Sequence[FileResult], classes: Sequence[str]) -> dict | None:
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


def image_files(paths: Sequence[str]) -> tuple[list[Path], int]:
    """The image files `paths` name (files, or folders searched), and how many files were skipped for their
    extension; a UsageError when there are none."""
    files, skipped = find_images(paths)
    if not files:
        raise UsageError(f"no image files found in {' '.join(map(str, paths))} "
                         f"(looked for {', '.join(('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp'))})")
    return files, skipped


def check_top_k(top_k: int, classes: Sequence[str]) -> None:
    if not 1 <= top_k <= len(classes):
        raise UsageError(f"--top-k must be between 1 and {len(classes)} (the number of classes), got {top_k}")


def finish(results: Sequence[FileResult], classes: Sequence[str], *, top_k: int, quiet: bool, ran: str,
           inference: Sequence[str], skipped: int, summary: dict, trained: int | None, root: object,
           output: Path | None) -> int:
    """What `predict` prints and writes once its files are classified, for a checkpoint and an .onnx file
    alike: the table, the unreadable files, what ran (`ran`: "MODEL on DEVICE in Ns"; `inference`: its lines),
    with --labels-from-folders (`trained` not None) the accuracy, and the output file. The exit code."""
    if not quiet:
        print_table(results, top_k)
    failed = [r for r in results if r.error is not None]
    for r in failed:
        print(f"error: {r.path}: {r.error}", file=sys.stderr)
    print(f"\npredicted {len(results) - len(failed)} of {len(results)} files with {ran}"
          + (f"; {len(failed)} could not be read" if failed else ""))
    for line in inference:
        print(line)
    if skipped:
        print(f"skipped {skipped} file(s) in the folders without an image extension")
    summary = {**summary, "num_files": len(results), "num_failed": len(failed)}
    if trained is not None:
        if trained:
            print(f"split: {trained} of these files are images the model trained on (by their path in "
                  f"{root} or their pixels): LEFT OUT of the accuracy below")
            summary["trained_on_left_out"] = trained
        scores = report_accuracy(results, classes)
        if scores is not None:
            summary["accuracy"] = scores
    if output is not None:
        write_results(output, results, top_k, summary)
        print(f"wrote {output}")
    return 1 if failed else 0
