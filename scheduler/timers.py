"""A generation-checked one-shot timer built on a cancel scope deadline.

The owner arms it with ``(deadline, generation)``; when the deadline passes, the timer's task
sends ``TimerFired(kind, generation, seq)`` into the owner's channel, once. Re-arming never
starts or cancels a task, and re-arming to a later deadline (the pause and idle timers move
forward on every audio frame) does not even touch the cancel scope: the scope wakes at the
earlier deadline, sees the later one and sleeps again. So a frame costs no change to Trio's
deadline heap (this was ~12 % of the daemon's main thread under load, bench/load.py).

A fire can arrive after the owner has moved on, because it waits in the owner's channel
while the owner handles events that were queued before it. Two checks make that harmless:

- ``generation`` is the owner's generation (for the session actor: the utterance) at arming
  time. A different current generation means the fire is for something already finished
  (for a finalize timer: a duplicate finalize, to suppress and count).
- ``seq`` identifies the arming. :meth:`GenerationTimer.is_current` is False when the timer
  was re-armed or disarmed after this fire was sent: its deadline moved, the fire is void.
"""

from __future__ import annotations

import math

import attrs
import trio


@attrs.frozen
class TimerFired:
    kind: str
    generation: int
    seq: int = 0


class GenerationTimer:
    """Run :meth:`run` in the owner's nursery; call :meth:`arm` / :meth:`disarm` from the owner."""

    def __init__(self, kind: str, send_channel: trio.MemorySendChannel) -> None:
        self.kind = kind
        self._send = send_channel
        self._deadline = math.inf
        self._generation: int | None = None
        self._seq = 0
        self._scope: trio.CancelScope | None = None

    @property
    def deadline(self) -> float:
        """When the timer fires next (``inf`` when disarmed)."""
        return self._deadline

    def arm(self, deadline: float, generation: int) -> None:
        self._seq += 1
        self._deadline = deadline
        self._generation = generation
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline  # earlier: wake then; later: run() sleeps on

    def disarm(self) -> None:
        """No fire until armed again (the scope may still wake once, and goes back to sleep)."""
        self._seq += 1
        self._deadline = math.inf
        self._generation = None

    def is_current(self, fired: TimerFired) -> bool:
        """True if nothing re-armed or disarmed this timer since ``fired`` was sent."""
        return fired.kind == self.kind and fired.seq == self._seq

    async def run(self) -> None:
        """Sleep until the armed deadline, fire, repeat. Returns when the channel closes."""
        while True:
            with trio.CancelScope(deadline=self._deadline) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            if self._generation is None or trio.current_time() < self._deadline:
                continue
            fired = TimerFired(self.kind, self._generation, self._seq)
            self._generation, self._deadline = None, math.inf  # fired: one shot, same seq
            try:
                await self._send.send(fired)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
