"""Test-set evaluation of a checkpoint: accuracy, per-class table, confusion matrix, misclassified examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .data import Loader, load_cifar10
from .device import select_device
from .distributed import Dist
from .inference import Settings, infer, settings_for
from .plots import save_confusion_matrix, save_image_grid
from .progress import bar_disabled
from .storage import atomic_write_json


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: Loader, desc: str | None = None, tta: int = 0,
                   precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (`inference.infer`, batch by batch) and labels for every image the loader yields, in order,
    on the loader's device."""
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, total=len(loader), desc=desc, leave=False, disable=bar_disabled(desc is not None),
                     dynamic_ncols=True):
        logits.append(infer(model, x, tta, precision))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@torch.inference_mode()
def evaluate_split(forward: nn.Module, loader: Loader, dist: Dist, desc: str, tta: int,
                   precision: str) -> tuple[float, float, int]:
    """(mean loss, accuracy, number of images) over a validation or test set; under torchrun each rank evaluates
    its shard and the sums are reduced, so every image counts exactly once."""
    logits, labels = predict_logits(forward, loader, desc if dist.is_main else None, tta=tta, precision=precision)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(1) == labels).sum()
    count = torch.tensor(len(labels), device=labels.device)
    dist.sum_(loss, correct, count)
    return loss.item() / count.item(), correct.item() / count.item(), int(count.item())


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes).cpu().numpy()


def evaluate(target: str | Path, *, data_dir: str | Path | None = None, device: str | None = None,
             out_dir: str | Path | None = None, batch_size: int = 1000, num_misclassified: int = 40) -> dict:
    """Evaluate a run's best checkpoint (or a given .pt file) on the 10,000 test images; write PNGs and JSON."""
    path = resolve_checkpoint(target)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path)
    device = select_device(device)
    data = load_cifar10(data_dir)
    classes = list(checkpoint["classes"])
    out_dir = Path(out_dir) if out_dir else path.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    loader = Loader(data.test_images, data.test_labels, batch_size, device=device,
                    memory_format=torch.channels_last)
    settings = settings_for(checkpoint["config"], device)
    logits, labels = predict_logits(model.to(device, memory_format=torch.channels_last), loader, desc="test",
                                    tta=settings.tta, precision=settings.precision)
    probabilities = logits.softmax(1)
    confidence, predictions = probabilities.max(1)
    matrix = confusion_matrix(labels, predictions, len(classes))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    accuracy = float(matrix.diagonal().sum() / matrix.sum())
    _print_results(path, checkpoint, settings, accuracy, classes, matrix)

    save_confusion_matrix(matrix, classes, out_dir / "confusion_matrix.png",
                          title=f"CIFAR-10 test confusion matrix (accuracy {accuracy:.2%})")
    wrong = (predictions != labels).nonzero().squeeze(1)
    # The most confident mistakes are the most informative ones to look at.
    shown = wrong[confidence[wrong].argsort(descending=True)][:num_misclassified].cpu()
    images = data.test_images[shown].float() / 255
    titles = [f"true {classes[labels[i]]}\npred {classes[predictions[i]]} {confidence[i]:.0%}" for i in shown.tolist()]
    save_image_grid(images, titles, out_dir / "misclassified.png",
                    title=f"{len(shown)} most confident of {len(wrong)} misclassified test images")
    results = {
        "checkpoint": str(path), "epoch": checkpoint.get("epoch"), "test_accuracy": accuracy,
        "test_loss": float(F.cross_entropy(logits, labels)), "tta": settings.tta, "precision": settings.precision,
        "precision_reason": settings.precision_reason, "num_images": int(matrix.sum()),
        "num_misclassified": len(wrong),
        "per_class_accuracy": {name: float(acc) for name, acc in zip(classes, per_class)},
        "confusion_matrix": matrix.tolist(), "classes": classes,
    }
    atomic_write_json(out_dir / "test_metrics.json", results)
    print(f"\nwrote {out_dir / 'confusion_matrix.png'}, {out_dir / 'misclassified.png'}, "
          f"{out_dir / 'test_metrics.json'}")
    return results


def _print_results(path: Path, checkpoint: dict, settings: Settings, accuracy: float, classes: list[str],
                   matrix: np.ndarray) -> None:
    best_val = checkpoint.get("best_val_acc", -1.0)
    val_text = f"validation accuracy {best_val:.2%}" if best_val >= 0 else "trained without a validation set"
    print(f"checkpoint {path} (epoch {checkpoint.get('epoch')}, {val_text})")
    print(f"inference: {settings.describe()}")
    print(f"test accuracy: {accuracy:.2%} on {int(matrix.sum())} images\n")
    print(f"{'class':<12}{'accuracy':>10}{'correct':>10}{'total':>8}")
    for name, row, hit in zip(classes, matrix, matrix.diagonal()):
        print(f"{name:<12}{hit / max(row.sum(), 1):>10.2%}{int(hit):>10}{int(row.sum()):>8}")
