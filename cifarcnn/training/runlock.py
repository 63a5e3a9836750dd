"""One run folder, one writer: an exclusive lock file holding the owner's PID.

The lock is an flock on RUN/.lock, so the kernel drops it when its process dies, however it dies: a lock file
left by a killed run is simply taken over by the next one.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ..base.errors import UsageError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or stop with a UsageError naming the folder and the process that holds it."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UsageError(f"run folder {self.path.parent} is in use by another training "
                                 f"({self._owner()}); wait for it to finish or stop it, or pick another "
                                 f"--name") from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # the previous owner removed the file while we opened it: try again on the new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def _owner(self) -> str:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            return "PID unknown"
        return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
