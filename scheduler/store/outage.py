"""How long Redis has been unavailable, as the adapter's calls saw it: the clock that
deadlines which wait on Redis count out (issue: a stall of Redis must not expire a lease or
a result deadline, since the wait was the daemon's own, not the node's or the client's).

An *outage* starts when a batch of calls fails because Redis cannot do it
(:class:`RedisUnavailable`: unreachable, timed out, full, too few replicas), from that
batch's start, or when a batch has been in flight longer than :data:`STALL_S` (a stall, seen
before any timeout), from its start; it ends when a batch succeeds and no batch in flight is
older than :data:`STALL_S`. :meth:`OutageClock.elapsed` is the total outage time so far,
the current outage included: a deadline ``d`` set at time ``t0`` is due when
``now >= d + (elapsed(now) - elapsed(t0))``. While Redis is out, ``elapsed`` grows as fast as
the clock, so nothing set before falls due.

Times are the Trio clock's (``trio.current_time()``), passed in: the class reads no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

STALL_S = 1.0
"""A batch in flight longer than this counts as an outage from its start."""


class OutageClock:
    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self.total = 0.0  # seconds of outages that ended
        self.episodes = 0  # outages that ended
        self.last: tuple[float, float] | None = None  # (start, end) of the last outage that ended
        self._since: float | None = None  # start of the outage a failed batch began
        self._inflight: dict[Hashable, float] = {}
        self.on_end: list[Callable[[float], None]] = []  # called with the outage's length when one ends

    def started(self, key: Hashable, now: float) -> None:
        self._inflight[key] = now

    def finished(self, key: Hashable, now: float, ok: bool) -> None:
        """Batch ``key`` is done: ``ok`` when Redis did it (script errors included)."""
        start = self._inflight.pop(key, now)
        if not ok or now - start > self.stall_s:
            self._since = start if self._since is None else min(self._since, start)
        if ok and self._since is not None and self._stalled(now) is None:
            length, self.last, self._since = now - self._since, (self._since, now), None
            self.total += length
            self.episodes += 1
            for hook in list(self.on_end):
                hook(length)

    def _stalled(self, now: float) -> float | None:
        if not self._inflight:
            return None
        oldest = min(self._inflight.values())
        return oldest if now - oldest > self.stall_s else None

    def since(self, now: float) -> float | None:
        """When the current outage started (None: Redis is doing its work). Every session asks
        at every wake: kept cheap."""
        stalled = self._stalled(now)
        if stalled is None:
            return self._since
        return stalled if self._since is None else min(self._since, stalled)

    def recent(self, now: float, within: float) -> bool:
        """Whether Redis is out, or came back less than ``within`` seconds ago. Liveness keys
        with a TTL of ``within`` lapse in an outage longer than that, because their refreshes
        failed, not because their owners died: they count as dead only past this window."""
        return self.since(now) is not None or (self.last is not None and now - self.last[1] < within)

    def elapsed(self, now: float) -> float:
        """Outage seconds so far, the current one included (up to ``now``)."""
        since = self.since(now)
        return self.total + (now - since if since is not None else 0.0)
