"""Imbalanced classes and small datasets: each `data.balance` option changes the training loss or the sampling
as documented (and nothing on classes of equal size), and the step budget (`min_steps`) raises a small
dataset's epochs while leaving every preset's CIFAR schedule as it is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cifarcnn.base.config import load_preset, make_config, preset_names
from cifarcnn.cli import main
from cifarcnn.data.loader import Loader
from cifarcnn.models.registry import build_model
from cifarcnn.training import build
from cifarcnn.training.balance import resolve
from cifarcnn.training.budget import fit_schedule, stretch_limited_epochs
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.optimizers import build_optimizer
from cifarcnn.training.step import TrainStep
from cifarcnn.training.train import train

from .test_train import assert_resume_reproduces

COUNTS = torch.tensor([60.0, 30.0, 10.0])


def step_for(balance: str, smoothing: float = 0.0, counts: torch.Tensor | None = COUNTS) -> TrainStep:
    cfg = make_config({}, [f"data.balance={balance}", f"label_smoothing={smoothing}"])
    model = nn.Linear(4, 3)
    return TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, torch.device("cpu"), "fp32",
                     class_counts=counts)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=generator) * 3, torch.tensor([0, 1, 2, 2, 0, 1, 2, 0])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_weighted_loss_is_the_inverse_frequency_weighted_mean_computed_by_hand():
    logits, y = batch()
    inverse = 1 / COUNTS.numpy().astype(np.float64)
    weights = inverse / inverse.mean()  # mean 1 over the classes
    assert np.isclose(weights.mean(), 1) and weights[2] == pytest.approx(6 * weights[0])
    assert np.allclose(step_for("weighted_loss").class_weight.numpy(), weights)
    nll = -log_softmax(logits.double().numpy())[np.arange(8), y.numpy()]
    by_hand = (weights[y.numpy()] * nll).sum() / weights[y.numpy()].sum()
    assert step_for("weighted_loss").loss(logits, y).item() == pytest.approx(by_hand, rel=1e-5)
    assert step_for("none").loss(logits, y).item() == pytest.approx(nll.mean(), rel=1e-5)


def test_logit_adjustment_is_cross_entropy_on_the_logits_plus_the_log_prior_smoothed_by_the_prior():
    logits, y = batch()
    prior = (COUNTS / COUNTS.sum()).double().numpy()
    logp = log_softmax(logits.double().numpy() + np.log(prior))
    smoothing = 0.2
    target = np.tile(smoothing * prior, (8, 1))
    target[np.arange(8), y.numpy()] += 1 - smoothing
    by_hand = -(target * logp).sum(1).mean()
    assert step_for("logit_adjust", smoothing).loss(logits, y).item() == pytest.approx(by_hand, rel=1e-5)
    plain = F.cross_entropy(logits, y, label_smoothing=smoothing).item()
    assert step_for("none", smoothing).loss(logits, y).item() == pytest.approx(plain, rel=1e-6)
    assert abs(by_hand - plain) > 0.01  # the prior matters on these counts


def test_logit_adjusted_logits_learned_with_label_smoothing_favour_no_class():
    # The optimum of the adjusted loss for a model that sees nothing (bias only) on 100:1 labels: the balanced
    # world's logits are equal. With the smoothing spread evenly they would rank the rarest class first.
    counts = torch.tensor([1000.0, 100.0, 10.0])
    y = torch.repeat_interleave(torch.arange(3), counts.long())
    step = step_for("logit_adjust", 0.2, counts)
    bias = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = step.loss(bias.expand(len(y), 3), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert (bias.max() - bias.min()).item() < 1e-3, bias


def test_auto_adjusts_the_logits_above_3_to_1_and_leaves_cifar_as_it_was():
    assert make_config({}, []).data.balance == "auto"  # the default
    assert resolve("auto", [60, 30, 10]) == "logit_adjust" and resolve("auto", [31, 10]) == "logit_adjust"
    assert resolve("auto", [30, 10]) == "none"  # 3:1 is not above 3:1
    cifar_split = [4502, 4489, 4517, 4480, 4493, 4521, 4507, 4498, 4511, 4482]  # a random 45k/5k split
    assert resolve("auto", cifar_split) == "none"
    assert step_for("auto", 0.2, torch.tensor(cifar_split, dtype=torch.float)).log_prior is None
    assert torch.equal(step_for("auto", 0.2).log_prior, step_for("logit_adjust", 0.2).log_prior)
    assert all(resolve(b, [60, 30, 10]) == b for b in ("none", "weighted_loss", "sampling", "logit_adjust"))


@pytest.mark.parametrize("balance", ["weighted_loss", "logit_adjust"])
def test_on_classes_of_equal_size_the_loss_options_are_none(balance):
    step = step_for(balance, 0.2, torch.tensor([5.0, 5.0, 5.0]))
    assert step.class_weight is None and step.log_prior is None
    logits, y = batch()
    assert torch.equal(step.loss(logits, y), step_for("none", 0.2).loss(logits, y))


def test_balanced_sampling_draws_every_class_about_equally_and_is_seeded_per_epoch():
    labels = torch.cat([torch.zeros(1000, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    images = torch.zeros(1100, 3, 4, 4, dtype=torch.uint8)
    balanced = Loader(images, labels, 100, device="cpu", shuffle=True, seed=3, balanced=True)
    orders = [balanced.order(epoch) for epoch in range(4)]
    shares = [labels[order].float().mean().item() for order in orders]
    assert all(len(order) == 1100 for order in orders)
    assert all(0.45 < share < 0.55 for share in shares), shares
    assert torch.equal(orders[1], balanced.order(1)) and not torch.equal(orders[0], orders[1])
    plain = Loader(images, labels, 100, device="cpu", shuffle=True, seed=3)
    assert labels[plain.order(0)].float().mean().item() == pytest.approx(100 / 1100)


def imbalanced_folder(root, counts=(40, 12, 4)):
    """root/train/class<c>/ with counts[c] pictures of a class colour, root/test/ with 2 of each."""
    rng = np.random.default_rng(0)
    for c, count in enumerate(counts):
        for side, n in (("train", count), ("test", 2)):
            folder = root / side / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                colour = np.array([60 + 70 * c, 120, 200 - 70 * c])
                pixels = np.clip(colour + rng.normal(0, 20, (16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_a_run_trains_with_its_training_split_s_class_counts(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr("cifarcnn.training.train.make_step",
                        lambda *a, **k: steps.append(build.make_step(*a, **k)) or steps[-1])
    folder = imbalanced_folder(tmp_path / "data")
    cfg = make_config({}, ["data.dataset=folder", f"data.path={folder}", "data.val_size=0", "epochs=1",
                           "batch_size=16", "data.image_size=16", "data.balance=logit_adjust"])
    train(cfg, tmp_path / "run", device="cpu")
    assert torch.allclose(steps[0].log_prior.exp(), torch.tensor([40, 12, 4]) / 56)


def test_resume_with_balanced_sampling_reproduces_an_uninterrupted_run(cifar_root, tmp_path, small_overrides):
    cfg = make_config({}, [*small_overrides, "data.balance=sampling"])
    full = train(cfg, tmp_path / "full", data_dir=cifar_root, device="cpu")
    plain = train(make_config({}, small_overrides), tmp_path / "plain", data_dir=cifar_root, device="cpu")
    assert full["history"][0]["train_loss"] != plain["history"][0]["train_loss"]  # another draw
    assert_resume_reproduces(cfg, full, tmp_path / "resumed", tmp_path / "full", cifar_root)


# -- the step budget ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("images", [45_000, 50_000])
def test_every_preset_keeps_its_schedule_on_cifar(name, images):
    cfg = load_preset(name)
    fitted, budget = fit_schedule(cfg, math.ceil(images / cfg.batch_size))
    assert fitted is cfg and not budget.raised and budget.banner(images) is None


def test_a_small_folder_s_epochs_and_epoch_counted_schedule_stretch_to_the_budget():
    cfg = load_preset("quick", ["patience=2", "scheduler.epochs=6"])
    fitted, budget = fit_schedule(cfg, 3)  # 581 images at 90%, batches of 256
    assert (fitted.epochs, budget.factor) == (294, 294 / 5) and fitted.epochs * 3 >= cfg.min_steps
    assert fitted.scheduler.warmup_epochs == pytest.approx(294 / 5)
    assert (fitted.patience, fitted.scheduler.epochs) == (118, 353)
    assert budget.banner(523) == ("523 training images: 5 epochs raised to 294 for at least 880 steps "
                                  "(min_steps; min_steps=0 trains exactly the epochs)")
    assert fit_schedule(fitted, 3)[0] is fitted  # a resumed run's schedule is the same


def test_the_whitening_bias_trains_for_the_same_share_of_a_raised_schedule():
    cfg = load_preset("fast")
    model = build_model("fastnet", 10, 32)
    optimizer = build_optimizer(cfg, model, torch.device("cpu"))
    _, budget = fit_schedule(cfg, 13)  # CIFAR-10-LT: 12,406 images
    stretch_limited_epochs(optimizer, budget)
    limited = [g["until_epoch"] for g in optimizer.param_groups if g["until_epoch"]]
    assert budget.epochs == 28 and limited == [math.ceil(3 * 28 / 8)]


def test_epochs_set_by_hand_are_trained_as_set():
    assert load_preset("quick").min_steps == 880
    assert load_preset("quick", ["epochs=60"]).min_steps == 0
    assert load_preset("quick", ["epochs=2", "min_steps=100"]).min_steps == 100


def test_a_raised_run_says_so_trains_the_budget_and_resumes_as_finished(tmp_path, capsys):
    folder = imbalanced_folder(tmp_path / "data", (20, 20, 20))
    args = ["train", "--preset", "quick", "data.dataset=folder", f"data.path={folder}", "data.val_size=0",
            "batch_size=32", "min_steps=18", "data.image_size=16", "--device", "cpu", "--runs-dir",
            str(tmp_path), "--name", "r"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "60 training images: 5 epochs raised to 9 for at least 18 steps (min_steps" in out  # 2 per epoch
    checkpoint = load_checkpoint(tmp_path / "r" / "last.pt")
    assert checkpoint["epoch"] == 9 and checkpoint["config"]["epochs"] == 5
    assert checkpoint["schedule"] == {"configured": 5, "epochs": 9, "steps_per_epoch": 2, "min_steps": 18}
    assert main(["train", "--resume", str(tmp_path / "r"), "--device", "cpu"]) == 0
    assert "nothing to do" in capsys.readouterr().out
