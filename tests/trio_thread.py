"""A Trio run with a manual ``MockClock`` on its own thread, for Hypothesis state machines
whose rules are synchronous (``test_actor_stateful.py``, ``test_dispatcher_stateful.py``)."""

from __future__ import annotations

import threading

import trio
import trio.testing


class _IdleInstrument(trio.abc.Instrument):
    """Sets ``idle`` when the run loop is about to block with nothing runnable."""

    def __init__(self) -> None:
        self.idle = threading.Event()

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self.idle.set()

    def after_io_wait(self, timeout: float) -> None:
        self.idle.clear()


class TrioThread:
    """A Trio run with a manual MockClock on its own thread; rules call into it synchronously.

    Determinism: every call starts from an idle loop and returns only when the loop is idle
    again, so the scheduler's batches (shuffled by Trio's Hypothesis-seeded RNG) never depend
    on thread timing, and a failing example replays exactly.
    """

    def __init__(self, *, real_time: bool = False) -> None:
        """``real_time``: Trio's own clock instead (a daemon's sockets and timers run as in
        production; a call still returns once the loop has nothing runnable)."""
        self.clock = None if real_time else trio.testing.MockClock()
        self._instrument = _IdleInstrument()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._instrument.idle.wait()

    def _main(self) -> None:
        try:
            trio.run(self._root, clock=self.clock, instruments=[self._instrument])
        except BaseException as exc:  # surfaced by the next call or close()
            self.error = exc
            self._ready.set()
            self._instrument.idle.set()

    async def _root(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _checked(self, send, fn, *args):
        if self.error is not None:
            raise self.error
        self._instrument.idle.clear()
        try:
            return send(fn, *args, trio_token=self.token)
        finally:
            self._instrument.idle.wait()

    def call(self, fn, *args):
        return self._checked(trio.from_thread.run, fn, *args)

    def call_sync(self, fn, *args):
        return self._checked(trio.from_thread.run_sync, fn, *args)

    def close(self) -> None:
        if self.error is None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(timeout=10)
        if self.error is not None:
            raise self.error
