"""What a run trained on: device, its name, CPU, library versions; appended to RUN/environment.json per
(re)start."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path

import torch

from ..base.storage import atomic_write_json

FILE = "environment.json"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: torch.device) -> dict:
    """The hardware and software a process runs on, as plain JSON values."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple GPU (MPS)"
    else:
        name = cpu_name()
    return {
        "device": str(device), "device_name": name, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def read_sessions(run_dir: Path) -> list[dict]:
    """The sessions recorded for a run (oldest first); [] when none were, or the file is unreadable."""
    try:
        sessions = json.loads((Path(run_dir) / FILE).read_text()).get("sessions", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in sessions if isinstance(s, dict)]


def record_session(run_dir: Path, device: torch.device, first_epoch: int, processes: int = 1,
                   extra: dict | None = None) -> None:
    """Append this training session (a fresh start or a resume; `processes` under torchrun; `extra`, e.g. the
    precision chosen and why) to RUN/environment.json."""
    entry = {"started": datetime.now().astimezone().isoformat(timespec="seconds"), "first_epoch": first_epoch,
             "processes": processes, **describe(device), **(extra or {})}
    atomic_write_json(Path(run_dir) / FILE, {"sessions": [*read_sessions(run_dir), entry]})
