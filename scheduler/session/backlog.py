"""The session's backlog: client events the actor has not processed yet, with audio merging.

Producer: the client gateway's reader (:meth:`ClientBacklog.put`). Consumer: the session
actor (:meth:`ClientBacklog.take`), woken through its inbox channel by a single wake token.

Budget (protocol.md "Backpressure"): up to ``budget`` (``max_pending_events``) events queue
as they are. Past it, an audio frame is *merged* into the newest queued audio event instead
of taking a place of its own, as long as that event is not final: the event then carries
several frames, in order, and the actor still cuts utterances at frame boundaries. Finalize
and close events are never merged and never dropped.

Memory bound: :meth:`put` waits (so the reader stops reading the socket, pushing back on the
client over TCP) while the backlog holds ``2 * budget`` events or ``max_bytes`` of audio.
So one session holds at most that much, whatever its client sends.

Real-time lag (:meth:`lag`): how far behind the actor is with the client's audio, as the
audio queued here (received, not yet processed: bytes, turned into ms by the session) and
the age of the oldest frame not yet processed (queued here, or held by a :meth:`put` that
waits for room), on the Trio clock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
import trio

from scheduler.session.events import AudioIn, ClientEvent, CloseIn, FinalizeIn


@attrs.define
class _Merging:
    """A queued audio event still open for merging (mutable while queued)."""

    frames: list[bytes]
    is_final: bool
    since: float  # when its first frame arrived (the backlog's clock: trio.current_time())

    def freeze(self, queued_behind: int) -> AudioIn:
        return AudioIn(tuple(self.frames), self.is_final, queued_behind)


class ClientBacklog:
    def __init__(self, budget: int, max_bytes: int, wake: Callable[[], None],
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.budget = budget
        self._clock = clock
        self.max_bytes = max_bytes
        self._wake = wake
        self._queue: collections.deque[_Merging | FinalizeIn | CloseIn] = collections.deque()
        self._bytes = 0
        self._space = trio.Event()
        self.merged_frames_total = 0
        self._blocked_since: float | None = None  # a put waits for room since then (its frame is unprocessed too)

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _full(self) -> bool:
        return len(self._queue) >= 2 * self.budget or self._bytes >= self.max_bytes

    async def put(self, ev: ClientEvent) -> None:
        """Queue (or merge) one client event; waits while the backlog is at its memory bound."""
        arrived = self._clock()
        if self._full():
            self._blocked_since = arrived
            try:
                while self._full():
                    self._space = trio.Event() if self._space.is_set() else self._space
                    await self._space.wait()
            finally:
                self._blocked_since = None
        self.put_nowait(ev, arrived)

    def put_nowait(self, ev: ClientEvent, arrived: float | None = None) -> None:
        """Like :meth:`put` without the memory bound (for tests that drive the actor directly)."""
        was_empty = not self._queue
        if isinstance(ev, AudioIn):
            self._bytes += ev.nbytes
            tail = self._queue[-1] if self._queue else None
            if len(self._queue) >= self.budget and isinstance(tail, _Merging) and not tail.is_final:
                tail.frames.extend(ev.frames)
                tail.is_final = ev.is_final
                self.merged_frames_total += len(ev.frames)
            else:
                self._queue.append(_Merging(list(ev.frames), ev.is_final, self._clock() if arrived is None else arrived))
        else:
            self._queue.append(ev)
        if was_empty:
            self._wake()

    def lag(self, now: float) -> tuple[int, float]:
        """(audio bytes received and not yet processed, age in seconds of the oldest such
        frame; 0 when there is none)."""
        oldest = next((item.since for item in self._queue if isinstance(item, _Merging)), None)
        if self._blocked_since is not None:
            oldest = self._blocked_since if oldest is None else min(oldest, self._blocked_since)
        return self._bytes, 0.0 if oldest is None else max(0.0, now - oldest)

    def take(self) -> ClientEvent | None:
        """Next event for the actor, or None when empty. Frees room for a waiting :meth:`put`."""
        if not self._queue:
            return None
        item = self._queue.popleft()
        if isinstance(item, _Merging):
            ev: ClientEvent = item.freeze(len(self._queue))
            self._bytes -= ev.nbytes
        else:
            ev = item
        self._space.set()
        return ev
