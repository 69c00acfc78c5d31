"""Admission control: how many sessions this instance holds, against ``--max-sessions``.

Past what one process carries in real time, every session on it degrades at once; so an
instance refuses new sessions past ``max_sessions`` (per worker under ``--workers``) with
``error`` ``SERVER_FULL`` (fatal, an integer ``retry_after_ms``, close 1013: try again later)
and answers ``/readyz`` 503 while it is full, so that a load balancer sends new sessions
elsewhere.

A resume of a session (held here or by a sibling before) is admitted before new sessions:
the last :func:`reserve_for` places are kept for resumes, so an instance that took over the
sessions of a dead sibling is not filled by new ones first.

A :class:`Slot` is taken when the ``session_init`` is admitted (before any Redis work, so a
refused session leaves nothing behind) and released when the session ends, however it
ends; :meth:`Slot.release` is idempotent and a slot is a context manager. No await happens
between the check and the count, so concurrent ``session_init`` s never overshoot.
"""

from __future__ import annotations

import logging
import random

from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.protocol import CLOSE_TRY_AGAIN_LATER, RETRY_AFTER_MS, SERVER_FULL, ProtocolError

log = logging.getLogger("scheduler.admission")


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
    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit  # 0: no limit
        self.reserve = reserve_for(limit)
        self.held = 0  # slots taken: sessions admitted and not ended
        self._metrics = metrics
        self._was_full = False

    def full(self) -> bool:
        """Whether a new session would be refused now (a resume may still be admitted)."""
        return self.limit > 0 and self.held >= self.limit - self.reserve

    def take(self, *, resume: bool) -> Slot:
        """A place for a session, or ProtocolError ``SERVER_FULL`` (counted, by kind)."""
        if self.limit > 0 and self.held >= (self.limit if resume else self.limit - self.reserve):
            self._metrics.sessions_refused_total.labels("full_resume" if resume else "full").inc()
            raise ProtocolError(SERVER_FULL, f"this instance holds its maximum of {self.limit} sessions, try again later",
                                fatal=True, close_code=CLOSE_TRY_AGAIN_LATER, retry_after_ms=random.randint(*RETRY_AFTER_MS))
        self.held += 1
        self._changed()
        return Slot(self)

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
