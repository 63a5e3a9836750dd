"""Trains on the real CIFAR-10 copy; runs only when CIFAR10_DIR points at it (as .ci/run arranges)."""

import os

import pytest
import torch

from cifarcnn.base.config import make_config
from cifarcnn.data.cifar import load_cifar10
from cifarcnn.data.dataset import MEAN, STD
from cifarcnn.training.train import train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("CIFAR10_DIR"), reason="set CIFAR10_DIR to the real CIFAR-10 copy"),
]


def test_one_epoch_of_the_default_recipe_beats_35_percent(tmp_path):
    state = train(make_config({}, ["epochs=1"]), tmp_path / "run", device="cpu")
    assert state["history"][0]["val_acc"] > 0.35
    assert (tmp_path / "run" / "best.pt").exists()


def test_the_normalization_constants_are_the_training_sets_mean_and_std():
    pixels = load_cifar10().train_images.double().div_(255).transpose(0, 1).reshape(3, -1)
    mean, std = pixels.mean(1), pixels.std(1, correction=0)
    assert torch.allclose(mean, torch.tensor(MEAN, dtype=torch.float64), atol=5e-4)
    # a copy rebuilt from JPEG (like the development one) is a little smoother: its std is up to 0.002 lower
    assert torch.allclose(std, torch.tensor(STD, dtype=torch.float64), atol=3e-3)
