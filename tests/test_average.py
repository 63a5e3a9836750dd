"""Weight averaging (`ema_decay`): the average's arithmetic, and a run that validates, saves and resumes
it."""

import pytest
import torch
import torch.nn as nn

from cifarcnn.base.config import DataConfig, make_config
from cifarcnn.base.inference import settings_for
from cifarcnn.data.cifar import load_cifar10
from cifarcnn.data.loader import Loader, training_split
from cifarcnn.training.averages import WeightAverage
from cifarcnn.training.checkpoint import load_checkpoint, model_from_checkpoint
from cifarcnn.training.distributed import Dist
from cifarcnn.training.schedule import learning_rate
from cifarcnn.training.train import evaluate_split, train

DETERMINISTIC = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm")


def test_the_average_moves_by_one_minus_decay_and_is_applied_only_inside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, 0.75)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(1.0)  # at the peak learning rate: decay 0.75
    expected = 0.75 * start + 0.25 * (start + 1)
    assert torch.allclose(average.average["0.weight"], expected)
    # num_batches_tracked comes from the model
    assert set(average.state_dict(model)) == set(model.state_dict())
    with average.applied():  # the average itself, exactly (lerp rounds differently from the formula above)
        assert torch.equal(model[0].weight, average.average["0.weight"])
    assert torch.equal(model[0].weight, start + 1)  # the trained weights are back


def test_the_average_covers_the_batchnorm_running_statistics_at_the_given_fraction_of_the_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, 0.8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(16, 2) * 3 + 5)  # a training-mode forward moves the running mean and variance
    live = model.state_dict()
    assert not torch.equal(live["1.running_mean"], start["1.running_mean"])
    average.update(0.5)  # half the peak learning rate: decay 0.8 x 0.5
    for name in ("1.running_mean", "1.running_var", "0.weight"):
        assert torch.allclose(average.average[name], 0.4 * start[name] + 0.6 * live[name]), name
    with average.applied():
        assert torch.equal(model[1].running_mean, average.average["1.running_mean"])
        assert torch.equal(average.state_dict(model)["1.running_var"], model[1].running_var)
    assert torch.equal(model[1].running_mean, live["1.running_mean"])


def applied_decay(before: list[torch.Tensor], live: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """The decay d of the step before -> after = d x before + (1 - d) x live, fitted over every element."""
    moved = torch.cat([(a - b).flatten() for a, b in zip(after, before)]).double()
    gap = torch.cat([(v - b).flatten() for v, b in zip(live, before)]).double()
    return 1 - float(moved @ gap / (gap @ gap))


def test_the_trainer_decays_the_average_by_ema_decay_times_lr_over_its_peak(cifar_root, tmp_path,
                                                                           small_overrides, monkeypatch):
    """Through the trainer's own call: on a linear schedule the fraction lr / peak passes 1, 0.5 and values in
    between, and each step's average moves by exactly that fraction of the decay."""
    cfg = make_config({}, [*small_overrides, "epochs=1", "ema_decay=0.9", "scheduler.name=linear"])
    decays = []
    original = WeightAverage.update

    def measured(self, lr_fraction):
        before, live = [t.clone() for t in self.average.values()], [t.clone() for t in self._live]
        original(self, lr_fraction)
        decays.append(applied_decay(before, live, list(self.average.values())))

    monkeypatch.setattr(WeightAverage, "update", measured)
    train(cfg, tmp_path / "r", data_dir=cifar_root, device="cpu")
    steps = 8  # 500 training images in batches of 64
    expected = [0.9 * learning_rate(cfg, k / steps) / cfg.optimizer.lr for k in range(steps)]
    assert expected[0] == pytest.approx(0.9) and expected[4] == pytest.approx(0.45)  # fractions 1 and 0.5
    assert decays == pytest.approx(expected, abs=1e-3)


def val_metrics(cifar_root, state_dict, checkpoint):
    """(loss, accuracy) of `state_dict` on the run's validation split, as the trainer evaluates it."""
    model = model_from_checkpoint({**checkpoint, "model_state": state_dict}).to(
        memory_format=torch.channels_last)
    data = load_cifar10(cifar_root)
    _, (val_x, val_y) = training_split(data, DataConfig(val_size=100))
    loader = Loader(val_x, val_y, 50, device="cpu", memory_format=torch.channels_last)
    settings = settings_for({"tta": 0}, torch.device("cpu"))
    loss, acc, _, _ = evaluate_split(model, loader, Dist(), None, settings)
    return loss, acc


def test_a_run_validates_and_saves_the_average_and_resumes_it_exactly(cifar_root, tmp_path, small_overrides):
    cfg = make_config({}, [*small_overrides, "ema_decay=0.9"])
    full = train(cfg, tmp_path / "full", data_dir=cifar_root, device="cpu")
    checkpoint = load_checkpoint(tmp_path / "full" / "last.pt")
    average, trained = checkpoint["model_state"], checkpoint["train_model_state"]
    assert not torch.equal(average["blocks.0.conv.weight"], trained["blocks.0.conv.weight"])
    loss, acc = val_metrics(cifar_root, average, checkpoint)
    assert (full["history"][-1]["val_loss"] == pytest.approx(loss, rel=1e-6)
            and full["history"][-1]["val_acc"] == acc)
    assert val_metrics(cifar_root, trained, checkpoint)[0] != pytest.approx(loss, rel=1e-6)

    train(cfg, tmp_path / "resumed", data_dir=cifar_root, device="cpu",
          on_epoch_end=lambda m: m["epoch"] == 1)
    resumed = train(cfg, tmp_path / "resumed", data_dir=cifar_root, device="cpu", resume=True)
    metrics = [{k: m[k] for k in DETERMINISTIC} for m in resumed["history"]]
    assert metrics == [{k: m[k] for k in DETERMINISTIC} for m in full["history"]]
    again = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key in ("model_state", "train_model_state"):
        assert all(torch.equal(checkpoint[key][k], again[key][k]) for k in checkpoint[key])


def test_the_average_ends_on_the_trained_weights_when_the_rate_reaches_zero(cifar_root, tmp_path,
                                                                            small_overrides):
    # linear decay to 0 and lookahead's final step: the last update has decay 0
    cfg = make_config({}, [*small_overrides, "ema_decay=0.9", "scheduler.name=linear",
                           "optimizer.lookahead_steps=2"])
    train(cfg, tmp_path / "r", data_dir=cifar_root, device="cpu")
    checkpoint = load_checkpoint(tmp_path / "r" / "last.pt")
    assert all(torch.equal(v, checkpoint["train_model_state"][k])
               for k, v in checkpoint["model_state"].items())
