"""Run the sans-IO :class:`SessionCore` directly for :class:`SessionModel`'s checks: no Trio, no thread.

The harness is the core's shell, written down in a few lines: client events go through a
real :class:`ClientBacklog` (the same merging as in the daemon); the "actor" takes one inbox
item, then up to ``CLIENT_BATCH`` client events, as ``actor.py`` does; time is a float that
moves only when a rule says, stopping at every deadline of the core on the way. Effects are
performed as the shell performs them: ``Send`` to a bounded outbox (full: the client is
slow, the session ends), ``Submit`` to the scripted port (a refusal goes back into the core),
``Count`` and ``Finalized`` to the metrics, and the ``Cancel`` of :meth:`SessionCore.end` to the port.
"""

from __future__ import annotations

import collections

from scheduler.session import audio
from scheduler.session.actor import CLIENT_BATCH, INBOX_CAPACITY, SlowClient
from scheduler.session.backlog import ClientBacklog
from scheduler.session.core import Cancel, Count, Finalized, Send, SessionCore, Submit, refused
from scheduler.session.events import Tick

from .session_model import EPS, SessionModel


class CoreHarness(SessionModel):
    def __init__(self, *, core_class=SessionCore, backlog_class=ClientBacklog, start: float = 100.0, **kwargs) -> None:
        self.t = start
        super().__init__(**kwargs)
        self.core = core_class(**self.session_args)
        max_bytes = 2 * int(self.settings.max_utterance_ms * 16000 * audio.BYTES_PER_SAMPLE / 1000)
        self.backlog = backlog_class(self.settings.max_pending_events, max_bytes, lambda: None, lambda: self.t)
        self.watch(self.backlog)
        self.inbox: collections.deque[object] = collections.deque()
        self.outbox: collections.deque[object] = collections.deque()
        self._ran_out = False
        self.finalized_effects: list[Finalized] = []
        self._perform(self.core.start(self.t))

    # ------------------------------------------------------------ SessionModel's interface

    def now(self) -> float:
        return self.t

    @property
    def alive(self) -> bool:
        return self.ended is None

    @property
    def closing(self) -> str | None:
        return self.core.closing

    @property
    def state(self):
        return self.core.state

    @property
    def buffered_ms(self) -> float:
        return self.core.buffered_ms

    @property
    def outbox_fill(self) -> tuple[int, int]:
        return len(self.outbox), self.outbox_size

    def deadlines(self) -> dict[str, float]:
        return self.core.deadlines()

    def _deliver(self, item: object) -> None:
        if self.alive and len(self.inbox) < INBOX_CAPACITY:
            self.inbox.append(item)

    def disconnect(self) -> None:
        if self.alive:
            self._end("disconnected")

    # ------------------------------------------------------------ the shell

    def _end(self, how: object) -> None:
        self.ended = how
        for effect in self.core.end():
            assert isinstance(effect, Cancel)
            self.port.cancelled.extend(effect.job_keys)

    def _perform(self, effects: list) -> None:
        todo = collections.deque(effects)
        while todo and self.alive:
            effect = todo.popleft()
            if isinstance(effect, Send):
                if len(self.outbox) >= self.outbox_size:
                    self._end(SlowClient("outbox full"))
                    return
                self.outbox.append(effect.message)
                self.emitted.append((self.t, effect.message))
            elif isinstance(effect, Submit):
                error = self.port.submit_nowait(effect.request)
                if error is not None:
                    todo.extend(self.core.handle(refused(effect.request, error), self.t))
            elif isinstance(effect, Finalized):
                self.metrics.finalize_total.labels(effect.reason).inc()
                self.finalized_effects.append(effect)
            elif isinstance(effect, Count):
                counter = getattr(self.metrics, effect.metric)
                (counter.labels(effect.label) if effect.label else counter).inc(effect.amount)
        if self.alive and self.core.ended:
            self.ended = "taken_over" if self.core.taken_over else self.core.close_reason
            self._end(self.ended)

    @property
    def held(self) -> bool:
        """The session takes no input now: max_jobs_per_session of its translations unanswered."""
        return not self.core.takes_input()

    def wake(self) -> None:
        if self.alive:
            self._step(None)

    def occupy(self) -> None:
        """Nothing to do: this shell always queues client input until it settles."""

    def _step(self, item: object | None) -> None:
        """One turn of the shell's loop: what the store's outage is, an inbox item (if any), a
        batch of client events, then a tick if a deadline has passed."""
        self.core.set_outage(self.port.outage(self.t))
        if item is not None:
            self._perform(self.core.handle(item, self.t))
        for _ in range(CLIENT_BATCH):
            ev = self.backlog.take() if self.alive and self.core.takes_input() else None
            if ev is None:
                break
            self._perform(self.core.handle(ev, self.t))
        if self.alive and self.core.next_deadline() <= self.t:
            self._perform(self.core.handle(Tick(), self.t))

    def settle(self) -> None:
        """Let the session take everything queued (as the Trio shell does before it blocks)."""
        while self.alive and (self.inbox or len(self.backlog) and self.core.takes_input() or self.core.next_deadline() <= self.t):
            self._step(self.inbox.popleft() if self.inbox else None)
        self.settled()
        if self.client_reading:
            self.outbox.clear()

    # ------------------------------------------------------------ time

    def race_with(self, events: list[str], seconds: float) -> None:
        """Queue ``events`` and move the clock to the first deadline before the session takes them."""
        self.put_events(events)
        first = min([d for d in self.deadlines().values() if self.t < d] + [self.t + seconds])
        rest = self.t + seconds - first
        self.t = first
        self.advance(rest)

    def advance(self, seconds: float) -> None:
        """Move time forward, stopping at every deadline on the way."""
        self.settle()
        target = self.t + seconds
        while True:
            upcoming = min([d for d in self.deadlines().values() if self.t < d] + [target]) if self.alive else target
            self.t = max(self.t, upcoming)
            self.settle()
            if self.t >= target - EPS:
                return

    def finish(self) -> None:
        """Liveness: close, let answers lapse, and every result and session_closed must come."""
        if self.alive:
            self.port.overloaded = False
            self.redis_back()
            self.client_reading = True
            self.settle()
            period = 2 * self.settings.result_deadline_ms / 1000 + 1  # (a deadline an outage moved: up to 2)
            if self.alive and self.closing is None:
                while not self.can_put() and self.alive:
                    self.advance(period if self.held else 0.1)
                self.put_close()
            for _ in range(len(self.backlog) + 2):  # held input: each lapse of its answers takes one event at least
                if self.alive:
                    self.advance(period)
        self.check_end()
