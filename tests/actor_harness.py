"""Run the real Trio :class:`SessionActor` under a manual MockClock for :class:`SessionModel`'s checks.

Node answers reach the actor exactly as the daemon delivers them (``put_outcome_nowait``);
client events go through the actor's real backlog. Time moves only when a test says so,
stopping at every deadline of the core on the way.
"""

from __future__ import annotations

import trio
import trio.testing

from scheduler.session.actor import SessionActor, SlowClient
from scheduler.session.events import ShutdownIn, TakenOverIn

from .session_model import EPS, SessionModel


class ActorHarness(SessionModel):
    """Owns one actor in ``nursery``; every method runs in the actor's Trio run."""

    def __init__(self, nursery: trio.Nursery, clock: trio.testing.MockClock, *, actor_class=SessionActor,
                 **kwargs) -> None:
        self.clock = clock
        super().__init__(**kwargs)
        self.actor = actor_class(jobs=self.port, metrics=self.metrics, outbox_size=self.outbox_size, **self.session_args)
        real_emit = self.actor._emit

        def recording_emit(msg):
            real_emit(msg)  # raises SlowClient first when the outbox is full: then nothing was sent
            self.emitted.append((trio.current_time(), msg))

        self.actor._emit = recording_emit
        self.watch(self.actor.backlog)
        self.done = trio.Event()
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        with self._scope:
            try:
                self.ended = await self.actor.run()
            except SlowClient as exc:
                self.ended = exc
        if self.ended is None:
            self.ended = "disconnected"
        self.done.set()

    # ------------------------------------------------------------ SessionModel's interface

    def now(self) -> float:
        return trio.current_time()

    @property
    def alive(self) -> bool:
        return not self.done.is_set()

    @property
    def backlog(self):
        return self.actor.backlog

    @property
    def held(self) -> bool:
        """The session takes no input now: max_jobs_per_session of its translations unanswered."""
        return not self.actor.core.takes_input()

    @property
    def closing(self) -> str | None:
        return self.actor.closing

    @property
    def state(self):
        return self.actor.core.state

    @property
    def buffered_ms(self) -> float:
        return self.actor.buffered_ms

    @property
    def outbox_fill(self) -> tuple[int, int]:
        stats = self.actor.outbox.statistics()
        return stats.current_buffer_used, stats.max_buffer_size

    def deadlines(self) -> dict[str, float]:
        return self.actor.timer_deadlines()

    def _deliver(self, item: object) -> None:
        if isinstance(item, ShutdownIn):
            self.actor.shutdown_nowait()
        elif isinstance(item, TakenOverIn):
            self.actor.take_over_nowait()
        else:
            self.actor.put_outcome_nowait(item)

    def disconnect(self) -> None:
        self._scope.cancel()

    def wake(self) -> None:
        self.actor.wake_nowait()

    def occupy(self) -> None:
        """A wake token in the inbox: the actor is no longer parked, so client input queues
        (instead of being stepped inline, actor.py ``_client_wake``) until the actor runs."""
        self.actor.wake_nowait()

    # ------------------------------------------------------------ time

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()
        self.check_worked_off()
        self.settled()
        if self.client_reading:
            while True:
                try:
                    self.actor.outbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

    def check_worked_off(self) -> None:
        """Every task is blocked: a live actor waits for its inbox, so nothing it was given may
        still be queued. Queued client input (or an inbox item) now would wait for an unrelated
        event (an answer, a deadline) instead of being worked off at once."""
        if self.alive:
            inbox = self.actor.inbox_send.statistics().current_buffer_used
            assert (self.held or not len(self.actor.backlog)) and not inbox, (  # (held: waiting for its own answers)
                f"{len(self.actor.backlog)} client events and {inbox} inbox items queued while the actor waits")

    async def race_with(self, events: list[str], seconds: float) -> None:
        """Queue ``events`` and move the clock in one step (no checkpoint in between)."""
        self.put_events(events)
        await self.race(seconds)

    async def race(self, seconds: float) -> None:
        """Move the clock *without* letting the actor run first, so that client events already
        queued race the timers that come due. The jump stops at the first timer deadline (every
        timer still fires at its exact time); the rest of ``seconds`` passes as in :meth:`advance`."""
        now = trio.current_time()
        first = min([d for d in self.deadlines().values() if now < d] + [now + seconds])
        self.clock.jump(first - now)
        await self.advance(now + seconds - first)

    async def advance(self, seconds: float) -> None:
        """Move virtual time forward, stopping at every timer deadline on the way."""
        await self.settle()
        target = trio.current_time() + seconds
        while True:
            now = trio.current_time()
            upcoming = min([d for d in self.deadlines().values() if now < d] + [target]) if self.alive else target
            if upcoming > now:
                self.clock.jump(upcoming - now)
            await self.settle()
            if trio.current_time() >= target - EPS:
                return

    async def finish(self) -> None:
        """Liveness: close, let answers lapse, and every result and session_closed must come."""
        if self.alive:
            self.port.overloaded = False
            self.redis_back()
            self.client_reading = True
            await self.settle()
            period = 2 * self.settings.result_deadline_ms / 1000 + 1  # (a deadline an outage moved: up to 2)
            if self.alive and self.closing is None:
                while not self.can_put() and self.alive:
                    await self.advance(period if self.held else 0.1)
                self.put_close()
            for _ in range(len(self.backlog) + 2):  # held input: each lapse of its answers takes one event at least
                if self.alive:
                    await self.advance(period)
        self.check_end()
