"""Out-of-sample predictions for every image of a dataset, for the audit: k-fold training of a configured
recipe on the training side, each fold's model predicting the images it did not train on.

A training image's probabilities come from the one fold model that held it out; a test image's are the mean
of every fold model's (none trained on it). Each fold trains with the training building blocks (loaders,
model, step, weight averages, `loop.train_epoch`), without validation, checkpoints or a run folder. Alongside,
each image's penultimate features (the classifier's input, from the unaugmented view) give an outlier score:
the mean cosine distance to its nearest neighbours among the fold's own training images, in that fold model's
feature space (features of different fold models are never compared).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..base.config import Config
from ..base.inference import Settings, infer, settings_for
from ..base.progress import bar_disabled, on_terminal
from ..data.dataset import Dataset
from ..data.loader import Loader
from ..models.contract import ClassifierHead
from ..training.averages import Averages
from ..training.build import CHANNELS_LAST, make_model, make_step, train_loader
from ..training.epochstate import EpochStart
from ..training.loop import train_epoch
from ..training.schedule import learning_rate

NEIGHBOURS = 10  # outlier score: mean distance to this many nearest training images of the fold
REFERENCE_IMAGES = 10_000  # at most this many of a fold's training images are the outlier reference


@dataclass
class CrossVal:
    """Out-of-sample class probabilities and outlier scores, per training and per test image."""

    train_probs: np.ndarray  # (N, K)
    test_probs: np.ndarray  # (M, K)
    train_outlier: np.ndarray  # (N,)
    test_outlier: np.ndarray  # (M,)
    folds: int


def fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each training image's fold, 0..folds-1: each class's images shuffled (seeded) and dealt out in turn, so
    every fold holds each class in proportion."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + int(c)) % folds
    return fold


def cross_validate(cfg: Config, data: Dataset, folds: int, device: torch.device) -> CrossVal:
    """Train `folds` models, each on all training images but one fold, with a progress bar over the folds."""
    labels = data.train_labels.numpy()
    fold = fold_of(labels, folds, cfg.seed)
    k = len(data.classes)
    train_probs = np.zeros((len(labels), k), dtype=np.float32)
    train_outlier = np.zeros(len(labels), dtype=np.float32)
    test_probs = np.zeros((len(data.test_labels), k), dtype=np.float32)
    test_outlier = np.zeros(len(data.test_labels), dtype=np.float32)
    settings = settings_for(cfg.to_dict(), device)
    for f in tqdm(range(folds), desc="audit folds", unit="fold", disable=bar_disabled()):
        held = fold == f
        model = _train_fold(cfg, data, torch.from_numpy(~held), device, settings)
        reference = _reference(data, ~held, cfg.seed)
        plain = Settings(0, settings.precision, settings.precision_reason, settings.mirror)
        ref_features = _predict(model, data, reference, data.train_labels[:len(reference)], cfg, device,
                                plain)[1]
        probs, features = _predict(model, data, data.train_images[held], data.train_labels[held], cfg, device,
                                   settings)
        train_probs[held], train_outlier[held] = probs, _knn_distance(features, ref_features)
        probs, features = _predict(model, data, data.test_images, data.test_labels, cfg, device, settings)
        test_probs += probs / folds
        test_outlier += _knn_distance(features, ref_features) / folds
        if not on_terminal():  # a log gets a line per fold instead of the bar
            print(f"audit: fold {f + 1}/{folds} done", file=sys.stderr, flush=True)
    return CrossVal(train_probs, test_probs, train_outlier, test_outlier, folds)


def _train_fold(cfg: Config, data: Dataset, keep: torch.Tensor, device: torch.device, settings: Settings
                ) -> torch.nn.Module:
    """A model trained on the training images `keep` selects, as a run would train it, with its weight
    averages applied."""
    x, y = data.train_images[keep], data.train_labels[keep]
    model = make_model(cfg, len(data.classes), x, device, mean=data.mean, std=data.std)
    step = make_step(cfg, model, device, settings.precision)
    loader = train_loader(cfg, x, y, data, device)
    averages = Averages(model, cfg, cfg.epochs * len(loader))
    for epoch in range(cfg.epochs):
        train_epoch(epoch, cfg, step, loader, averages, start=EpochStart(), check_in=lambda *_: None,
                    show_progress=False)
    averages.finish(learning_rate(cfg, cfg.epochs) / cfg.optimizer.lr)
    if averages.ema is not None:  # the weights a run keeps: the EMA's
        model.load_state_dict(averages.ema.state_dict(model))
    return model.eval()


def _reference(data: Dataset, trained: np.ndarray, seed: int) -> torch.Tensor:
    """The fold's training images the outlier score measures against (a seeded sample when there are many)."""
    positions = np.flatnonzero(trained)
    if len(positions) > REFERENCE_IMAGES:
        positions = np.sort(np.random.default_rng(seed).choice(positions, REFERENCE_IMAGES, replace=False))
    return data.train_images[torch.from_numpy(positions)]


@torch.inference_mode()
def _predict(model: torch.nn.Module, data: Dataset, images: torch.Tensor, labels: torch.Tensor, cfg: Config,
             device: torch.device, settings: Settings) -> tuple[np.ndarray, torch.Tensor]:
    """Softmax probabilities (with the settings' TTA) and L2-normalized penultimate features (of the first,
    unaugmented view) of `images`."""
    head = next(m for m in model.modules() if isinstance(m, ClassifierHead))
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    loader = Loader(images, labels, cfg.eval_batch_size, device=device, memory_format=CHANNELS_LAST,
                    mean=data.mean, std=data.std)
    probs, features = [], []
    try:
        for x, _ in loader:
            seen.clear()
            probs.append(infer(model, x, settings).softmax(1).cpu())
            features.append(F.normalize(seen[0].float().flatten(1), dim=1).cpu())
    finally:
        hook.remove()
    if not probs:
        return np.zeros((0, len(data.classes)), dtype=np.float32), torch.zeros(0, 1)
    return torch.cat(probs).numpy(), torch.cat(features)


def _knn_distance(features: torch.Tensor, reference: torch.Tensor, chunk: int = 4096) -> np.ndarray:
    """Mean cosine distance of each feature row to its NEIGHBOURS nearest reference rows."""
    k = min(NEIGHBOURS, len(reference))
    out = [(1 - (part @ reference.T).topk(k, dim=1).values).mean(1) for part in features.split(chunk)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
