"""Choosing the device to run on."""

from __future__ import annotations

import torch

from .errors import UsageError


def select_device(name: str | None = None) -> torch.device:
    """The requested device, else cuda, then mps, then cpu; with cuDNN's autotuner on for CUDA (results on a GPU
    are not bit-for-bit reproducible anyway, and fixed batch shapes make the tuning pay off at once)."""
    device = _pick(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def _pick(name: str | None) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
