"""Python's cyclic garbage collector: tuned for a latency-bound event loop, and watched.

Every collection stops the one thread that runs the event loop, so a pause lands directly in
the tail of a result's latency. Measured under load (docs/performance.md, "The garbage
collector"): with Python's default thresholds (700, 10, 10) a daemon at 300 sessions ran
~130 young collections in 20 s (~2 ms each, however many objects they found), a dozen
middle ones up to 21 ms, and a full one of 30-54 ms; overhead p99 was 24 ms. With
:data:`THRESHOLDS` it ran 16 young collections and nothing older, and p99 was 13-15 ms.

- :func:`tune` (called once at start, after ``gc.freeze()`` in cli.py): a young collection
  after 5,000 net allocations of container objects instead of 700, a middle one every 20 of
  those, a full one every 10 middle ones (and Python's own rule that a full one waits until
  a quarter of the long-lived objects are new). Objects that die young die by reference
  counting as before; cyclic garbage waits longer, bounded the same way.
- :class:`GcWatch` (a task of the server's nursery): a ``gc.callbacks``
  entry times each collection into a bounded deque (nothing else inside the collector: no
  lock, no logging), and once a second the pauses go to
  ``scheduler_gc_pause_seconds{generation}``; a second with a pause of
  :data:`LONG_PAUSE_S` or more logs one line ``gc_pause_long`` (count and longest).
"""

from __future__ import annotations

import collections
import gc
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from scheduler.ops.logs import event

if TYPE_CHECKING:
    from scheduler.ops.metrics import Metrics

log = logging.getLogger("scheduler.gc")

THRESHOLDS = (5000, 20, 10)
LONG_PAUSE_S = 0.02
"""A pause this long is the whole overhead budget of a result (p99 < 20 ms): logged."""
FLUSH_S = 1.0
KEPT = 4096  # pauses held between flushes at most (the oldest are dropped past it)


def tune() -> None:
    gc.set_threshold(*THRESHOLDS)


class GcWatch:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._pauses: collections.deque[tuple[int, float]] = collections.deque(maxlen=KEPT)
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))

    def flush(self) -> None:
        """The pauses since the last flush into the metric; one log line if one was long."""
        long, longest, generation = 0, 0.0, 0
        while self._pauses:
            gen, seconds = self._pauses.popleft()
            self._metrics.gc_pause_seconds.labels(str(gen)).observe(seconds)
            if seconds >= LONG_PAUSE_S:
                long += 1
                if seconds > longest:
                    longest, generation = seconds, gen
        if long:
            event(log, "gc_pause_long", count=long, longest_ms=round(longest * 1000, 1), generation=generation)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Time collections until cancelled (a task of the server's nursery), flushing every
        :data:`FLUSH_S`; the last pauses are flushed on the way out."""
        gc.callbacks.append(self._callback)
        try:
            task_status.started()
            while True:
                await trio.sleep(FLUSH_S)
                self.flush()
        finally:
            gc.callbacks.remove(self._callback)
            self.flush()
