"""Shared fixtures: a small synthetic CIFAR-10 in the official python format, written to a temp folder."""

from __future__ import annotations

import pickle
import shutil
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cifarcnn.base.config import make_config
from cifarcnn.data.cifar import CLASSES

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
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}, f,
                    protocol=2)
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
    """A run trained for 2 epochs on the synthetic data, shared read-only by the predict/export/report
    tests."""
    from cifarcnn.training.train import train

    run_dir = tmp_path_factory.mktemp("shared-run") / "run"
    cfg = make_config({}, ["epochs=2", "batch_size=64", "eval_batch_size=50", "data.val_size=100",
                           "log_every=2"])
    train(cfg, run_dir, data_dir=cifar_root, device="cpu")
    return run_dir


@pytest.fixture
def edited_seed_preset(tmp_path_factory, monkeypatch):
    """`edit(old, new)`: from then on the package reads its presets from a copy whose seed.yaml has the text
    `old` replaced by `new`, so a command shows whether it really read the packaged seed preset."""
    import cifarcnn.base.config

    def edit(old: str, new: str) -> None:
        package = tmp_path_factory.mktemp("package")
        shutil.copytree(Path(str(resources.files("cifarcnn") / "presets")), package / "presets")
        seed = package / "presets" / "seed.yaml"
        assert old in seed.read_text()
        seed.write_text(seed.read_text().replace(old, new))
        monkeypatch.setattr(cifarcnn.base.config, "resources", SimpleNamespace(files=lambda name: package))

    return edit


# --------------------------------------------------------------------------- CIFAR-100 and folder datasets

CIFAR100_TRAIN, CIFAR100_TEST = 1000, 300


# Fine class -> superclass, as in the real files a fixed shuffle: 5 fine classes per superclass, but not in
# blocks of 5 (the real map sends fine class 0, apple, to superclass 4), so a loader deriving coarse from
# fine // 5 fails.
COARSE_OF_FINE = np.random.default_rng(100).permutation(np.repeat(np.arange(20), 5))
assert (COARSE_OF_FINE != np.arange(100) // 5).mean() > 0.9


def cifar100_images(n: int, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Images whose colour follows their fine class, with its superclass from COARSE_OF_FINE."""
    rng = np.random.default_rng(seed)
    fine = np.arange(n) % 100
    rng.shuffle(fine)
    palette = np.random.default_rng(4321).integers(20, 236, (100, 3, 1, 1))
    images = palette[fine] + rng.normal(0, 12, (n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), [int(x) for x in fine], \
        [int(COARSE_OF_FINE[x]) for x in fine]


def write_cifar100(root: Path, num_train: int = CIFAR100_TRAIN, num_test: int = CIFAR100_TEST) -> Path:
    """cifar-100-python/ with train, test and meta laid out as the official files are."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", num_train, 1), ("test", num_test, 2)):
        data, fine, coarse = cifar100_images(n, seed)
        batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
                 "fine_labels": fine, "coarse_labels": coarse, "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"fine_label_names": [f"fine{i:02d}" for i in range(100)],
            "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root)
    return root


FOLDER_CLASSES = ("cat", "dog", "fox")


def write_image_folder(root: Path, per_class: int = 24, test_per_class: int | None = 8,
                       size: int = 40) -> Path:
    """root/train/<class>/... (and root/test/<class>/...) of class-coloured images in several formats and
    depths."""
    rng = np.random.default_rng(7)
    palette = {"cat": (200, 60, 40), "dog": (40, 180, 60), "fox": (50, 70, 210)}
    formats = (("png", {}), ("jpg", {"quality": 95}), ("bmp", {}), ("webp", {"lossless": True}))
    splits = [("train", per_class)] + ([("test", test_per_class)] if test_per_class else [])
    for split, count in splits:
        for name in FOLDER_CLASSES:
            for i in range(count):
                folder = root / split / name / ("deeper/still" if i % 5 == 4 else "")
                folder.mkdir(parents=True, exist_ok=True)
                pixels = np.clip(np.array(palette[name]) + rng.normal(0, 20, (size, size + 8, 3)), 0, 255)
                ext, options = formats[i % len(formats)]
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.{ext}", **options)
    return root
