"""``every``: a periodic task that survives its own failures.

The daemon's background loops (lease expiry, orphan sweep, the remote-placement watch,
ownership refresh, the stored-answer poller) talk to Redis, and Redis can go away at any
moment or come back empty. None of them may end the daemon for that: docs/scaling.md
promises that a Redis outage closes no connection.

Error handling: an exception from ``work`` is logged (``<name>_failed``: a warning for
:class:`~scheduler.redis_adapter.RedisUnavailable`, an error with the traceback for anything
else; once per failing episode, not once per tick) and the next tick tries again;
``<name>_recovered`` is logged when a tick succeeds after failures. Cancellation is never
caught. On overrun the next tick starts at once (trio-util's ``periodic``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from trio_util import periodic

from scheduler.ops.logs import event
from scheduler.placement.redis_adapter import RedisUnavailable


async def every(period: float, work: Callable[[], Awaitable[object]], *, name: str, log: logging.Logger,
                first_delay: bool = True) -> None:
    """Run ``await work()`` every ``period`` seconds until cancelled (after one ``period``
    first unless ``first_delay`` is False), surviving any exception it raises."""
    failing = False
    ticks = periodic(period)
    if first_delay:
        await ticks.__anext__()
    async for _ in ticks:
        try:
            await work()
        except RedisUnavailable as exc:
            if not failing:
                event(log, f"{name}_failed", logging.WARNING, error=str(exc) or "redis unavailable")
            failing = True
            continue
        except Exception as exc:  # a bug or an unexpected reply must not end the daemon
            if not failing:
                event(log, f"{name}_failed", logging.ERROR, exc_info=True, error=f"{type(exc).__name__}: {exc}")
            failing = True
            continue
        if failing:
            event(log, f"{name}_recovered")
            failing = False
