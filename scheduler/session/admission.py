"""Admission control: how many sessions this instance holds, against ``--max-sessions``.

Past what one process carries in real time, every session on it degrades at once; so an
instance refuses new sessions past ``max_sessions`` (per worker under ``--workers``) with
``error`` ``SERVER_FULL`` (fatal, an integer ``retry_after_ms``, close 1013: try again later)
and answers ``/readyz`` 503 while it is full, so that a load balancer sends new sessions
elsewhere.

A resume of a session (held here or by a sibling before) is admitted before new sessions:
the last :func:`reserve_for` places are kept for resumes, so an instance that took over the
sessions of a dead sibling is not filled by new ones first.

Besides the fixed limit, an **overload guard**: the instance measures its own event-loop lag
(how late a periodic Trio task wakes: :func:`watch_loop_lag`), smoothed over about a second
(:data:`LAG_SMOOTHING`). Once the smoothed lag has stayed above ``--overload-lag-ms`` for
:data:`ENGAGE_AFTER` samples in a row (two seconds: a start-up or a recovery after a Redis
stall makes spikes of a fraction of a second), new sessions are refused the same way (``SERVER_FULL``, reason ``overload``) and ``/readyz`` is 503
``overloaded``; the guard releases once it is below half of it. Admitted sessions keep
their service, and resumes are admitted (their sessions exist already).

A :class:`Slot` is taken when the ``session_init`` is admitted (before any Redis work, so a
refused session leaves nothing behind) and released when the session ends, however it
ends; :meth:`Slot.release` is idempotent and a slot is a context manager. No await happens
between the check and the count, so concurrent ``session_init`` s never overshoot.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.protocol import CLOSE_TRY_AGAIN_LATER, RETRY_AFTER_MS, SERVER_FULL, ProtocolError

log = logging.getLogger("scheduler.admission")


LAG_SMOOTHING = 0.2
"""Weight of each lag sample (one every :data:`LAG_EVERY_S`) in the smoothed lag: about a
second of samples counts."""
LAG_EVERY_S = 0.1
ENGAGE_AFTER = 20
"""Samples in a row above the threshold before the guard engages (two seconds)."""


async def watch_loop_lag(on_lag: Callable[[float], None], every_s: float = LAG_EVERY_S) -> None:
    """Sleep ``every_s`` again and again, until cancelled; tell ``on_lag`` how late each wake
    was: the time the event loop was too busy to run a ready task."""
    while True:
        start = trio.current_time()
        await trio.sleep(every_s)
        on_lag(max(0.0, trio.current_time() - start - every_s))


def reserve_for(limit: int) -> int:
    """Places kept for resumes: a twentieth of the limit, at least 1, but always leaving one
    for new sessions (none without a limit, or with a limit of 1)."""
    return min(max(1, limit // 20), limit - 1) if limit > 0 else 0


class Slot:
    """One admitted session's place; given back by :meth:`release` (once)."""

    def __init__(self, control: AdmissionControl | None) -> None:
        self._control = control

    def release(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            control._released()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class AdmissionControl:
    def __init__(self, limit: int, metrics: Metrics, *, lag_limit_s: float = 0.0) -> None:
        self.limit = limit  # 0: no limit
        self.reserve = reserve_for(limit)
        self.held = 0  # slots taken: sessions admitted and not ended
        self.lag_limit_s = lag_limit_s  # the overload guard's threshold (0: off)
        self.lag_s = 0.0  # the event loop's smoothed lag
        self.overloaded = False  # the overload guard refuses new sessions
        self._above = 0  # samples in a row with the smoothed lag above lag_limit_s
        self._metrics = metrics
        self._was_full = False

    def full(self) -> bool:
        """Whether a new session would be refused now for want of a place (a resume may still
        be admitted)."""
        return self.limit > 0 and self.held >= self.limit - self.reserve

    def refusing(self) -> str | None:
        """Why new sessions are refused now (``full``, ``overloaded``), or None."""
        return "full" if self.full() else "overloaded" if self.overloaded else None

    def take(self, *, resume: bool) -> Slot:
        """A place for a session, or ProtocolError ``SERVER_FULL`` (counted, by reason)."""
        if self.limit > 0 and self.held >= (self.limit if resume else self.limit - self.reserve):
            self._refuse("full_resume" if resume else "full", f"this instance holds its maximum of {self.limit} sessions")
        if self.overloaded and not resume:
            self._refuse("overload", f"this instance is overloaded (its event loop runs {self.lag_s * 1000:.0f} ms late)")
        self.held += 1
        self._changed()
        return Slot(self)

    def _refuse(self, reason: str, why: str) -> None:
        self._metrics.sessions_refused_total.labels(reason).inc()
        raise ProtocolError(SERVER_FULL, f"{why}, try again later", fatal=True, close_code=CLOSE_TRY_AGAIN_LATER,
                            retry_after_ms=random.randint(*RETRY_AFTER_MS))

    def lag(self, seconds: float) -> None:
        """One sample of the event loop's lag (:func:`watch_loop_lag`): the guard engages once
        the smoothed lag stayed above ``lag_limit_s`` for :data:`ENGAGE_AFTER` samples, and
        releases below half of it."""
        self.lag_s += (seconds - self.lag_s) * LAG_SMOOTHING
        self._metrics.event_loop_lag_seconds.set(self.lag_s)
        if not self.lag_limit_s:
            return
        self._above = self._above + 1 if self.lag_s > self.lag_limit_s else 0
        if not self.overloaded and self._above >= ENGAGE_AFTER:
            self.overloaded = True
            event(log, "overload_guard_engaged", logging.WARNING, lag_ms=round(self.lag_s * 1000), limit_ms=round(self.lag_limit_s * 1000),
                  held=self.held)
        elif self.overloaded and self.lag_s < self.lag_limit_s / 2:
            self.overloaded = False
            event(log, "overload_guard_released", lag_ms=round(self.lag_s * 1000), held=self.held)

    def _released(self) -> None:
        self.held -= 1
        self._changed()

    def _changed(self) -> None:
        """Log when the instance becomes full for new sessions, and when it has room again."""
        full = self.full()
        if full != self._was_full:
            self._was_full = full
            event(log, "admission_full" if full else "admission_open", logging.WARNING if full else logging.INFO,
                  held=self.held, limit=self.limit, reserve=self.reserve)
