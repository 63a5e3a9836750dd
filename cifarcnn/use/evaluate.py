"""Test-set evaluation of a checkpoint: accuracy, per-class table, confusion matrix, misclassified
examples, and how well its probabilities are calibrated (ECE and NLL before and after its temperature, and a
reliability diagram)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..base import calibration
from ..base.device import select_device
from ..base.inference import Settings, checkpoint_settings, predict_logits, probabilities
from ..base.plots import save_confusion_matrix, save_image_grid, save_reliability_diagram
from ..base.storage import atomic_write_json
from ..data.dataset import Dataset
from ..data.loader import Loader
from ..data.sources import checkpoint_dataset, dataset_of_checkpoint
from ..data.splits import SplitChange, compare_split, untrained_test
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes).cpu().numpy()


def top_confusions(matrix: np.ndarray | list, classes: list[str], count: int) -> list[tuple[int, str, str]]:
    """The `count` most frequent mistakes as (images, true class, predicted class), most frequent first."""
    k = len(classes)
    pairs = [(int(matrix[i][j]), classes[i], classes[j])
             for i in range(k) for j in range(k) if i != j and matrix[i][j]]
    return sorted(pairs, key=lambda p: -p[0])[:count]


def confusion_count(num_classes: int) -> int:
    """How many of the most frequent confusions to list: more when the matrix image is too small to read."""
    return 5 if num_classes <= 20 else 15


def _print_results(matrix: np.ndarray, per_class: np.ndarray, classes: list[str]) -> None:
    """The per-class table, best class first (classes without test images last), then the most frequent
    confusions."""
    totals = matrix.sum(1)
    width = max(12, max(map(len, classes)) + 2)
    print(f"{'class':<{width}}{'accuracy':>10}{'correct':>10}{'total':>8}")
    for i in sorted(range(len(classes)), key=lambda i: (not totals[i], -per_class[i])):
        accuracy = f"{per_class[i]:.2%}" if totals[i] else "-"
        print(f"{classes[i]:<{width}}{accuracy:>10}{int(matrix[i, i]):>10}{int(totals[i]):>8}")
    confusions = top_confusions(matrix, classes, confusion_count(len(classes)))
    if confusions:
        print("\nmost frequent confusions (true -> predicted):")
        for n, true, predicted in confusions:
            print(f"  {true} -> {predicted}: {n} images")


def evaluate(target: str | Path, *, data_dir: str | Path | None = None, device: str | None = None,
             out_dir: str | Path | None = None, batch_size: int = 1000, num_misclassified: int = 40) -> dict:
    """Evaluate a run's best checkpoint (or a given .pt file) on the test images of the dataset it was trained
    on; write PNGs and JSON."""
    path = resolve_checkpoint(target)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path)
    device = select_device(device)
    data = dataset_of_checkpoint(checkpoint, data_dir)
    info = checkpoint_dataset(checkpoint)
    classes = list(checkpoint["classes"])
    out_dir = Path(out_dir) if out_dir else path.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    change = split_change(checkpoint, data)
    test_images, test_labels = untrained_test(data, change)  # never an image the model trained on
    loader = Loader(test_images, test_labels, batch_size, device=device,
                    memory_format=torch.channels_last, mean=info["mean"], std=info["std"])
    settings = checkpoint_settings(checkpoint, device)
    logits, labels = predict_logits(model.to(device, memory_format=torch.channels_last), loader, settings,
                                    desc="test")
    confidence, predictions = probabilities(logits, settings).max(1)
    matrix = confusion_matrix(labels, predictions, len(classes))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    accuracy = float(matrix.diagonal().sum() / matrix.sum())
    _print_header(path, checkpoint, settings, accuracy, int(matrix.sum()), info["dataset"], change)
    _print_results(matrix, per_class, classes)
    calibrated = _calibration(logits, labels, settings, out_dir / "reliability.png")

    save_confusion_matrix(matrix, classes, out_dir / "confusion_matrix.png",
                          title=f"{info['dataset']} test confusion matrix (accuracy {accuracy:.2%})")
    wrong = (predictions != labels).nonzero().squeeze(1)
    # The most confident mistakes are the most informative ones to look at.
    shown = wrong[confidence[wrong].argsort(descending=True)][:num_misclassified].cpu()
    images = test_images[shown].float() / 255
    titles = [f"true {classes[labels[i]]}\npred {classes[predictions[i]]} {confidence[i]:.0%}"
              for i in shown.tolist()]
    save_image_grid(images, titles, out_dir / "misclassified.png",
                    title=f"{len(shown)} most confident of {len(wrong)} misclassified test images")
    results = {
        "checkpoint": str(path), "epoch": checkpoint.get("epoch"), "test_accuracy": accuracy,
        "test_loss": float(F.cross_entropy(logits, labels)), "tta": settings.tta,
        "precision": settings.precision, "precision_reason": settings.precision_reason,
        "num_images": int(matrix.sum()), "num_misclassified": len(wrong),
        "per_class_accuracy": {name: float(acc) if total else None
                               for name, acc, total in zip(classes, per_class, matrix.sum(1))},
        "confusion_matrix": matrix.tolist(), "classes": classes, "dataset": info["dataset"],
        "image_size": info["image_size"], "mirror_views": settings.mirror, "calibration": calibrated,
        "split": None if change is None else {
            "description": change.describe(), "changed_sides": change.moved,
            "trained_on_left_out": int(change.trained_on.sum()), "were_validation": change.was_val,
            "copies_of_training_images": change.copies, "trained_on_by_source": change.by_source,
            "new": change.new, "gone": change.gone, "test_digest": change.test_digest},
    }
    atomic_write_json(out_dir / "test_metrics.json", results)
    print(f"\nwrote {out_dir / 'confusion_matrix.png'}, {out_dir / 'misclassified.png'}, "
          f"{out_dir / 'reliability.png'}, {out_dir / 'test_metrics.json'}")
    return results


def _calibration(logits: torch.Tensor, labels: torch.Tensor, settings: Settings, diagram: Path) -> dict:
    """Print and return how calibrated the test probabilities are: ECE (15 bins), NLL and mean top-1
    probability of the plain softmax and, when the checkpoint holds a temperature, of the calibrated one; draw
    their reliability diagrams."""
    scores = calibration.summary(logits, labels, settings.temperature or 1.0)
    panels = [("plain softmax", scores["reliability_before"], scores["ece_before"])]
    head = f"\ncalibration on the {len(labels)} test images ({scores['bins']} bins): "
    if settings.temperature is None:
        scores = {k: v for k, v in scores.items() if not k.endswith("_after")}
        scores["temperature"] = None
        print(head + f"ECE {scores['ece_before']:.2%}, NLL {scores['nll_before']:.4f}, mean top-1 "
              f"probability {scores['mean_confidence_before']:.2%}")
    else:
        panels.append((f"temperature {settings.temperature:.3f}", scores["reliability_after"],
                       scores["ece_after"]))
        print(head + f"ECE {scores['ece_before']:.2%} -> {scores['ece_after']:.2%}, NLL "
              f"{scores['nll_before']:.4f} -> {scores['nll_after']:.4f}, mean top-1 probability "
              f"{scores['mean_confidence_before']:.2%} -> {scores['mean_confidence_after']:.2%} "
              f"(plain softmax -> calibrated)")
    print(settings.describe_probabilities())
    save_reliability_diagram(panels, diagram)
    return {"calibrated": settings.temperature is not None, "fitted_tta": settings.temperature_tta, **scores}


def split_change(checkpoint: dict, data: Dataset) -> SplitChange | None:
    """How the test set changed sides since the checkpoint was trained, printed. None for CIFAR and for
    checkpoints that did not record their split."""
    change = compare_split(checkpoint.get("split"), data)
    if change is None:
        if data.test_ids is not None:
            print(f"split: {data.name}: this checkpoint does not record its split (trained before cifarcnn "
                  f"recorded it), so whether test images changed sides since cannot be told")
        return None
    print(change.describe())
    return change


def _print_header(path: Path, checkpoint: dict, settings: Settings, accuracy: float, images: int,
                  dataset: str, change: SplitChange | None = None) -> None:
    best_val = checkpoint.get("best_val_acc", -1.0)
    val_text = f"validation accuracy {best_val:.2%}" if best_val >= 0 else "trained without a validation set"
    print(f"checkpoint {path} (epoch {checkpoint.get('epoch')}, {val_text})")
    print(f"inference: {settings.describe()}")
    trained = int(change.trained_on.sum()) if change is not None else 0
    if trained:
        print(f"test accuracy: {accuracy:.2%} on the {images} {dataset} test images the model did not train "
              f"on (LEFT OUT: {trained} test image(s) the model trained on: moved to the test side, or "
              f"copies of training images)\n")
    else:
        print(f"test accuracy: {accuracy:.2%} on {images} {dataset} test images\n")
