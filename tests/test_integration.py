"""Trains on the real CIFAR-10 copy; runs only when CIFAR10_DIR points at it (as .ci/run arranges)."""

import os

import pytest

from cifarcnn.config import make_config
from cifarcnn.train import train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.environ.get("CIFAR10_DIR"), reason="set CIFAR10_DIR to the real CIFAR-10 copy"),
]


def test_one_epoch_of_the_default_recipe_beats_35_percent(tmp_path):
    state = train(make_config({}, ["epochs=1"]), tmp_path / "run", device="cpu")
    assert state["history"][0]["val_acc"] > 0.35
    assert (tmp_path / "run" / "best.pt").exists()
