"""SIGINT and SIGTERM during training: note the signal, let the trainer finish its step, save, then exit."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path

from ..base.errors import UserError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(UserError):
    """Training stopped on a signal after saving a resumable checkpoint; exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 128 + signum)


class StopRequest:
    """While active, SIGINT and SIGTERM set `signum` instead of killing the process. The first signal restores
    the previous handlers, so a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def resume_command(run_dir: Path, data_dir: str | Path | None, device: str | None, distributed: bool) -> str:
    """The command line that continues the run in `run_dir`."""
    args = ["train", "--resume", str(run_dir)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    if device is not None:
        args += ["--device", device]
    if distributed:
        return "torchrun <the same torchrun options> -m cifarcnn " + shlex.join(args)
    return shlex.join([sys.executable, "-m", "cifarcnn", *args])
