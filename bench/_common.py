"""Shared by the benchmarks: a Redis URL to measure against, and how evenly work spreads."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator

from scheduler.ops.embedded_redis import EmbeddedValkey


@contextlib.contextmanager
def redis_url(url: str | None) -> Iterator[str]:
    """``url`` if given, else an embedded valkey-server started for the run and stopped after it."""
    if url:
        yield url
        return
    with EmbeddedValkey() as embedded:
        yield embedded


def spread(values: list[float]) -> float | None:
    """How unevenly ``values`` (one per server or shard) share the work: the largest deviation
    of one from their mean, as a fraction of the mean (None when there is no work)."""
    mean = statistics.fmean(values) if values else 0.0
    return round(max(abs(v - mean) for v in values) / mean, 3) if mean else None
