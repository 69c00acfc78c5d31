"""``every``: a periodic task that survives its own failures; ``until_known``: a write retried.

The daemon's background loops (lease expiry, orphan sweep, the remote-placement watch,
ownership refresh, the stored-answer poller) talk to Redis, and Redis can go away at any
moment or come back empty. None of them may end the daemon for that: docs/scaling.md
promises that a Redis outage closes no connection.

Error handling: an exception from ``work`` is logged (``<name>_failed``: a warning for
:class:`~scheduler.store.redis_adapter.RedisUnavailable`, an error with the traceback for anything
else; once per failing episode, not once per tick) and the next tick tries again;
``<name>_recovered`` is logged when a tick succeeds after failures. Cancellation is never
caught. On overrun the next tick starts at once (trio-util's ``periodic``).

``until_known``: one write repeated until Redis gives its outcome (issue: a timeout may or
may not have taken effect), for callers that must not drop what they hold (a node's answer).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from trio_util import periodic

from scheduler.ops.logs import event
from scheduler.store.redis_adapter import RedisUnavailable

T = TypeVar("T")


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


BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


async def until_known(call: Callable[[bool], Awaitable[T]], *, budget_s: float, on_retry: Callable[[RedisUnavailable], None]) -> T:
    """``await call(again)`` until Redis gives an outcome: while it raises
    :class:`RedisUnavailable` the call is repeated after a bounded, jittered backoff
    (:data:`BACKOFF_FIRST_S` doubling up to :data:`BACKOFF_MAX_S`), for at most ``budget_s``;
    then the last error is raised. ``again`` is True once an earlier try may have taken
    effect (a timeout, a connection lost mid-call): ``call`` must then be idempotent, and
    say so to its script (e.g. complete_task's repeat flag). Other errors pass through."""
    deadline = trio.current_time() + budget_s
    again = False
    delay = BACKOFF_FIRST_S
    while True:
        try:
            return await call(again)
        except RedisUnavailable as exc:
            again = again or exc.ambiguous
            if trio.current_time() + delay > deadline:
                raise
            on_retry(exc)
        await trio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, BACKOFF_MAX_S)
