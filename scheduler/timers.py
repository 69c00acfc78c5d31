"""A generation-checked one-shot timer built on a cancel scope deadline.

The owner arms it with ``(deadline, generation)``; when the deadline passes the timer's task
sends ``TimerFired(kind, generation)`` into the owner's channel, once. Re-arming only moves
the cancel scope's deadline (no task is started or cancelled). A fire can arrive after the
owner has moved on (the owner armed a new generation, or already acted for another reason
while the fire sat in its channel): the owner must compare ``generation`` with its own and
ignore a stale fire. That check, not timing, is what makes races harmless.
"""

from __future__ import annotations

import math

import attrs
import trio


@attrs.frozen
class TimerFired:
    kind: str
    generation: int


class GenerationTimer:
    """Run :meth:`run` in the owner's nursery; call :meth:`arm` / :meth:`disarm` from the owner."""

    def __init__(self, kind: str, send_channel: trio.MemorySendChannel) -> None:
        self.kind = kind
        self._send = send_channel
        self._deadline = math.inf
        self._generation: int | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def deadline(self) -> float:
        return self._deadline

    def arm(self, deadline: float, generation: int) -> None:
        self._deadline = deadline
        self._generation = generation
        if self._scope is not None:
            self._scope.deadline = deadline

    def disarm(self) -> None:
        self._deadline = math.inf
        self._generation = None
        if self._scope is not None:
            self._scope.deadline = math.inf

    async def run(self) -> None:
        """Sleep until the armed deadline, fire, repeat. Returns when the channel closes."""
        while True:
            with trio.CancelScope(deadline=self._deadline) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            if self._generation is None or trio.current_time() < self._deadline:
                continue
            fired = TimerFired(self.kind, self._generation)
            self._generation, self._deadline = None, math.inf
            try:
                await self._send.send(fired)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
