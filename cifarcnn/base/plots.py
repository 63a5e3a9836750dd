"""PNG figures: labelled image grids, the confusion-matrix heatmap and training curves (matplotlib,
headless)."""

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
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .storage import atomic_write


def png_bytes(fig, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _save(fig, path: Path) -> None:
    data = png_bytes(fig)
    atomic_write(Path(path), lambda f: f.write(data))


def save_image_grid(images: torch.Tensor, titles: Sequence[str], path: Path, columns: int = 8,
                    title: str | None = None) -> None:
    """images: (N, 3, H, W) floats in [0, 1]; one caption per image."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    # constrained layout keeps the title clear of the first row's captions, however many rows there are
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.45, rows * 1.6), squeeze=False,
                             layout="constrained")
    pixels = images.detach().float().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy()
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(pixels[i], interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


# up to this many classes each cell shows its count; beyond, the image would not fit them
ANNOTATED_CLASSES = 20


def save_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Rows are true classes, columns predicted. Up to ANNOTATED_CLASSES classes each cell is annotated with
    its count; with more the figure stops growing, the labels shrink and a square-root colour scale keeps the
    rarer confusions visible next to the diagonal."""
    k = len(classes)
    annotated = k <= ANNOTATED_CLASSES
    side = 0.75 * k if annotated else 14.0
    fig, ax = plt.subplots(figsize=(1.0 + side, side))
    norm = None if annotated else PowerNorm(0.5, vmin=0, vmax=max(int(matrix.max()), 1))
    im = ax.imshow(matrix, cmap="Blues", norm=norm)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    label_size = None if annotated else max(3.0, min(8.0, 500 / k))
    ax.set_xticks(range(k), classes, rotation=45 if annotated else 90, ha="right" if annotated else "center",
                  fontsize=label_size)
    ax.set_yticks(range(k), classes, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if annotated:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > threshold else "black")
    _save(fig, path)


def training_curve_pngs(history: Sequence[dict]) -> list[tuple[str, bytes]]:
    """(title, PNG) for loss, accuracy, learning rate and gradient norm per epoch, from metrics.jsonl rows."""
    epochs = [row["epoch"] for row in history]
    panels = [
        ("loss", [("train", "train_loss"), ("validation", "val_loss")], False),
        ("accuracy (%)", [("train", "train_acc"), ("validation", "val_acc"),
                          ("validation balanced", "val_balanced_acc")], True),
        ("learning rate (epoch start)", [("lr", "lr")], False),
        ("gradient norm (epoch mean)", [("grad norm", "grad_norm")], False),
    ]
    figures = []
    for title, series, percent in panels:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        for label, key in series:
            points = [(e, row.get(key)) for e, row in zip(epochs, history)
                      if isinstance(row.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, [y * 100 for y in ys] if percent else ys, marker="o", markersize=3, label=label)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(series) > 1:
            ax.legend(fontsize=9)
        figures.append((title, png_bytes(fig)))
    return figures


def save_reliability_diagram(panels: Sequence[tuple[str, dict, float]], path: Path) -> None:
    """One reliability diagram per (title, `calibration.reliability` table, ECE) side by side: per confidence
    bin the share of right answers (bars) against the mean confidence (the red marks; on the diagonal when the
    probabilities mean what they say), and below the number of images per bin."""
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, layout="constrained")
    for (title, table, ece), ax, hist in zip(panels, axes[0], axes[1]):
        edges = np.array(table["edges"])
        width, centers = np.diff(edges), (edges[:-1] + edges[1:]) / 2
        filled = [i for i, n in enumerate(table["count"]) if n]
        ax.bar(centers[filled], [table["accuracy"][i] for i in filled], width=width[filled],
               edgecolor="white", color="#2563eb", label="accuracy")
        ax.scatter(centers[filled], [table["confidence"][i] for i in filled], marker="_", s=120,
                   color="#dc2626", label="mean confidence", zorder=3)
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}: ECE {ece:.2%}")
        ax.legend(fontsize=8, loc="upper left")
        hist.bar(centers, table["count"], width=width, color="#64748b", edgecolor="white")
        hist.set(xlim=(0, 1), xlabel="top-1 confidence", ylabel="images")
    _save(fig, path)
