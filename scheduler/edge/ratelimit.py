"""Per-connection message rate limit: a token bucket that paces, never drops.

:meth:`TokenBucket.take` returns at once while tokens are left and otherwise sleeps until
the next one accrues. The gateway readers take a token before each frame, so a client or
node sending faster than ``rate`` messages per second is simply read more slowly (TCP
pushes back on it); nothing it sent is lost and nobody else is slowed down.
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
        now = trio.current_time()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            self.waited += 1
            await trio.sleep((1 - self._tokens) / self.rate)
            self._tokens = 1.0
            self._stamp = trio.current_time()
        else:
            await trio.lowlevel.checkpoint()
        self._tokens -= 1
