"""What a model shows the trainer: its classifier as a ClassifierHead (fine-tuning finds and replaces it),
and, as a Model, the parameters that train only for their first epochs and an initialization from training
images. A plain nn.Module declares neither."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    """A registered architecture. Beyond nn.Module's forward it declares:

    - `train_epochs`: parameter name -> the number of first epochs it trains for, frozen after them (it keeps
      its own optimizer group); empty (the default): every trainable parameter trains to the end.
    - `init_image_count`: how many of the training images (the first ones, normalized) `init_from_data` reads
      before training, after the seeded construction; 0 (the default): it reads none and is not called."""

    def __init__(self, train_epochs: dict[str, int] | None = None, init_image_count: int = 0):
        super().__init__()
        self.train_epochs: dict[str, int] = dict(train_epochs or {})
        self.init_image_count = init_image_count

    def init_from_data(self, images: torch.Tensor) -> None:
        """Set parameters from `images` (float, normalized, N x 3 x H x W); by default nothing."""


class ClassifierHead(nn.Linear):
    """The classifier's linear layer, computed in fp32 even under bf16 autocast: bf16 logits carry about three
    significant digits, so two close classes would often tie, and the loss would see rounded logits. (Under no
    autocast, e.g. in an ONNX export, it is a plain Linear.) Every registered model holds exactly one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
