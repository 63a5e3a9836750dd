"""`cifarcnn audit`: what is wrong with a dataset, before anyone trains on it.

Counts per class and side and the imbalance ratio; unreadable files (folder datasets); exact and near copies
(duplicates.py) within a class, across classes (conflicting labels) and across the train/test sides (leakage);
likely wrong labels, by confident learning (cleanlab's `find_label_issues`, an optional extra) on
out-of-sample probabilities from k-fold training (crossval.py): as many as the confident joint's off-diagonal
counts (cleanlab's `num_label_issues`), lowest probability of the given class first, each with the class the
models suggest; and
outliers, the images farthest from their nearest training images in the fold models' feature space.

Results: a summary on the console, and in the output folder `audit.csv` (one row per flagged image: path,
issue, score, given and suggested class, detail), `audit.html` (audit_page.py) and, when the k-fold models
ran, `out_of_sample.npz` (per image: `names`, given `labels`, out-of-sample `probabilities` and `outlier`
scores, for ranking them another way without training again), all written atomically.
Images are named as `data.exclude` reads them (exclude.py). Finding problems is a result, not an error.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..base.config import Config
from ..base.device import select_device
from ..base.metrics import classification_metrics, confusion_matrix
from ..base.storage import atomic_write, atomic_write_text, ensure_writable_dir
from ..data.dataset import Dataset
from ..data.exclude import image_names
from ..data.folders import decode_files, scan_folder
from ..data.sources import load_dataset
from .audit_page import write_page
from .crossval import cross_validate
from .duplicates import find_duplicates
from .findings import ISSUES, Audit, Finding

COLUMNS = ("path", "issue", "score", "given_class", "suggested_class", "detail")
INSTALL_HINT = "pip install 'cifarcnn[audit]' (or pip install 'cleanlab>=2.6')"
OUTLIER_SHARE = 0.01  # at most this share of the images is listed as outliers


def audit(cfg: Config, *, data_dir: str | Path | None, device: str | None, folds: int, out_dir: Path
          ) -> Audit:
    """Audit the dataset `cfg.data` names, with `cfg` the recipe the k-fold models train with; writes
    audit.csv and audit.html into `out_dir`."""
    started = time.process_time()
    ensure_writable_dir(out_dir)
    torch_device = select_device(device)
    data = load_dataset(cfg.data, data_dir, device=torch_device)
    train_names, test_names = image_names(data)
    root = Path(cfg.data.path).expanduser().resolve() if cfg.data.dataset == "folder" else None
    names = [str(root / n) if root else n for n in train_names + test_names]
    labels = np.concatenate([data.train_labels.numpy(), data.test_labels.numpy()])
    k = len(data.classes)
    result = Audit(data.name, list(data.classes),
                   {"train": np.bincount(data.train_labels.numpy(), minlength=k).tolist(),
                    "test": np.bincount(data.test_labels.numpy(), minlength=k).tolist()}, labels.tolist())
    if root is not None:
        result.findings += _unreadable(root, cfg.data.image_size)
    images = torch.cat([data.train_images, data.test_images])
    _duplicates(result, images, names, labels, len(train_names))
    _model_findings(result, cfg, data, folds, torch_device, names, labels, out_dir)
    _write(result, names, images, out_dir)
    _print_summary(result, out_dir, time.process_time() - started)
    return result


def _unreadable(root: Path, size: int) -> list[Finding]:
    """The files of a folder dataset that could not be decoded (from the cache, trying failures again)."""
    scan = scan_folder(root)
    pairs = scan.train + (scan.test or [])
    _, errors = decode_files([p for p, _ in pairs], root, size)
    return [Finding(-1, str(p), "unreadable", 1.0, name, "", reason)
            for (p, name), reason in zip(pairs, errors) if reason]


def _duplicates(result: Audit, images: torch.Tensor, names: list[str], labels: np.ndarray, n_train: int
                ) -> None:
    """Findings for each group of copies: test images that copy a training image (leakage), copies with
    different labels, and the extra copies within a class and side (the first copy is kept)."""
    classes = result.classes
    for group in find_duplicates(images):
        result.groups.append(group.members)
        members = group.members
        kind = "exact" if group.exact else "near"
        train = [i for i in members if i < n_train]
        distinct = sorted({int(labels[i]) for i in members})
        for pos, i in enumerate(members):
            others = [j for j in members if j != i]
            more = f" and {len(others) - 1} more" if others[1:] else ""
            detail = f"{kind} copy of {names[others[0]]}{more}"
            given = classes[labels[i]]
            if len(distinct) > 1:
                votes = np.bincount(labels[others], minlength=len(classes))
                result.findings.append(Finding(i, names[i], "conflicting_labels", group.distance, given,
                                               classes[int(votes.argmax())], detail))
            elif i >= n_train and train:
                result.findings.append(Finding(i, names[i], "train_test_leak", group.distance, given, given,
                                               f"{kind} copy of training image {names[train[0]]}"))
            elif pos and (i < n_train) == (members[0] < n_train):
                issue = "exact_duplicate" if group.exact else "near_duplicate"
                result.findings.append(Finding(i, names[i], issue, group.distance, given, given, detail))


def _model_findings(result: Audit, cfg: Config, data: Dataset, folds: int, device: torch.device,
                    names: list[str], labels: np.ndarray, out_dir: Path) -> None:
    """Likely wrong labels and outliers, from k-fold training; only a note when cleanlab is missing."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        result.notes.append(f"wrong labels and outliers need cleanlab, which is not installed: "
                            f"{INSTALL_HINT}")
        return
    if folds < 2:
        result.notes.append("wrong labels and outliers skipped: --folds must be at least 2")
        return
    small = min(np.bincount(data.train_labels.numpy(), minlength=len(data.classes)))
    if small < folds:
        result.notes.append(f"wrong labels and outliers skipped: a class has {small} training image(s), "
                            f"fewer than the {folds} folds")
        return
    print(f"training {folds} models of {cfg.model} for {cfg.epochs} epochs, each on {folds - 1}/{folds} of "
          f"the {len(data.train_labels):,} training images", flush=True)
    cv = cross_validate(cfg, data, folds, device)
    result.cross_validated = True
    probs = np.concatenate([cv.train_probs, cv.test_probs])
    outlier = np.concatenate([cv.train_outlier, cv.test_outlier])
    atomic_write(out_dir / "out_of_sample.npz", lambda f: np.savez(f, names=np.array(names), labels=labels,
                                                                   probabilities=probs, outlier=outlier))
    # low_self_confidence flagged 0.908 precise at 0.809 recall on 10% moved CIFAR labels, where the default
    # prune_by_noise_rate flagged 0.653 precise (docs/messy-folders.md)
    flagged = find_label_issues(labels, probs, filter_by="low_self_confidence",
                                return_indices_ranked_by="self_confidence", n_jobs=1)
    _judge_folds(result, cv.train_probs, data.train_labels.numpy(), flagged)
    classes = result.classes
    for i in flagged.tolist():
        others = probs[i].copy()
        others[labels[i]] = -1
        given = float(probs[i, labels[i]])
        result.findings.append(Finding(i, names[i], "label_issue", round(1 - given, 4), classes[labels[i]],
                                       classes[int(others.argmax())],
                                       f"p(given) {given:.2f}, p(suggested) {others.max():.2f}"))
    for i in _outliers(outlier):
        result.findings.append(Finding(i, names[i], "outlier", round(float(outlier[i]), 4),
                                       classes[labels[i]], classes[int(probs[i].argmax())],
                                       f"distance to nearest training images {outlier[i]:.3f}"))


def _judge_folds(result: Audit, train_probs: np.ndarray, train_labels: np.ndarray, flagged: np.ndarray
                 ) -> None:
    """Print how well the fold models classify the training images they did not train on; a wrong-label
    list from weak models is mostly their own mistakes, so say so when it holds over a fifth of them."""
    matrix = confusion_matrix(torch.from_numpy(train_labels), torch.from_numpy(train_probs.argmax(1)),
                              len(result.classes)).numpy()
    scores = classification_metrics(matrix)
    print(f"fold models: {scores['accuracy']:.2%} out-of-sample accuracy on the training images (balanced "
          f"{scores['balanced_accuracy']:.2%})", flush=True)
    share = float((flagged < len(train_labels)).sum()) / max(len(train_labels), 1)
    if share > 0.2:
        result.notes.append(
            f"{share:.0%} of the training images are flagged as wrong labels: at this accuracy the list "
            "mostly holds the fold models' own mistakes; train them longer (e.g. epochs=20) or audit a "
            "larger folder")


def _outliers(score: np.ndarray) -> list[int]:
    """Positions of the far-out scores (above the third quartile plus 3 interquartile ranges), highest first,
    at most OUTLIER_SHARE of all."""
    q1, q3 = np.quantile(score, [0.25, 0.75])
    far = np.flatnonzero(score > q3 + 3 * (q3 - q1))
    far = far[np.argsort(-score[far], kind="stable")]
    return far[:int(len(score) * OUTLIER_SHARE)].tolist()


def _write(result: Audit, names: list[str], images: torch.Tensor, out_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for f in result.findings:
        writer.writerow([f.path, f.issue, f"{f.score:.4f}", f.given, f.suggested, f.detail])
    atomic_write_text(out_dir / "audit.csv", buffer.getvalue())
    write_page(out_dir / "audit.html", result, names, images)


def _print_summary(result: Audit, out_dir: Path, cpu_seconds: float) -> None:
    width = max(12, max(map(len, result.classes)) + 2)
    print(f"\naudit of {result.name}: {len(result.classes)} classes")
    print(f"{'class':<{width}}{'train':>8}{'test':>8}")
    for i, name in enumerate(result.classes):
        print(f"{name:<{width}}{result.counts['train'][i]:>8}{result.counts['test'][i]:>8}")
    print(f"imbalance (largest / smallest training class): {result.imbalance:.1f}:1")
    for issue, text in ISSUES.items():
        print(f"{text + ':':<44}{result.shown_count(issue):>7}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    top = [f for f in result.findings if f.issue == "label_issue"][:10]
    if top:
        print("\nmost likely wrong labels (given -> suggested):")
        for f in top:
            print(f"  {f.path}: {f.given} -> {f.suggested} ({f.detail})")
    print(f"\nwrote {out_dir / 'audit.csv'} and {out_dir / 'audit.html'} ({cpu_seconds:.0f} CPU seconds)")
