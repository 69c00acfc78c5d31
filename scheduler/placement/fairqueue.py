"""A lane's queue: sessions served in turn, not first come first served.

Jobs of one language pair wait here until their lane places them (dispatcher.py). The order
in which they are offered to Redis (iteration, :meth:`head`) is:

1. **moves first** (a placed job dispatched again after its node or lease was lost,
   ``appendleft``), oldest move first: they were admitted long ago and their session waits;
2. then the fresh jobs **round robin over sessions**: each session's jobs stay in submission
   order (results are delivered in order, so a session's own jobs must not overtake each
   other), and the sessions take turns, one job each: the first job of every session in
   turn order, then the second of each, and so on. When a session's first job leaves the
   queue (placed, cancelled, expired), that session goes to the back of the turn order.

So a burst of one session waits behind its own jobs only: a job whose session has ``r``
jobs ahead of it waits behind at most ``r + 1`` jobs of any other session (deficit round
robin with a quantum of one job, every job costing one). Turn affinity and locality are
decided by Redis when a job is placed (choose_node.lua), after this order is: a turn's next
job still goes to the turn's node if that node is eligible, whatever its place here.

Everything here is O(jobs queued) at most per call, like the lane's own scans; the session
bound (session/core.py: at most ``max_jobs_per_session`` unanswered per pair) keeps a lane at
sessions x that bound.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from scheduler.jobs import JobRequest


class FairQueue:
    def __init__(self) -> None:
        self._moves: collections.deque[JobRequest] = collections.deque()
        self._sessions: collections.OrderedDict[str, collections.deque[JobRequest]] = collections.OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def append(self, request: JobRequest) -> None:
        """A fresh job: behind its session's own jobs, in its session's turn."""
        queue = self._sessions.get(request.session_id)
        if queue is None:
            queue = self._sessions[request.session_id] = collections.deque()
        queue.append(request)
        self._len += 1

    def appendleft(self, request: JobRequest) -> None:
        """A move: ahead of every fresh job, behind the moves already waiting."""
        self._moves.append(request)
        self._len += 1

    def __iter__(self) -> Iterator[JobRequest]:
        """Every queued job, in the order the lane offers them (module docstring)."""
        yield from self._moves
        queues = list(self._sessions.values())
        rank = 0
        while queues:
            for queue in queues:
                yield queue[rank]
            rank += 1
            queues = [q for q in queues if len(q) > rank]

    def head(self) -> JobRequest | None:
        return next(iter(self), None)

    def remove(self, request: JobRequest) -> bool:
        """Take ``request`` out (by identity); False if it is not here. A session whose first
        job leaves goes to the back of the turn order."""
        for i, queued in enumerate(self._moves):
            if queued is request:
                del self._moves[i]
                self._len -= 1
                return True
        queue = self._sessions.get(request.session_id)
        if queue is None:
            return False
        for i, queued in enumerate(queue):
            if queued is request:
                del queue[i]
                self._len -= 1
                if not queue:
                    del self._sessions[request.session_id]
                elif i == 0:
                    self._sessions.move_to_end(request.session_id)
                return True
        return False
