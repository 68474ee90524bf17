"""Run the models in one worker thread, batching requests that arrive close together.

A model runs a batch of B questions in much less than B times the time of one (the matrix products
are wider, the Python overhead is paid once), so under load a server answers more questions per second
when it runs concurrent requests together. The worker takes the first waiting request, then collects
more for at most `window` seconds (or until `max_batch` questions), groups them by their settings
(same model, k, decoder, ...) and runs each group as one call. Alone, a request waits at most the
window; under load the queue is never empty and batches fill at once. One thread runs every model,
so two requests never compete for the same cores or the same weights.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Job:
    key: Hashable | None  # None: a job of its own (`Batcher.call`), never batched, whose future gets its one result
    run: Callable[[list[Any]], list[Any]]
    items: list[Any]
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, window: float = 0.015, max_batch: int = 16):
        self.window, self.max_batch = window, max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="jointrag-models", daemon=True)
        self._thread.start()
        self.batches: list[int] = []  # questions per batch run, for tests and the health endpoint (last 1000)

    def submit(self, key: Hashable, run: Callable[[list[Any]], list[Any]], items: list[Any]) -> Future:
        """Queue one request's `items`; requests with an equal `key` may run together as
        `run(their items, concatenated) -> one result per item`. The future gets this request's results."""
        job = _Job(key, run, list(items))
        self._queue.put(job)
        return job.future

    def call(self, function: Callable[[], Any]) -> Future:
        """Run `function()` in the worker thread, alone; the future gets what it returns."""
        job = _Job(None, lambda _: [function()], [None])
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while (first := self._queue.get()) is not None:
            jobs = [first]
            size, deadline = len(first.items), time.monotonic() + self.window
            while first.key is not None and size < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if job is None:  # closing: finish what was taken, then stop
                    self._queue.put(None)
                    break
                jobs.append(job)
                size += len(job.items)
            groups: dict[Hashable, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key if job.key is not None else id(job), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[_Job]) -> None:
        """Run a group as one call; if it fails, run each job alone, so that one bad request fails alone."""
        try:
            results = group[0].run([item for job in group for item in job.items])
        except Exception as error:
            if len(group) > 1:
                for job in group:
                    self._run([job])
            else:
                group[0].future.set_exception(error)
            return
        self.batches = (self.batches + [len(results)])[-1000:]
        start = 0
        for job in group:
            mine = results[start : start + len(job.items)]
            job.future.set_result(mine[0] if job.key is None else mine)
            start += len(job.items)
