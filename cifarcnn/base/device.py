"""Choosing the device to run on, and the settings that make it fast.

`select_device` changes torch's settings only. `keep_freed_memory` changes malloc for the whole process, for
good, so only a program that owns its process calls it: the `cifarcnn` command (`cli.main`) and the benchmark
scripts, never the library functions a notebook or a web app calls (`predict`, `evaluate`, `train`).
`CIFARCNN_KEEP_FREED_MEMORY=0` turns it off."""

from __future__ import annotations

import ctypes
import os

import torch

from .errors import UsageError

KEEP_FREED_MEMORY = "CIFARCNN_KEEP_FREED_MEMORY"  # 1 (the default) or 0: leave malloc as it is


def select_device(name: str | None = None) -> torch.device:
    """The requested device, else cuda, then mps, then cpu; with cuDNN's autotuner on for CUDA (results on a
    GPU are not bit-for-bit reproducible anyway, and fixed batch shapes make the tuning pay off at once)."""
    device = _pick(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def keep_freed_memory(device: torch.device) -> None:
    """On a CPU, have glibc's malloc serve large blocks from its heap and keep what is freed, as CUDA's
    caching allocator does on a GPU. By default every block over 32 MB is a fresh mmap, so each activation of
    a training step page-faults in again on first touch and is zeroed by the kernel (docs/speed.md). The
    process keeps its peak memory instead of returning it. Nothing changes on another device, with
    $CIFARCNN_KEEP_FREED_MEMORY=0, or where the C library has no `mallopt` (not glibc); a value other than 0
    or 1 is a UsageError."""
    value = os.environ.get(KEEP_FREED_MEMORY, "1")
    if value not in ("0", "1"):
        raise UsageError(f"{KEEP_FREED_MEMORY}={value!r}: use 1 (keep freed memory for reuse on a CPU, the "
                         f"default) or 0 (leave malloc's settings as they are)")
    if device.type != "cpu" or value == "0":
        return
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
            raise UsageError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps"
                             ) from None
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
