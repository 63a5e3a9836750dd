"""PNG figures: labelled image grids and the confusion-matrix heatmap (matplotlib, no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .storage import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def save_image_grid(images: torch.Tensor, titles: Sequence[str], path: Path, columns: int = 8,
                    title: str | None = None) -> None:
    """images: (N, 3, H, W) floats in [0, 1]; one caption per image."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.45, rows * 1.6), squeeze=False)
    pixels = images.detach().float().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy()
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(pixels[i], interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def save_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Rows are true classes, columns predicted; each cell annotated with its count."""
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * k, 0.75 * k))
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    _save(fig, path)
