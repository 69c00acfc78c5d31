"""Per-connection rate limits: token buckets that pace, never drop.

:meth:`TokenBucket.take` returns at once while tokens are left and otherwise sleeps until
the next one accrues. The gateway readers take a token before each frame, so a client or
node sending faster than ``rate`` messages per second is simply read more slowly (TCP
pushes back on it); nothing it sent is lost and nobody else is slowed down.

:class:`AudioPacer` does the same for a session's audio, counted in seconds of audio: a
client may send faster than real time (a file, a resume catching up), up to ``factor``
times real time after a ``burst`` of seconds; faster, its audio is read more slowly.
"""

from __future__ import annotations

import trio


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else rate
        self._tokens = self.capacity
        self._stamp = trio.current_time()
        self.waited = 0  # how many takes had to wait

    async def take(self) -> None:
        """Take a token, sleeping until one accrues. No checkpoint when a token is there: the
        gateways read a frame right after, which is one (an extra checkpoint per frame cost
        ~4 % of the daemon's frames per CPU-second: docs/performance.md)."""
        now = trio.current_time()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            self.waited += 1
            await trio.sleep((1 - self._tokens) / self.rate)
            self._tokens = 1.0
            self._stamp = trio.current_time()
        self._tokens -= 1


class AudioPacer:
    """Seconds of audio accrue at ``factor`` per second of wall time, up to ``burst``;
    :meth:`take` waits until the frame's duration is there. ``factor`` 0: no pacing."""

    def __init__(self, factor: float, burst_s: float) -> None:
        self.factor = factor
        self.capacity = burst_s
        self._audio_s = burst_s
        self._stamp = trio.current_time()
        self.paced_s = 0.0  # how long takes waited in all

    async def take(self, audio_s: float) -> float:
        """Wait until ``audio_s`` seconds of audio may be read; returns how long it waited."""
        if not self.factor:
            return 0.0
        now = trio.current_time()
        self._audio_s = min(self.capacity, self._audio_s + (now - self._stamp) * self.factor)
        self._stamp = now
        self._audio_s -= audio_s
        if self._audio_s >= 0:
            return 0.0
        wait = -self._audio_s / self.factor
        await trio.sleep(wait)
        self.paced_s += wait
        return wait
