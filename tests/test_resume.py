"""`train --resume RUN KEY=VALUE`: the optimizer's hyperparameters given on resume are the ones it continues
with (the saved optimizer state brings its buffers, not its old settings), and a change that cannot apply is
refused."""

from __future__ import annotations

import pytest
import torch

from cifarcnn.base.config import make_config
from cifarcnn.cli import main
from cifarcnn.models.registry import build_model
from cifarcnn.training.checkpoint import load_checkpoint
from cifarcnn.training.optimizers import build_optimizer
from cifarcnn.training.train import resume_config, train

SMALL = ["epochs=1", "batch_size=64", "eval_batch_size=50", "data.val_size=100", "log_every=2",
         "scheduler.name=constant"]  # a constant rate: each group's last lr is the peak x its lr_scale
BEFORE = ["optimizer.lr=0.01", "optimizer.weight_decay=0.001", "optimizer.momentum=0.8",
          "optimizer.bias_lr_scale=2", "optimizer.muon_lr=0.05", "optimizer.muon_momentum=0.6"]
AFTER = ["epochs=2", "optimizer.lr=0.02", "optimizer.weight_decay=0.003", "optimizer.momentum=0.7",
         "optimizer.bias_lr_scale=4", "optimizer.muon_lr=0.2", "optimizer.muon_momentum=0.5",
         "optimizer.nesterov=true"]
SETTINGS = ("lr_scale", "weight_decay", "momentum", "nesterov", "muon", "until_epoch")


@pytest.mark.parametrize("name", ["sgd", "adam", "muon"])
def test_optimizer_overrides_on_resume_are_the_ones_training_continues_with(name, cifar_root, tmp_path,
                                                                            capsys):
    run_dir = tmp_path / "run"
    before = make_config({}, [*SMALL, *BEFORE, f"optimizer.name={name}"])
    train(before, run_dir, data_dir=cifar_root, device="cpu")
    cfg = resume_config(run_dir, AFTER)
    train(cfg, run_dir, data_dir=cifar_root, device="cpu", resume=True)
    saved = load_checkpoint(run_dir / "last.pt")
    groups = saved["optimizer_state"]["param_groups"]  # as they were at the last step of the resumed epoch
    assert saved["epoch"] == 2 and saved["optimizer_state"]["state"]  # trained on, with momentum or moments
    model = build_model(saved["model"], saved["num_classes"])
    expected = build_optimizer(cfg, model, torch.device("cpu")).param_groups  # a new run's, these settings
    assert len(groups) == len(expected)
    for group, want in zip(groups, expected):
        assert {k: group.get(k) for k in SETTINGS} == {k: want.get(k) for k in SETTINGS}
        assert group["lr"] == pytest.approx(0.02 * want["lr_scale"])
    if name == "muon":  # the filters: the new muon_lr and muon_momentum, not 0.02 x (0.05 / 0.01)
        filters = [g for g in groups if g["muon"]]
        assert filters and all(g["lr"] == pytest.approx(0.2) and g["momentum"] == 0.5 for g in filters)
    biases = [g for g in groups if g["lr_scale"] == 4]
    assert biases and all(g["lr"] == pytest.approx(0.08) for g in biases)  # lr x the new bias_lr_scale
    assert "changed since: epochs 1 -> 2, optimizer.lr 0.01 -> 0.02" in capsys.readouterr().out


def test_another_optimizer_on_resume_is_refused_naming_the_key(cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(make_config({}, SMALL), run_dir, data_dir=cifar_root, device="cpu")  # adam
    before = (run_dir / "last.pt").read_bytes()
    argv = ["train", "--resume", str(run_dir), "epochs=2", "optimizer.name=sgd", "--data-dir",
            str(cifar_root), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "config key 'optimizer.name'" in err and "resume with optimizer.name=adam" in err
    assert (run_dir / "last.pt").read_bytes() == before
