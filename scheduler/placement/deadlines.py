"""Job deadlines that count Redis outages out, the way the job's session counts them.

A session holds each result deadline while Redis is out and, once the outage ended, moves it
later by the outage time it overlapped (:func:`scheduler.jobs.outage_postponement`). A job
waiting in a dispatcher lane for that result must wait as long: dropped at its bare deadline,
it would leave its session waiting for an answer nobody can give any more, and the session
would end the utterance ``FAILED`` (the job could have been placed once Redis answered).
:class:`JobDeadlines` keeps, for the jobs the dispatcher still holds, how much later their
deadlines fall; the dispatcher calls :meth:`JobDeadlines.count` when an outage ends.

No clock is read here: times are passed in (the Trio clock's).
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.jobs import JobRequest, held_due, outage_postponement
from scheduler.store.outage import OutageClock


class JobDeadlines:
    def __init__(self, clock: OutageClock, hold: float) -> None:
        self._clock = clock
        self._hold = hold  # the result deadline (seconds): an outage moves a deadline at most this much
        self._later: dict[tuple[str, float], float] = {}  # (job key, bare deadline) -> seconds later
        self._counted_until = float("-inf")  # the end of the last outage counted

    def deadline(self, request: JobRequest) -> float:
        """The job's deadline, later by the outages that ended since it was submitted."""
        return request.deadline + self._later.get((request.job_key, request.deadline), 0.0)

    def due(self, request: JobRequest, now: float) -> float:
        """When the job is past its deadline as of ``now``: while Redis is out, a deadline
        after the outage began is held (at most the result deadline longer)."""
        return held_due(self.deadline(request), self._clock.since(now), self._hold)

    def count(self, held: Iterable[JobRequest]) -> None:
        """Count the last outage that ended (once) for the jobs still ``held``; what was kept
        for jobs no longer held is dropped then (so it stays bounded by the jobs held)."""
        last = self._clock.last
        if last is None or last[1] <= self._counted_until:
            return
        self._counted_until = last[1]
        later: dict[tuple[str, float], float] = {}
        for request in held:
            key = (request.job_key, request.deadline)
            if key not in later:
                moved = self._later.get(key, 0.0)
                later[key] = moved + outage_postponement(request.deadline + moved, last, self._hold)
        self._later = {key: seconds for key, seconds in later.items() if seconds}
