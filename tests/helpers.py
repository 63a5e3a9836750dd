"""Running `python -m cifarcnn train` (or torchrun) as a child process and watching its run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DETERMINISTIC = ("epoch", "train_loss", "train_acc", "train_images", "val_loss", "val_acc",
                 "val_balanced_acc", "val_images", "lr", "grad_norm")
TORCHRUN = Path(sys.executable).parent / "torchrun"


def child_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(args: list[str], cwd: Path, torchrun: list[str] | None = None,
          program: tuple[str, ...] = ("-m", "cifarcnn")) -> subprocess.Popen:
    """`python -m cifarcnn ARGS` (or `torchrun TORCHRUN -m cifarcnn ARGS`), output captured; `program`
    replaces `-m cifarcnn` (e.g. a script and its own arguments)."""
    head = [str(TORCHRUN), *torchrun, *program] if torchrun is not None else [sys.executable, *program]
    return subprocess.Popen([*head, *args], cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for the process; its exit code and its stdout + stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out:\n{out}\n{err}") from None
    return proc.returncode, out + err


def position(checkpoint_path: Path) -> tuple[int, int] | None:
    """(epochs done, steps done in the next epoch) of a checkpoint, or None while there is none."""
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None
    return state["epoch"], state.get("step", 0)


def position_text(where: tuple[int, int]) -> str:
    """How the trainer names a checkpoint position (epochs done, steps done in the next epoch) in its
    messages."""
    epochs, steps = where
    return f"at epoch {epochs + 1}, step {steps}" if steps else f"at the end of epoch {epochs}"


def settled_position(checkpoint_path: Path, quiet_for: float = 1.0,
                     timeout: float = 30) -> tuple[int, int] | None:
    """The checkpoint's position once the file has stopped changing for `quiet_for` seconds (a write already
    under way when a process was killed lands first)."""
    deadline, last, seen, since = time.monotonic() + timeout, None, None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            stat = checkpoint_path.stat()
            current = stat.st_ino, stat.st_mtime_ns
        except FileNotFoundError:
            current = None
        if current != last:
            last, seen, since = current, position(checkpoint_path), time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"{checkpoint_path} kept changing for {timeout}s")


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, reached: Callable[[tuple[int, int]], bool],
                        timeout: float = 180) -> tuple[int, int]:
    """Poll `path` (a new file appears at every atomic write) until its position satisfies `reached`."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            inode = path.stat().st_ino, path.stat().st_mtime_ns
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != seen:
            seen = inode
            where = position(path)
            if where is not None and reached(where):
                return where
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited with {proc.returncode} before the checkpoint:\n{out}\n{err}")
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at the wanted position in {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in DETERMINISTIC} for row in rows]
