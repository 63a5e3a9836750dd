"""The model registry: every architecture by name, built for a class count and an image size. A new
architecture joins by one entry in MODELS (docs/development.md, "Adding a model")."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from .contract import Model
from .fastnet import FastNet, FastNet96, FastNet96Config, FastNetConfig
from .resnet import ResNet, ResNetConfig
from .simple_cnn import SimpleCNN, SimpleCNNConfig

# name -> builder(num_classes, image_size); every model takes square RGB images of `image_size` pixels (the
# fully convolutional ones end in a global pool, so only SimpleCNN's first linear layer depends on the size).
MODELS: dict[str, Callable[[int, int], Model]] = {
    "simple_cnn": lambda num_classes, image_size: SimpleCNN(SimpleCNNConfig(num_classes=num_classes,
                                                                            image_size=image_size)),
    "fastnet": lambda num_classes, image_size: FastNet(FastNetConfig(num_classes=num_classes)),
    # the quick preset's net, sized for accuracy per CPU-second (docs/presets.md, "The quick preset")
    "quicknet": lambda num_classes, image_size: FastNet(FastNetConfig(widths=(48, 96, 96),
                                                                      whiten_bias_epochs=0,
                                                                      num_classes=num_classes)),
    "fastnet96": lambda num_classes, image_size: FastNet96(FastNet96Config(num_classes=num_classes)),
    "resnet18": lambda num_classes, image_size: ResNet(ResNetConfig(num_classes=num_classes)),
}


def build_model(name: str, num_classes: int = 10, image_size: int = 32) -> Model:
    """Build a registered architecture for `num_classes` classes and `image_size` x `image_size` inputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, image_size)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
