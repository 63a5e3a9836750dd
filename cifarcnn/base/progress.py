"""Progress of long loops: a live bar on a terminal; in a log file (stderr not a terminal: CI, nohup,
`cifarcnn train > log 2>&1`), plain lines now and then instead of hundreds of carriage-return frames."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

PLAIN_LINE_SECONDS = 60.0  # in a log, at most one progress line per this many seconds


def on_terminal() -> bool:
    """Whether stderr, where progress goes, is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar_disabled(wanted: bool = True) -> bool | None:
    """tqdm's `disable` argument for a bar that is shown only on a terminal (None: tqdm checks the stream)."""
    return None if wanted else True


class Progress:
    """Iterate over `items` (`total` of them, the first `initial` already done) with progress shown: on a
    terminal a tqdm bar refreshed every `refresh_every` items; in a log a line at a `show` call, if the last
    line is at least PLAIN_LINE_SECONDS old (so short loops print none: their summary line says enough)."""

    def __init__(self, items: Iterable, *, total: int, desc: str, initial: int = 0, refresh_every: int = 1,
                 enabled: bool = True):
        self.desc, self.total, self.enabled = desc, total, enabled
        self._plain = enabled and not on_terminal()
        # maxinterval: tqdm's monitor thread would otherwise lower miniters on a slow machine.
        self._bar = tqdm(items, total=total, initial=initial, leave=False, dynamic_ncols=True,
                         miniters=refresh_every, mininterval=0, maxinterval=math.inf, desc=desc,
                         disable=not enabled or self._plain)
        self._last_line = time.monotonic()

    def __iter__(self) -> Iterator:
        return iter(self._bar)

    def show(self, done: int, **fields: str) -> None:
        """Report `done` items with `fields` (e.g. loss, acc): the bar's postfix, or a plain line when one is
        due."""
        if not self.enabled:
            return
        if not self._plain:
            self._bar.set_postfix(fields, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_LINE_SECONDS:
            self._last_line = now
            details = "".join(f"  {name} {value}" for name, value in fields.items())
            print(f"{self.desc} {done}/{self.total}{details}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._bar.close()
