"""The one inference path: `evaluate`, `predict`, the trainer's validation, `bench` and the ONNX export's
check all turn a batch of normalized images into logits here.

A checkpoint is run with its config's test-time augmentation (`tta`) and the precision its config resolves to
on this machine (bf16 autocast or fp32, `precision.choose`). Each TTA view's logits are cast to fp32 before
the views are averaged, so the average is the same whatever precision the views were computed in.

Probabilities, wherever a command shows or returns them, come from `probabilities`: softmax(logits / T) with
the temperature T the checkpoint's `calibration` records (`base.calibration`), the plain softmax without one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .errors import UsageError
from .precision import autocast, choose
from .progress import bar_disabled

TTA_LEVELS = {0: "none", 1: "mirror", 2: "mirror + 1-pixel shifts"}
# A model trained without mirrored images (augment.flip=none) is never shown a mirrored view: level 1 is then
# x alone and level 2 x and its two 1-pixel shifts.
TTA_LEVELS_NO_MIRROR = {0: "none", 1: "none: the training did not mirror", 2: "1-pixel shifts, no mirror"}
TTA_RECIPE = (
    "tta 1: average the logits of x and of x mirrored (reversed along the width axis). tta 2: pad x by 1 "
    "pixel on each side by reflection (numpy.pad mode 'reflect'), take the 32x32 windows of the padded image "
    "at rows and columns 0..31 and 2..33, and average the logits with weights 1/4 for x and its mirror and "
    "1/8 for each window and each window's mirror"
)
TTA_RECIPE_NO_MIRROR = (
    "this model was trained without mirrored images, so no view is mirrored. tta 1: x alone. tta 2: pad x by "
    "1 pixel on each side by reflection (numpy.pad mode 'reflect'), take the windows of the padded image at "
    "rows and columns 0..S-1 and 2..S+1, and average the logits with weights 1/2 for x and 1/4 for each "
    "window"
)


@dataclass(frozen=True)
class Settings:
    """How a checkpoint is run: its TTA level, whether its views include mirrors (only when the training
    mirrored images), precision ("fp32" or "bf16", and why), and the temperature its probabilities are
    divided by (None: uncalibrated) with the TTA level it was fitted with."""

    tta: int = 0
    precision: str = "fp32"
    precision_reason: str = "set by the caller"
    mirror: bool = True
    temperature: float | None = None
    temperature_tta: int | None = None

    def describe(self) -> str:
        arithmetic = "bf16 autocast" if self.precision == "bf16" else "fp32"
        return f"tta {self.tta} ({tta_views(self.tta, self.mirror)}), {arithmetic} ({self.precision_reason})"

    def describe_probabilities(self) -> str:
        """One line: what the probabilities shown are (calibrated or not)."""
        if self.temperature is None:
            return ("probabilities: UNCALIBRATED (plain softmax: this checkpoint holds no temperature; "
                    "`cifarcnn calibrate RUN` fits one)")
        line = f"probabilities: calibrated, softmax(logits / {self.temperature:.4f}) (fitted on validation"
        if self.temperature_tta is not None and self.temperature_tta != self.tta:
            return line + f" with tta {self.temperature_tta}, not the tta {self.tta} here: less exact)"
        return line + ")"


def probabilities(logits: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Float32 class probabilities of (N, C) logits: softmax(logits / T), T the settings' temperature (1 when
    the checkpoint is uncalibrated). The argmax is the logits'."""
    temperature = settings.temperature or 1.0
    return (logits.float() / temperature).softmax(1)


def tta_views(level: int, mirror: bool) -> str:
    return (TTA_LEVELS if mirror else TTA_LEVELS_NO_MIRROR)[level]


def trained_with_mirrors(config: dict) -> bool:
    """Whether a config's training mirrored images (augment.flip random or alternate)."""
    return (config.get("augment") or {}).get("flip", "random") != "none"


def settings_for(config: dict, device: torch.device, tta: int | None = None, *, mirror: bool | None = None
                 ) -> Settings:
    """The settings for a checkpoint's `config` on `device`; `tta` overrides the config's level. `mirror`:
    whether TTA may use mirrored views; None follows the config's augment.flip (a checkpoint passes what it
    recorded: `checkpoint_settings`)."""
    if tta is None:
        tta = int(config.get("tta", 0))
    elif tta not in TTA_LEVELS:
        raise UsageError(f"--tta must be 0 (none), 1 (mirror) or 2 (mirror + 1-pixel shifts), got {tta}")
    choice = choose(config.get("precision", "auto"), device)
    mirror = trained_with_mirrors(config) if mirror is None else mirror
    return Settings(tta, choice.name, choice.reason, mirror)


def checkpoint_settings(checkpoint: dict, device: torch.device, tta: int | None = None) -> Settings:
    """`settings_for` a checkpoint: mirrored TTA views as it recorded (`tta_mirror`), checkpoints from before
    it was recorded keeping their mirrored views, as they always ran; its `calibration`'s temperature, if
    any."""
    mirror = bool(checkpoint.get("tta_mirror", True))
    settings = settings_for(checkpoint["config"], device, tta, mirror=mirror)
    calibration = checkpoint.get("calibration")
    if not calibration:
        return settings
    return dataclasses.replace(settings, temperature=float(calibration["temperature"]),
                               temperature_tta=calibration.get("tta"))


def tta_logits(model: nn.Module, x: torch.Tensor, level: int, mirror: bool = True) -> torch.Tensor:
    """Float32 logits averaged over test-time views of `x` (N, C, H, W). Level 0: `x` alone. Level 1: `x` and
    its mirror, 1/2 each. Level 2: `x` and its mirror 1/4 each, and 1/8 each for `x` shifted one pixel down
    and right, `x` shifted one pixel up and left (the border reflected, as F.pad's "reflect"), and the mirrors
    of both. Without `mirror` no mirrored view is taken: level 1 is `x` alone, level 2 `x` 1/2 and each shift
    1/4."""
    logits = model(x).float()
    if level >= 1 and mirror:
        logits = (logits + model(x.flip(3)).float()) / 2
    if level >= 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]
        if mirror:
            shifted_logits = sum(model(s).float() + model(s.flip(3)).float() for s in shifted) / 4
        else:
            shifted_logits = sum(model(s).float() for s in shifted) / 2
        logits = (logits + shifted_logits) / 2
    return logits


@torch.inference_mode()
def infer(model: nn.Module, x: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Float32 logits of `model` (in eval mode) for a batch of normalized images, with the settings' TTA views
    (mirrored ones only with `settings.mirror`), under bf16 autocast when its precision is "bf16"."""
    with autocast(x.device, settings.precision):
        return tta_logits(model, x, settings.tta, settings.mirror)


class Batches(Protocol):
    """What `predict_logits` reads: a sized iterable of (normalized images, labels), such as
    `data.loader.Loader`."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: Batches, settings: Settings, desc: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (`inference.infer`, batch by batch) and labels for every image the loader yields, in
    order, on the loader's device."""
    model.eval()
    logits, labels = [], []
    for x, y in tqdm(loader, total=len(loader), desc=desc, leave=False,
                     disable=bar_disabled(desc is not None), dynamic_ncols=True):
        logits.append(infer(model, x, settings))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)
