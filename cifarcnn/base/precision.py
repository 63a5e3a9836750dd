"""Which arithmetic a run uses, chosen per machine: bf16 autocast or fp32.

`precision: auto` picks bf16 autocast on CUDA, and on a CPU that has bf16 instructions (AMX tiles or AVX-512
BF16); elsewhere fp32 (a CPU without them only emulates bf16; docs/speed.md compares the two). The rule
depends only on the machine, not on a timing, so the same run on the same machine always makes the same
choice; training, evaluation and prediction all follow it. `fp32` or `bf16` force one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Choice:
    """The precision a run uses ("fp32" or "bf16") and why, in words for logs and reports."""

    name: str
    reason: str


def cpu_bf16_instructions() -> list[str]:
    """The bf16 instruction sets this CPU has, as torch sees them: "AMX", "AVX-512 BF16", or none."""
    found = []
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            found.append(name)
    return found


def choose(setting: str, device: torch.device) -> Choice:
    """The precision for `setting` (auto, fp32 or bf16) on `device`, and why."""
    if setting != "auto":
        return Choice(setting, "set in the config (precision)")
    if device.type == "cuda":
        return Choice("bf16", "auto: bf16 autocast on CUDA")
    if device.type != "cpu":
        return Choice("fp32", f"auto: fp32 on {device.type}")
    instructions = cpu_bf16_instructions()
    if instructions:
        return Choice("bf16", f"auto: this CPU has bf16 instructions ({', '.join(instructions)})")
    return Choice("fp32", "auto: this CPU has no bf16 instructions (AMX or AVX-512 BF16)")


def autocast(device: torch.device, precision: str, cache: bool = True) -> torch.autocast:
    """bf16 autocast when `precision` is "bf16", else a disabled one. (`cache=False` inside CUDA graph
    capture, where autocast's weight-cast cache is not allowed.)"""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache)
