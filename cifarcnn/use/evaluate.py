"""Test-set evaluation of a checkpoint: accuracy, balanced accuracy and macro-F1, the class counts, a
per-class table (precision, recall, F1, support), confusion matrix, misclassified examples, and how well its
probabilities are calibrated (ECE and NLL before and after its temperature, and a reliability diagram)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..base import calibration
from ..base.device import select_device
from ..base.inference import Settings, checkpoint_settings, predict_logits, probabilities
from ..base.metrics import classification_metrics, confusion_matrix, describe_counts, per_class_rows
from ..base.plots import save_confusion_matrix, save_image_grid, save_reliability_diagram
from ..base.storage import atomic_write_json
from ..data.dataset import Dataset
from ..data.loader import Loader
from ..data.sources import checkpoint_dataset, dataset_of_checkpoint
from ..data.splits import SplitChange, compare_split, untrained_test
from ..training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from ..training.monitor import best_text


def top_confusions(matrix: np.ndarray | list, classes: list[str], count: int) -> list[tuple[int, str, str]]:
    """The `count` most frequent mistakes as (images, true class, predicted class), most frequent first."""
    k = len(classes)
    pairs = [(int(matrix[i][j]), classes[i], classes[j])
             for i in range(k) for j in range(k) if i != j and matrix[i][j]]
    return sorted(pairs, key=lambda p: -p[0])[:count]


def confusion_count(num_classes: int) -> int:
    """How many of the most frequent confusions to list: more when the matrix image is too small to read."""
    return 5 if num_classes <= 20 else 15


def _print_results(matrix: np.ndarray, scores: dict, classes: list[str]) -> None:
    """The per-class table, best recall (per-class accuracy) first, classes without test images last; then
    the most frequent confusions."""
    width = max(12, max(map(len, classes)) + 2)
    print(f"{'class':<{width}}{'recall':>9}{'precision':>11}{'F1':>8}{'correct':>9}{'support':>9}")
    support = scores["support"]
    for i in sorted(range(len(classes)), key=lambda i: (not support[i], -(scores["recall"][i] or 0))):
        recall, precision, f1 = (f"{v:.2%}" if v is not None else "-" for v in (
            scores["recall"][i], scores["precision"][i], scores["f1"][i]))
        print(f"{classes[i]:<{width}}{recall:>9}{precision:>11}{f1:>8}{int(matrix[i, i]):>9}{support[i]:>9}")
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
    matrix = confusion_matrix(labels, predictions, len(classes)).cpu().numpy()
    scores = classification_metrics(matrix)
    accuracy = scores["accuracy"]
    counts = {**checkpoint.get("class_counts", {}), "test": scores["support"]}  # the test images counted
    _print_header(path, checkpoint, settings, accuracy, int(matrix.sum()), info["dataset"], change)
    _print_scores(scores, classes, counts)
    _print_results(matrix, scores, classes)
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
        "per_class_accuracy": dict(zip(classes, scores["recall"])),
        "balanced_accuracy": scores["balanced_accuracy"], "macro_f1": scores["macro_f1"],
        "per_class": per_class_rows(classes, scores), "class_counts": counts,
        "monitor": checkpoint.get("monitor", "accuracy"), "best_epoch": checkpoint.get("best_epoch"),
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


def _print_scores(scores: dict, classes: list[str], counts: dict[str, list[int]]) -> None:
    """Balanced accuracy and macro-F1 beside the accuracy, and the class counts per side (train and
    validation as the checkpoint recorded them, test as evaluated)."""
    print(f"balanced accuracy (mean per-class recall): {scores['balanced_accuracy']:.2%}; macro-F1: "
          f"{scores['macro_f1']:.2%}")
    sides = "; ".join(f"{side} {describe_counts(classes, n)}" for side, n in counts.items())
    print(f"class counts: {sides}")
    if "train" not in counts:
        print("  (the checkpoint does not record its training counts: trained before cifarcnn recorded them)")
    print()


def _print_header(path: Path, checkpoint: dict, settings: Settings, accuracy: float, images: int,
                  dataset: str, change: SplitChange | None = None) -> None:
    best_val = checkpoint.get("best_val_acc", -1.0)
    val_text = f"validation {best_text(checkpoint)}" if best_val >= 0 else "trained without a validation set"
    print(f"checkpoint {path} (epoch {checkpoint.get('epoch')}, {val_text})")
    print(f"inference: {settings.describe()}")
    trained = int(change.trained_on.sum()) if change is not None else 0
    if trained:
        print(f"test accuracy: {accuracy:.2%} on the {images} {dataset} test images the model did not train "
              f"on (LEFT OUT: {trained} test image(s) the model trained on: moved to the test side, or "
              f"copies of training images)")
    else:
        print(f"test accuracy: {accuracy:.2%} on {images} {dataset} test images")
