"""Classification metrics from a confusion matrix (rows true classes, columns predicted), and class counts.

`classification_metrics(matrix)`: accuracy, balanced accuracy (the mean per-class recall), macro-F1, and per
class precision, recall, F1 and support. The rules for classes a side lacks:
- a class with no support (no true images) has recall and F1 None and is left out of balanced accuracy and
  macro-F1 (both average over the classes with support); images wrongly predicted as it still count, as
  misses of their own classes;
- a class never predicted has precision None; its recall is then 0 and its F1 0 (when it has support);
- an empty matrix has every figure None.
`class_counts`, `imbalance_ratio` (largest over smallest count, over the classes present) and
`describe_counts` say how balanced a side is; above `IMBALANCED` (3:1) a side counts as imbalanced."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IMBALANCED = 3.0  # a largest/smallest class ratio above this is imbalanced
LISTED_CLASSES = 10  # describe_counts names each class up to this many, else the extremes only


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts on the labels' device: rows true, columns predicted."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> list[float | None]:
    return [float(n / d) if d else None for n, d in zip(numerator, denominator)]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def classification_metrics(matrix: np.ndarray | torch.Tensor | Sequence[Sequence[int]]) -> dict:
    """accuracy, balanced_accuracy, macro_f1 (floats, or None for an empty matrix) and per-class lists
    precision, recall, f1 (float or None, see the module docstring) and support (int)."""
    m = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.int64)
    hits, support, predicted = np.diagonal(m), m.sum(1), m.sum(0)
    precision, recall = _ratio(hits, predicted), _ratio(hits, support)
    f1 = [float(2 * h / (s + p)) if s else None for h, s, p in zip(hits, support, predicted)]
    total = int(m.sum())
    return {"accuracy": float(hits.sum() / total) if total else None, "balanced_accuracy": _mean(recall),
            "macro_f1": _mean(f1), "precision": precision, "recall": recall, "f1": f1,
            "support": [int(s) for s in support]}


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class."""
    return [int(n) for n in torch.bincount(labels.long().cpu(), minlength=num_classes)[:num_classes]]


def imbalance_ratio(counts: Sequence[int]) -> float | None:
    """The largest class count over the smallest, among the classes with images; None when none has any."""
    present = [n for n in counts if n > 0]
    return max(present) / min(present) if present else None


def is_imbalanced(counts: Sequence[int]) -> bool:
    ratio = imbalance_ratio(counts)
    return ratio is not None and ratio > IMBALANCED


def describe_counts(classes: Sequence[str], counts: Sequence[int]) -> str:
    """One side's counts on one line: `cat 24, dog 24, fox 6 (4.0:1)`; `100 each` when equal; with many
    classes the smallest and largest only. Classes with no image are named."""
    ratio = imbalance_ratio(counts)
    missing = [name for name, n in zip(classes, counts) if not n]
    absent = f"none of {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}" if missing else ""
    if ratio is None:
        return "no images"
    if ratio == 1:
        return f"{max(counts):,} each" + (f" ({absent})" if absent else "")
    if len(classes) <= LISTED_CLASSES:
        listed = ", ".join(f"{name} {n:,}" for name, n in zip(classes, counts) if n)
    else:
        present = [(n, name) for name, n in zip(classes, counts) if n]
        (low, low_name), (high, high_name) = min(present), max(present)
        listed = f"{low:,} ({low_name}) to {high:,} ({high_name})"
    return f"{listed} ({ratio:.1f}:1" + (f", {absent})" if absent else ")")


def per_class_rows(classes: Sequence[str], metrics: dict) -> dict[str, dict]:
    """classification_metrics' per-class lists as {class: {precision, recall, f1, support}}."""
    return {name: {key: metrics[key][i] for key in ("precision", "recall", "f1", "support")}
            for i, name in enumerate(classes)}
