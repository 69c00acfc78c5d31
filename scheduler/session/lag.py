"""Real-time lag of each session: how far behind the daemon is with the audio its client sent.

Every :data:`SAMPLE_S` the watcher reads each live session's lag (``SessionActor.lag``: the
audio received and not yet processed, and the age of the oldest such frame), records the age
in ``scheduler_session_lag_seconds`` (one observation per session per second, so the
histogram counts session-seconds), and logs ``session_lagging`` (warning) once when a
session's oldest unprocessed frame is older than :data:`LAG_WARN_S`, then
``session_caught_up`` once it is below :data:`LAG_CLEAR_S` again (one pair per episode,
never a line per second). ``/status`` shows both numbers per session.
"""

from __future__ import annotations

import logging

import trio

from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.session.registry import SessionRegistry

log = logging.getLogger("scheduler.session")

SAMPLE_S = 1.0
LAG_WARN_S = 1.0
LAG_CLEAR_S = 0.5


def sample(sessions: SessionRegistry, metrics: Metrics, now: float) -> None:
    for actor in sessions.actors():
        lag_ms, age = actor.lag(now)
        metrics.session_lag_seconds.observe(age)
        if not actor.lagging and age > LAG_WARN_S:
            actor.lagging = True
            event(log, "session_lagging", logging.WARNING, session_id=actor.session_id,
                  lag_ms=round(lag_ms), oldest_frame_age_ms=round(age * 1000))
        elif actor.lagging and age < LAG_CLEAR_S:
            actor.lagging = False
            event(log, "session_caught_up", session_id=actor.session_id, lag_ms=round(lag_ms))


async def watch_session_lag(sessions: SessionRegistry, metrics: Metrics) -> None:
    """Sample every session's lag until cancelled (the server's nursery owns it)."""
    while True:
        await trio.sleep(SAMPLE_S)
        sample(sessions, metrics, trio.current_time())
