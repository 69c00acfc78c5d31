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

    def freeze(self, queued_behind: int) -> AudioIn:
        return AudioIn(tuple(self.frames), self.is_final, queued_behind)


class ClientBacklog:
    def __init__(self, budget: int, max_bytes: int, wake: Callable[[], None]) -> None:
        self.budget = budget
        self.max_bytes = max_bytes
        self._wake = wake
        self._queue: collections.deque[_Merging | FinalizeIn | CloseIn] = collections.deque()
        self._bytes = 0
        self._space = trio.Event()
        self.merged_frames_total = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _full(self) -> bool:
        return len(self._queue) >= 2 * self.budget or self._bytes >= self.max_bytes

    async def put(self, ev: ClientEvent) -> None:
        """Queue (or merge) one client event; waits while the backlog is at its memory bound."""
        while self._full():
            self._space = trio.Event() if self._space.is_set() else self._space
            await self._space.wait()
        self.put_nowait(ev)

    def put_nowait(self, ev: ClientEvent) -> None:
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
                self._queue.append(_Merging(list(ev.frames), ev.is_final))
        else:
            self._queue.append(ev)
        if was_empty:
            self._wake()

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
