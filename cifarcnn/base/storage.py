"""Atomic file writes: a temp file in the target folder, fsync, then rename, so a crash never leaves half a
file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


class StorageError(UserError):
    """A file could not be written (disk full, no permission, ...); what was at the path is left as it was."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a temp file beside `path`, then move it over `path` in one step. An OSError becomes
    a StorageError naming the file; the previous file, if any, is untouched."""
    path = Path(path)
    try:
        _atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (e.g. a full disk) as a RuntimeError raised while handling it
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise StorageError(f"cannot write {path}: {cause.strerror or cause}{kept}") from None


def ensure_writable_dir(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there, or stop with a StorageError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StorageError(f"run folder {folder} is not writable: {e.strerror or e}") from None


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of atomic writes that a killed process left in `folder` (call only while no one
    else writes there)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
