"""Choosing the device to run on, and the settings that make it fast."""

from __future__ import annotations

import ctypes

import torch

from .errors import UsageError


def select_device(name: str | None = None) -> torch.device:
    """The requested device, else cuda, then mps, then cpu; with cuDNN's autotuner on for CUDA (results on a GPU
    are not bit-for-bit reproducible anyway, and fixed batch shapes make the tuning pay off at once), and freed
    memory kept for reuse on a CPU (`keep_freed_memory`)."""
    device = _pick(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        keep_freed_memory()
    return device


def keep_freed_memory() -> None:
    """Have glibc's malloc serve large blocks from its heap and keep what is freed, as CUDA's caching allocator
    does on a GPU. By default every block over 32 MB is a fresh mmap, so each activation of a training step
    page-faults in again on first touch and is zeroed by the kernel: 60,000-94,000 faults per step of the fast
    preset, about 8% of its time on a 2-core Xeon (docs/speed.md). The process keeps its peak memory instead of
    returning it. Nothing changes where the C library has no `mallopt` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(-4, 0)  # M_MMAP_MAX: no block gets its own mapping
    mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: hand memory back only past 2 GB free at the top


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
