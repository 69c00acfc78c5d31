"""Shared by the benchmarks: a Redis URL to measure against."""

from __future__ import annotations

import contextlib
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
