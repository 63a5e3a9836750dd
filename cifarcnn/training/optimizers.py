"""The optimizer and its parameter groups: BatchNorm parameters apart from the rest, a group per parameter the
model trains only for its first epochs, and under `optimizer.name: muon` the split between Muon (conv filters)
and SGD (muon.py); which groups train in an epoch; a checkpoint's optimizer state loaded under the current
config."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..base.config import Config, OptimizerConfig
from ..models.contract import Model
from .muon import MuonSGD


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Parameter groups: BatchNorm parameters (lr x bias_lr_scale, decay / bias_lr_scale), the rest, and one
    group per parameter the model trains only for its first epochs (`model.train_epochs`, name -> epochs)."""
    o = cfg.optimizer
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()}
    limited = model.train_epochs if isinstance(model, Model) else {}  # the model contract
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for n, p in named if n not in limited]
    groups = [
        {"params": [p for p in trainable if id(p) not in norm_ids], "lr_scale": 1.0,
         "weight_decay": o.weight_decay, "until_epoch": None},
        {"params": [p for p in trainable if id(p) in norm_ids], "lr_scale": o.bias_lr_scale,
         "weight_decay": o.weight_decay / o.bias_lr_scale, "until_epoch": None},
    ]
    groups += [{"params": [p], "lr_scale": 1.0, "weight_decay": o.weight_decay, "until_epoch": limited[n]}
               for n, p in named if n in limited]
    cuda = device.type == "cuda"
    if o.name == "muon":
        return MuonSGD(_muon_groups(groups, o), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, fused=cuda or None)
    optimizer_class = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    # capturable: the step may be recorded in a CUDA graph (TrainStep)
    return optimizer_class(groups, lr=o.lr, fused=cuda or None, capturable=cuda)


def _muon_groups(groups: list[dict], o: OptimizerConfig) -> list[dict]:
    """Each group split three ways, as the airbench94_muon recipe groups them: conv filters (4-D) to Muon at
    muon_lr and muon_momentum; biases (1-D: BatchNorm's and the whitening bias) to SGD at lr x bias_lr_scale;
    the rest (the classifier's weights) to SGD at lr. Weight decay stays per step what the group had
    (lr x decay)."""
    split = []
    for group in groups:
        filters = [p for p in group["params"] if p.ndim == 4]
        biases = [p for p in group["params"] if p.ndim == 1]
        rest = [p for p in group["params"] if p.ndim not in (1, 4)]
        per_step_decay = group["lr_scale"] * group["weight_decay"]
        split += [{**group, "params": rest, "muon": False}] if rest else []
        split += [{**group, "params": biases, "muon": False, "lr_scale": o.bias_lr_scale,
                   "weight_decay": per_step_decay / o.bias_lr_scale}] if biases else []
        split += [{**group, "params": filters, "muon": True, "lr_scale": o.muon_lr / o.lr,
                   "momentum": o.muon_momentum, "weight_decay": 0.0}] if filters else []
    return split


def trains_in(group: dict, epoch: int) -> bool:
    """Whether a parameter group still learns in epoch `epoch` (0-based): its `until_epoch`, if any, is not
    over."""
    return group["until_epoch"] is None or epoch < group["until_epoch"]


def frozen_at(optimizer: torch.optim.Optimizer, epoch: int) -> list[nn.Parameter]:
    """The parameters whose training epochs are over in epoch `epoch` (0-based)."""
    return [p for group in optimizer.param_groups if not trains_in(group, epoch) for p in group["params"]]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer `state` (momentum buffers, Adam moments, step counts) into `optimizer`,
    built from the current config, keeping the hyperparameters its groups were built with: torch's
    load_state_dict would restore the saved ones, silently dropping a resume's overrides (weight_decay,
    momentum, nesterov, bias_lr_scale, muon_lr, muon_momentum) and scaling the Muon group by the new lr over
    the old (its lr_scale is muon_lr / lr). The groups hold the same parameters in the same order
    (load_state_dict checks it)."""
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyperparameters in zip(optimizer.param_groups, built):
        group.update(hyperparameters)
