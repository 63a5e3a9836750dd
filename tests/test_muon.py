"""optimizer.name=muon: Muon (orthogonalized momentum) for conv filters, Nesterov SGD for everything else."""

import pytest
import torch
import torch.nn as nn

from cifarcnn.base.config import make_config
from cifarcnn.base.errors import ConfigError
from cifarcnn.models.registry import build_model
from cifarcnn.training.optimizers import build_optimizer
from cifarcnn.training.train import train

from .test_train import assert_resume_reproduces

MUON = ["optimizer.name=muon", "optimizer.lr=0.02", "optimizer.muon_lr=0.1", "optimizer.momentum=0.8",
        "optimizer.muon_momentum=0.7", "optimizer.nesterov=true", "optimizer.weight_decay=0.01"]


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(10))


def test_conv_filters_get_an_orthogonal_update_and_the_rest_nesterov_sgd():
    model = _small_model()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    model(x)  # materialize the lazy head
    reference = _small_model()
    reference(x)
    reference.load_state_dict(model.state_dict())
    cfg = make_config({}, MUON)
    optimizer = build_optimizer(cfg, model, torch.device("cpu"))
    # head weight, head bias, conv filters, BatchNorm
    assert [g["muon"] for g in optimizer.param_groups] == [False, False, True, False]
    for group in optimizer.param_groups:  # as the trainer sets them: the peak rate x each group's lr_scale
        group["lr"] = 0.02 * group["lr_scale"]
    sgd = torch.optim.SGD([{"params": [p for p in reference.parameters() if p.ndim != 4]}], lr=0.02,
                          momentum=0.8, nesterov=True, weight_decay=0.01)
    conv = model[0].weight
    grads = []
    for _ in range(2):  # the second step has momentum
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for a, b in zip(model.parameters(), reference.parameters()):  # the same gradients for SGD
            b.grad = a.grad.clone()
        before = conv.detach().clone()
        grads.append(conv.grad.clone())
        optimizer.step()
        sgd.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if a.ndim != 4:
            assert torch.allclose(a, b, atol=1e-6), name

    # The filter update, after the filter was rescaled to norm sqrt(8): the shape of the weight, singular
    # values near 1 (Newton-Schulz lands them in about [0.7, 1.2]), and the singular vectors of the Nesterov
    # momentum direction (at the filters' own momentum, 0.7) it came from.
    update = (before * 8**0.5 / before.norm() - conv.detach()) / 0.1
    assert update.shape == conv.shape == (8, 3, 3, 3)
    matrix = update.reshape(8, -1)
    s = torch.linalg.svdvals(matrix)
    assert s.min() > 0.6 and s.max() < 1.3, s
    direction = grads[1] + 0.7 * (0.7 * grads[0] + grads[1])  # g2 + m x buffer, buffer = m x g1 + g2
    u, _, vh = torch.linalg.svd(direction.reshape(8, -1), full_matrices=False)
    rotated = u.T @ matrix @ vh.T  # diagonal if the update is U S' V^T with the direction's U and V
    off = rotated - torch.diag(torch.diagonal(rotated))
    assert off.norm() < 1e-3 * rotated.norm(), (off.norm(), rotated.norm())
    assert torch.diagonal(rotated).min() > 0.6


def test_muon_gives_every_bias_the_bias_rate_at_the_same_decay_per_step():
    """As the published recipe groups them: biases (BatchNorm's, FastNet's whitening bias, a linear bias) at
    lr x bias_lr_scale, with weight decay / bias_lr_scale, so each step decays them as much as the other
    parameters; the whitening bias keeps its limited epochs."""
    cfg = make_config({}, [*MUON, "optimizer.bias_lr_scale=64", "model=fastnet"])
    model = build_model("fastnet")
    optimizer = build_optimizer(cfg, model, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        kinds = {p.ndim for p in group["params"]}
        assert len(kinds) == 1, [names[id(p)] for p in group["params"]]
        scale = {1: 64, 2: 1, 4: 0.1 / 0.02}[kinds.pop()]
        assert group["lr_scale"] == pytest.approx(scale)
        assert group["lr_scale"] * group["weight_decay"] == pytest.approx(0.0 if group["muon"] else 0.01)
    whiten = next(g for g in optimizer.param_groups
                  if any(names[id(p)] == "whiten.bias" for p in g["params"]))
    assert (whiten["lr_scale"], whiten["until_epoch"]) == (64, 3)


def test_resume_with_muon_reproduces_an_uninterrupted_run(cifar_root, tmp_path, small_overrides):
    cfg = make_config({}, [*small_overrides, *MUON])
    full = train(cfg, tmp_path / "full", data_dir=cifar_root, device="cpu")
    resumed = assert_resume_reproduces(cfg, full, tmp_path / "resumed", tmp_path / "full", cifar_root)
    assert any(g["muon"] for g in resumed["optimizer_state"]["param_groups"])


def test_muon_config_validates():
    cfg = make_config({}, MUON)
    assert (cfg.optimizer.name, cfg.optimizer.muon_lr) == ("muon", 0.1)
    for bad in ("optimizer.muon_lr=0", "optimizer.muon_lr=-1", "optimizer.muon_lr=fast"):
        with pytest.raises(ConfigError, match="optimizer.muon_lr"):
            make_config({}, ["optimizer.name=muon", bad])
    with pytest.raises(ConfigError, match="optimizer.name"):
        make_config({}, ["optimizer.name=Muon"])
