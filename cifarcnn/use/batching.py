"""Dynamic batching for `cifarcnn serve`: images from requests that arrive together go through one forward
pass.

A worker thread (off the server's event loop) takes the first waiting image, then gathers more until it has
`max_batch` images or the first one has waited `max_wait` seconds, runs them as one batch, and hands each
request its own row of the result through its event loop. Every submitted image ends with its result or an
error: a batch whose forward pass fails, or returns a number of rows other than its number of images, fails
each of its requests; a request whose event loop has closed is skipped; if the worker itself stops (`stop`, or
an error it cannot report to a batch), the images still queued and every later `submit` get an error at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Item:
    image: np.ndarray
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued: float  # time.monotonic() when it arrived


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request went away (client disconnected, server stopping)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _answer(item: _Item, result: Any, error: BaseException | None) -> None:
    """Hand `item`'s request its result or error on its own event loop (nothing if that loop has closed)."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed": no one is waiting any more
        item.loop.call_soon_threadsafe(_settle, item.future, result, error)


class Batcher:
    """Runs `run(images)` (a (N, H, W, 3) stack -> one result per image) on batches of concurrently submitted
    images. `batch_sizes` keeps the sizes of the last 10,000 forward passes, for tests and monitoring."""

    def __init__(self, run: Callable[[np.ndarray], Sequence[Any]], max_batch: int, max_wait: float):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cifarcnn-batcher", daemon=True)
        self._lock = threading.Lock()  # orders `submit`'s check of `_ended` with the worker's last drain
        self._ended: str | None = None  # why the worker stopped taking images, once it has

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the images already queued, then end the worker thread."""
        self._queue.put(None)
        self._thread.join()

    async def submit(self, image: np.ndarray) -> Any:
        """The result for one decoded image, computed in a batch with whatever else arrives meanwhile; a
        RuntimeError at once when the worker has stopped."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._ended is not None:
                raise RuntimeError(f"the batching worker has stopped ({self._ended})")
            self._queue.put(_Item(image, loop, future, time.monotonic()))
        return await future

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """The batch that starts with `first`, and whether the stop sentinel was met while gathering."""
        batch = [first]
        deadline = first.queued + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _work(self) -> None:
        batch: list[_Item] = []
        why = "the server is stopping"
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is None:
                    return
                batch, stopping = self._gather(first)
                self._run(batch)
        except BaseException as e:  # a bug in the worker itself: fail its batch rather than leave it waiting
            why = f"{type(e).__name__}: {e}"
            for item in batch:
                _answer(item, None, RuntimeError(f"the batching worker has stopped ({why})"))
            raise
        finally:
            self._end(why)

    def _end(self, why: str) -> None:
        """Refuse later submits, and fail the images still queued."""
        with self._lock:
            self._ended = why
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _answer(item, None, RuntimeError(f"the batching worker has stopped ({why})"))

    def _run(self, batch: list[_Item]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            results, error = self.run(np.stack([item.image for item in batch])), None
            if len(results) != len(batch):  # which row is whose is unknown: none is handed out
                raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)} "
                                   f"images")
        except Exception as e:  # reported to each request of the batch; the worker goes on
            results, error = [None] * len(batch), e
        for item, result in zip(batch, results, strict=True):
            _answer(item, result, error)
