"""The session actor: the Trio shell that runs one session's :class:`~scheduler.session.core.SessionCore`.

The core decides everything (see ``core.py``: states, cuts, deadlines, results); this shell
owns the queues and the clock and performs the core's effects:

- client events (audio, finalize, close) queue in the session's :class:`ClientBacklog`, which
  merges audio past ``max_pending_events`` and bounds memory (see ``backlog.py``);
- job outcomes, "job is waiting" notes, shutdown, take-over and a wake token the backlog posts
  when it goes from empty to non-empty arrive on the fixed-capacity inbox channel
  (:data:`INBOX_CAPACITY`); producers never block (a full inbox drops the item, and the
  caller counts it);
- the loop waits for the next inbox item inside ``trio.move_on_at(core.next_deadline())``,
  hands it to the core, then up to :data:`CLIENT_BATCH` client events from the backlog (so
  answers and deadlines are never starved by a flood of audio), and then, if the core's next
  deadline has passed, a :class:`Tick`. While the loop is *parked* (waiting with nothing in
  its inbox), a client event that finds the backlog empty is stepped at once by the reader's
  task instead (:meth:`SessionActor._client_wake`): the same step the wake token would have
  caused, minus a task switch, a channel round and a cancel scope per frame; the core still
  has one owner at a time (the step never awaits). Client events are taken only while the core
  ``takes_input()``: at ``max_jobs_per_session`` unanswered translations for a language the
  backlog waits for one of the session's own answers or deadlines (which wake the loop), and
  the backlog's bound pushes back on that client alone. There are no timer tasks and no queued timer fires:
  the core keeps its deadlines and acts on them only when ticked, so a deadline of an
  utterance already cut cannot take effect (``core.py`` explains it); events queued before a
  deadline passed are taken before it.

Effects: ``Send`` goes to ``outbox`` (capacity ``outbox_size``), drained by the client
gateway's writer. The shell never waits on the client: a full outbox means the client is not
reading, and :class:`SlowClient` ends the session. ``Submit`` calls the job port's
``submit_nowait`` (never blocks); a refusal goes back into the core as a FAILED outcome.
``Cancel`` runs when the session ends (bounded to 5 s). ``Finalized`` and ``Count`` become
log lines and metrics. The shell closes ``outbox_send`` when it exits.

Guarantees (docs/protocol.md, "Result ordering and completeness"): ``utterance_index`` grows
by exactly one per finalize, only on the finalize path, and an empty or all-silent utterance
never takes an index; one ``result`` per finalized index, in index order, never later than
its result deadline; job audio is exactly the frames the client sent for the utterance, in
order, never split. ``tests/test_core_stateful.py`` proves them on the core;
``tests/test_actor_stateful.py`` on this shell under a MockClock.

Resume: a session resumed from another owner (journal.py) starts with ``next_index`` and the
``pending`` utterances it still owes results for, with the deadlines the first owner gave
them; ``take_over_nowait`` ends a session resumed elsewhere at once, and its jobs are then
not cancelled (the new owner wants their answers).
"""

from __future__ import annotations

import collections
import logging

import trio

from scheduler.jobs import JobOutcome, JobPort, JobWaiting
from scheduler.ops.config import Settings
from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.protocol import Busy, Result, SessionClosed, UtteranceFinalized
from scheduler.session import audio
from scheduler.session.backlog import ClientBacklog
from scheduler.session.core import Cancel, Count, Effect, Finalized, PendingUtterance, Send, SessionCore, Submit, refused
from scheduler.session.events import ClientEvent, ShutdownIn, TakenOverIn, Tick

log = logging.getLogger("scheduler.session")

INBOX_CAPACITY = 512
"""Places in the actor's inbox for job outcomes, waiting notes, shutdown and wake tokens."""

CLIENT_BATCH = 64
"""Client events handled per inbox item, so that deadlines and answers interleave with a flood."""

FINALIZED_KEPT = 256
"""Finalize times kept per session (the newest) for ``result_overhead_seconds``."""

CANCEL_TIMEOUT_S = 5
"""How long the shell tries to cancel a finished session's unanswered jobs."""


class _Wake:
    """The backlog went from empty to non-empty (the inbox's wake token)."""


_WAKE = _Wake()

__all__ = ["PendingUtterance", "SessionActor", "SlowClient"]


class SlowClient(Exception):
    """The client does not read its results: the outbox is full."""


class SessionActor:
    def __init__(
        self,
        *,
        session_id: str,
        src_lang: str,
        tgt_langs: list[str] | tuple[str, ...],
        sample_rate: int,
        settings: Settings,
        jobs: JobPort,
        metrics: Metrics,
        next_index: int = 0,
        pending: tuple[PendingUtterance, ...] | list[PendingUtterance] = (),
        epoch: int | None = None,
        outbox_size: int = 1024,
    ) -> None:
        """``next_index``, ``pending`` and ``epoch`` continue a resumed session (see :class:`SessionCore`)."""
        self.core = SessionCore(session_id=session_id, src_lang=src_lang, tgt_langs=tuple(tgt_langs),
                                sample_rate=sample_rate, settings=settings, next_index=next_index,
                                pending=tuple(pending), epoch=epoch)
        self.session_id = session_id
        self.src_lang = src_lang
        self.tgt_langs = self.core.tgt_langs
        self.sample_rate = sample_rate
        self.settings = settings
        self.epoch = epoch
        self._jobs = jobs
        self._metrics = metrics
        self.inbox_send, self._inbox = trio.open_memory_channel(INBOX_CAPACITY)
        max_utterance_bytes = int(settings.max_utterance_ms * sample_rate * audio.BYTES_PER_SAMPLE / 1000)
        self.backlog = ClientBacklog(settings.max_pending_events, 2 * max_utterance_bytes, self._client_wake)
        self.outbox_send, self.outbox = trio.open_memory_channel(outbox_size)
        self.started_at = trio.current_time()
        self.taken_over = False
        self.lagging = False  # a session_lagging episode is open (session/lag.py)
        self._input_held = self._held_logged = False  # input held at max_jobs_per_session now; logged once
        self._finalized_at: dict[int, float] = {}  # utterance index -> finalize time, for the overhead metric
        self._parked = False  # the loop waits in its inbox with nothing buffered (_loop, _client_wake)
        self._wait = trio.CancelScope()  # the scope of that wait: its deadline follows the core's
        self._failure: SlowClient | None = None  # found by an inline step, raised by the loop

    # ------------------------------------------------------------ producers' API

    async def put_client_event(self, ev: ClientEvent) -> None:
        """For the client gateway: queue (or merge) a client event; waits at the memory bound."""
        await self.backlog.put(ev)

    def put_outcome_nowait(self, outcome: JobOutcome | JobWaiting) -> bool:
        """For the answer router: never blocks; False when the session is gone or its inbox is full."""
        return self._put_internal(outcome)

    def shutdown_nowait(self) -> bool:
        """For the daemon's drain: finalize what is buffered, deliver, then close (reason shutdown)."""
        return self._put_internal(ShutdownIn())

    def wake_nowait(self) -> None:
        """Look at the deadlines again (Redis came back: they moved)."""
        self._post_wake()

    def take_over_nowait(self) -> None:
        """The session was resumed elsewhere: end now, without cancelling its jobs."""
        self.taken_over = True  # seen at the next step even when this token finds the inbox full
        self._put_internal(TakenOverIn())

    def _post_wake(self) -> None:
        self._put_internal(_WAKE)  # a full inbox will be read anyway, and the backlog with it

    def _put_internal(self, ev: object) -> bool:
        self._parked = False  # the loop has (or will find) an item: no inline step before it
        try:
            self.inbox_send.send_nowait(ev)
            return True
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False

    # ------------------------------------------------------------ read-only views

    @property
    def next_index(self) -> int:
        return self.core.next_index

    @property
    def results(self):
        return self.core.results

    @property
    def closing(self) -> str | None:
        return self.core.closing

    @property
    def buffered_ms(self) -> float:
        return self.core.buffered_ms

    def lag(self, now: float) -> tuple[float, float]:
        """How far behind real time the actor is with the client's audio: (ms of audio received
        and not yet processed, age in seconds of the oldest such frame)."""
        nbytes, age = self.backlog.lag(now)
        return nbytes * 1000 / (self.sample_rate * audio.BYTES_PER_SAMPLE), age

    def timer_deadlines(self) -> dict[str, float]:
        """When each of the core's deadlines comes due (``inf``: none); for tests and introspection."""
        return self.core.deadlines()

    def missing_answers(self) -> list[tuple[int, str]]:
        """(utterance index, target language) of every answer still awaited."""
        return self.core.missing_answers()

    # ------------------------------------------------------------ main loop

    async def run(self) -> str:
        """Process events until the session ends; returns the close reason.

        Raises :class:`SlowClient` when the client stops reading. On any exit the audio
        buffer is dropped, unanswered jobs cancelled (unless taken over) and the outbox closed.
        """
        try:
            return await self._loop()
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _loop(self) -> str:
        core = self.core
        self._perform(core.start(trio.current_time()))
        self._sync_outage()
        deadline = core.next_deadline()
        while not core.ended:
            item: object = None
            with trio.move_on_at(deadline) as self._wait:
                # parked: nothing buffered, so the loop waits for a producer (each clears the
                # flag) or the deadline; meanwhile client input is stepped inline (_client_wake)
                self._parked = not self._inbox.statistics().current_buffer_used
                try:
                    item = await self._inbox.receive()
                finally:
                    self._parked = False
            if self._failure is not None:  # (an inline step found the client not reading)
                raise self._failure
            deadline = self._step(item)
        return "taken_over" if core.taken_over else core.close_reason or "disconnected"

    def _step(self, item: object) -> float:
        """One turn of the loop: ``item`` (an inbox item, the wake token, or None when the
        deadline woke the loop), then the backlog, then the core's deadline if it came due.
        Returns the core's next deadline (nothing changes it before the next step)."""
        core = self.core
        self._sync_outage()  # (the outage as of the last wake: nothing awaited since)
        if self.taken_over:  # set by take_over_nowait, whose token may not have fit
            item = TakenOverIn()
        if item is not None and item is not _WAKE:
            if isinstance(item, JobOutcome) and item.node_s is not None:
                self._observe_overhead(item.utterance_index, item.node_s)
            self._perform(core.handle(item, trio.current_time()))
        self._read_backlog()
        deadline = core.next_deadline()
        if deadline <= trio.current_time():  # after what was queued before it
            self._perform(core.handle(Tick(), trio.current_time()))
            if len(self.backlog) and core.takes_input():
                self._post_wake()  # a deadline resolved what held the input: read on
            deadline = core.next_deadline()
        return deadline

    def _client_wake(self) -> None:
        """The backlog went from empty to non-empty. While the loop is parked (waiting, with
        nothing in its inbox) the client's event is stepped here, in the producer's task,
        exactly as the loop would step the wake token: one task switch, one channel round and
        one cancel scope less per frame. Trio runs one task at a time and the step never
        awaits, so the core still has one owner at a time. Otherwise the wake token is posted."""
        if not self._parked:
            self._post_wake()
            return
        try:
            deadline = self._step(_WAKE)
        except SlowClient as exc:  # raised by the loop, where the gateway waits for it
            self._failure = exc
        if self.core.ended or self._failure is not None:
            self._post_wake()
        else:
            self._wait.deadline = deadline

    def _sync_outage(self) -> None:
        """Tell the core whether Redis is out (its result deadlines count an outage out)."""
        self.core.set_outage(self._jobs.outage(trio.current_time()))

    def _read_backlog(self) -> None:
        for _ in range(CLIENT_BATCH):
            if self.core.ended:
                return
            if not self.core.takes_input():  # (held: an answer or a deadline of its own brings the loop back)
                if len(self.backlog) and not self._input_held:
                    self._input_held = True
                    self._metrics.session_input_held_total.inc()
                    if not self._held_logged:
                        self._held_logged = True  # (once per session: a flooding session is held again and again)
                        event(log, "session_input_held", session_id=self.session_id,
                              max_jobs_per_session=self.settings.max_jobs_per_session, backlog=len(self.backlog))
                return
            self._input_held = False
            ev = self.backlog.take()
            if ev is None:
                return
            self._metrics.session_actor_backlog_size.observe(len(self.backlog) + 1)
            self._perform(self.core.handle(ev, trio.current_time()))
        if len(self.backlog):
            self._post_wake()  # more queued: come back after what else is in the inbox

    # ------------------------------------------------------------ effects

    def _perform(self, effects: list[Effect]) -> None:
        """Perform ``effects`` in order; a refused job's FAILED outcome goes back into the core,
        and its effects are performed after the ones already due."""
        todo = collections.deque(effects)
        started = trio.current_time()
        while todo:
            effect = todo.popleft()
            match effect:
                case Send(message=msg):
                    self._emit(msg)
                case Submit(request=request):
                    error = self._jobs.submit_nowait(request)
                    if error is not None:
                        todo.extend(self.core.handle(refused(request, error), trio.current_time()))
                case Finalized():
                    self._finalized(effect, started)
                case Count(metric=name, amount=amount, label=label):
                    counter = getattr(self._metrics, name)
                    (counter.labels(label) if label else counter).inc(amount)
                case Cancel():
                    pass  # only end() cancels, and _cleanup performs it

    def _finalized(self, fin: Finalized, started: float) -> None:
        self._finalized_at[fin.index] = started
        if len(self._finalized_at) > FINALIZED_KEPT:  # answers of the oldest never came
            del self._finalized_at[next(iter(self._finalized_at))]
        latency = max(0.0, trio.current_time() - started)
        self._metrics.finalize_total.labels(fin.reason).inc()
        self._metrics.finalize_latency_seconds.observe(latency)
        event(log, "utterance_finalized", session_id=self.session_id, utterance_index=fin.index, reason=fin.reason,
              audio_ms=fin.audio_ms, turn_id=fin.turn_id, latency_ms=round(latency * 1000, 3))

    def _observe_overhead(self, index: int, node_s: float) -> None:
        """The daemon's own share of an answer's wait: since its utterance's finalize, less its
        time at the node (utterances finalized before a resume here are not known)."""
        finalized = self._finalized_at.get(index)
        if finalized is not None:
            self._metrics.result_overhead_seconds.observe(max(0.0, trio.current_time() - finalized - node_s))

    def _emit(self, msg: UtteranceFinalized | Result | Busy | SessionClosed) -> None:
        try:
            self.outbox_send.send_nowait(msg)
        except trio.WouldBlock:
            raise SlowClient(f"client has {self.outbox.statistics().current_buffer_used} unread messages") from None
        if isinstance(msg, Result):
            self._metrics.results_total.labels(msg.status).inc()

    async def _cleanup(self) -> None:
        if self.taken_over:
            self.core.handle(TakenOverIn(), trio.current_time())
        cancels = [e for e in self.core.end() if isinstance(e, Cancel)]
        self._inbox.close()  # late producers now get BrokenResourceError instead of queueing
        for cancel in cancels:
            with trio.move_on_after(CANCEL_TIMEOUT_S):
                await self._jobs.cancel(self.session_id, list(cancel.job_keys))
        self.outbox_send.close()
