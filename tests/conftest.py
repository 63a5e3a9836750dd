"""Shared fixtures: a small synthetic CIFAR-10 in the official python format, written to a temp folder."""

from __future__ import annotations

import pickle
import shutil
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cifarcnn.config import make_config
from cifarcnn.data import CLASSES

PER_TRAIN_BATCH = 120  # 5 batches -> 600 training images
NUM_TEST = 200


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Images whose mean colour depends on the class, plus noise, so a model can learn something fast."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    palette = np.random.default_rng(1234).integers(30, 226, (len(CLASSES), 3, 1, 1))
    images = palette[labels] + rng.normal(0, 25, (n, 3, 32, 32))
    images[:, :, 8:24, 12:20] += 40  # a bright bar so crops and flips change the picture
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), [int(x) for x in labels]


def write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    batch = {"batch_label": path.name, "labels": labels, "data": data,
             "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_cifar(root: Path, per_batch: int = PER_TRAIN_BATCH, num_test: int = NUM_TEST) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", *synthetic_images(per_batch, i))
    write_batch(folder / "test_batch", *synthetic_images(num_test, 99))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return folder


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A folder holding cifar-10-batches-py/ with 600 training and 200 test images."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    return root


@pytest.fixture
def small_overrides() -> list[str]:
    """A recipe that trains in a second or two on the synthetic data."""
    return ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100", "log_every=2"]


@pytest.fixture
def small_config(small_overrides):
    return make_config({}, small_overrides)


@pytest.fixture(scope="session")
def trained_run_dir(cifar_root, tmp_path_factory) -> Path:
    """A run trained for 2 epochs on the synthetic data, shared read-only by the predict/export/report tests."""
    from cifarcnn.train import train

    run_dir = tmp_path_factory.mktemp("shared-run") / "run"
    cfg = make_config({}, ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100", "log_every=2"])
    train(cfg, run_dir, data_dir=cifar_root, device="cpu")
    return run_dir


@pytest.fixture
def edited_seed_preset(tmp_path_factory, monkeypatch):
    """`edit(old, new)`: from then on the package reads its presets from a copy whose seed.yaml has the text `old`
    replaced by `new`, so a command shows whether it really read the packaged seed preset."""
    import cifarcnn.config

    def edit(old: str, new: str) -> None:
        package = tmp_path_factory.mktemp("package")
        shutil.copytree(Path(str(resources.files("cifarcnn") / "presets")), package / "presets")
        seed = package / "presets" / "seed.yaml"
        assert old in seed.read_text()
        seed.write_text(seed.read_text().replace(old, new))
        monkeypatch.setattr(cifarcnn.config, "resources", SimpleNamespace(files=lambda name: package))

    return edit
