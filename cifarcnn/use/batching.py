"""Dynamic batching for `cifarcnn serve`: images from requests that arrive together go through one forward pass.

A worker thread (off the server's event loop) takes the first waiting image, then gathers more until it has
`max_batch` images or the first one has waited `max_wait` seconds, runs them as one batch, and hands each request
its own row of the result through its event loop.
"""

from __future__ import annotations

import asyncio
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


class Batcher:
    """Runs `run(images)` (a (N, H, W, 3) stack -> one result per image) on batches of concurrently submitted
    images. `batch_sizes` keeps the sizes of the last 10,000 forward passes, for tests and monitoring."""

    def __init__(self, run: Callable[[np.ndarray], Sequence[Any]], max_batch: int, max_wait: float):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cifarcnn-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the images already queued, then end the worker thread."""
        self._queue.put(None)
        self._thread.join()

    async def submit(self, image: np.ndarray) -> Any:
        """The result for one decoded image, computed in a batch with whatever else arrives meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
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
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._gather(first)
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            results, error = self.run(np.stack([item.image for item in batch])), None
        except Exception as e:  # reported to each request of the batch; the worker goes on
            results, error = [None] * len(batch), e
        for item, result in zip(batch, results):
            item.loop.call_soon_threadsafe(_settle, item.future, result, error)
