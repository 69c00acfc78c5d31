"""The session actor: the only reader and writer of one client session's state.

Inputs:
- client events (audio, finalize, close) queue in the session's :class:`ClientBacklog`,
  which merges audio past ``max_pending_events`` and bounds memory (see ``backlog.py``);
- everything else arrives on the actor's fixed-capacity inbox channel
  (:data:`INBOX_CAPACITY`): timer fires, job outcomes, "job is waiting" notes, shutdown,
  and a wake token the backlog posts when it goes from empty to non-empty.
The actor loop takes one inbox item, handles it, then handles up to :data:`CLIENT_BATCH`
client events from the backlog, so answers and timers are never starved by a flood of audio.

Outputs go to ``outbox`` (capacity ``outbox_size``), drained by the client gateway's writer.
The actor never waits on the client: a full outbox means the client is not reading, and
:class:`SlowClient` ends the session. The actor closes ``outbox_send`` when it exits.

Guarantees (protocol.md, "Result ordering and completeness"):
- ``utterance_index`` grows by exactly one per finalize, only on the finalize path; an
  empty or all-silent utterance never takes an index.
- Timers carry the generation of the utterance they were armed for (``generation`` changes
  whenever the open utterance is finalized or discarded) and their arming ``seq``: a fire
  for a finished utterance is suppressed and counted; a fire whose timer was re-armed
  meanwhile (new audio moved the pause deadline) is void.
- One ``result`` per finalized index, in index order, never later than its result deadline
  (see :mod:`scheduler.results`).
- Job audio is exactly the frames the client sent for the utterance, in order; frames are
  never split, also when merged under backpressure.

Resume: a session resumed from another owner (journal.py) starts with ``next_index`` and
the ``pending`` utterances it still owes results for, with the deadlines the first owner
gave them; ``take_over_nowait`` ends a session resumed elsewhere at once, and its jobs are
then not cancelled (the new owner wants their answers).

Backpressure: when the actor takes an audio event into which the backlog merged frames, it
sends ``busy`` (once per episode: again only after the backlog fell below half the budget).
If the backlog still holds at least half the budget after that event, merging was not
enough: the open utterance is finalized at once with reason ``backlog``
(``busy.action = "early_finalize"``; otherwise ``"merged"``).
"""

from __future__ import annotations

import logging
import math

import attrs
import trio

from . import audio
from .backlog import AudioIn, ClientBacklog, ClientEvent, CloseIn, FinalizeIn
from .config import Settings
from .jobs import JobOutcome, JobPort, JobRequest, JobWaiting
from .keys import job_key_for
from .logs import event
from .metrics import Metrics
from .protocol import Busy, Result, SessionClosed, Translation, UtteranceFinalized
from .results import ResultsSequencer
from .timers import GenerationTimer, TimerFired

log = logging.getLogger("scheduler.session")

INBOX_CAPACITY = 512
"""Places in the actor's inbox for timer fires, job outcomes, waiting notes and wake tokens."""

CLIENT_BATCH = 64
"""Client events handled per inbox item, so that timers and answers interleave with a flood."""


@attrs.frozen
class ClientWake:
    """The backlog went from empty to non-empty."""


@attrs.frozen
class ShutdownIn:
    """The daemon is draining (not a client event: it takes no client slot)."""


@attrs.frozen
class TakenOverIn:
    """The session was resumed elsewhere (or on a newer connection here): stop at once,
    leaving its jobs to the new owner."""


@attrs.frozen
class PendingUtterance:
    """An utterance a previous owner finalized whose result the client has not had (resume)."""

    index: int
    reason: str
    turn_id: str
    deadline: float  # trio clock


__all__ = ["AudioIn", "CloseIn", "FinalizeIn", "PendingUtterance", "SessionActor", "SlowClient"]


class SlowClient(Exception):
    """The client does not read its results: the outbox is full."""


# ---------------------------------------------------------------- the actor


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
        """``next_index``, ``pending`` and ``epoch`` continue a resumed session: utterances are
        numbered from ``next_index``, and ``pending`` (consecutive, ending at ``next_index - 1``)
        are finalized utterances still owed a result."""
        self.session_id = session_id
        self.src_lang = src_lang
        self.tgt_langs = tuple(tgt_langs)
        self.sample_rate = sample_rate
        self.settings = settings
        self._jobs = jobs
        self._metrics = metrics
        self.inbox_send, self._inbox = trio.open_memory_channel(INBOX_CAPACITY)
        self._bytes_per_ms = sample_rate * audio.BYTES_PER_SAMPLE / 1000.0
        max_utterance_bytes = int(settings.max_utterance_ms * self._bytes_per_ms)
        self.backlog = ClientBacklog(settings.max_pending_events, 2 * max_utterance_bytes, self._post_wake)
        self.outbox_send, self.outbox = trio.open_memory_channel(outbox_size)
        self.epoch = epoch
        self.started_at = trio.current_time()
        self.taken_over = False
        self.results = ResultsSequencer(pending[0].index if pending else next_index)
        for utt in pending:
            self.results.add(utt.index, reason=utt.reason, turn_id=utt.turn_id, tgt_langs=self.tgt_langs,
                             deadline=utt.deadline)
        self.next_index = next_index
        if pending and pending[-1].index != next_index - 1:
            raise ValueError(f"pending utterances must end at next_index - 1 = {next_index - 1}")
        self.closing: str | None = None
        self._silence_ms2 = audio.silence_threshold(settings.silence_dbfs)
        self._busy_sent = False
        # the open utterance
        self.generation = 0
        self._chunks: list[bytes] = []
        self._nbytes = 0
        self._has_speech = False
        self._trailing_silence_ms = 0.0
        # turns
        self._turn_seq = 0
        self._turn_prefix = f"{session_id}:t" if not epoch or epoch <= 1 else f"{session_id}:e{epoch}t"
        self.turn_id = self._new_turn_id()
        self._turn_kept = False
        # timers (their tasks run in the actor's own nursery)
        self._idle_gen = 0
        self._result_gen = 0
        self._timers = {k: GenerationTimer(k, self.inbox_send) for k in ("pause", "timeout", "idle", "result")}

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

    def take_over_nowait(self) -> None:
        """The session was resumed elsewhere: end now, without cancelling its jobs."""
        self.taken_over = True  # seen at the next inbox item even when this one finds the inbox full
        self._put_internal(TakenOverIn())

    def _post_wake(self) -> None:
        self._put_internal(ClientWake())  # a full inbox will be read anyway, and the backlog with it

    def _put_internal(self, ev: object) -> bool:
        try:
            self.inbox_send.send_nowait(ev)
            return True
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False

    def timer_deadlines(self) -> dict[str, float]:
        """When each timer fires next (``inf`` when disarmed); for tests and introspection."""
        return {kind: timer.deadline for kind, timer in self._timers.items()}

    def missing_answers(self) -> list[tuple[int, str]]:
        """(utterance index, target language) of every answer still awaited."""
        return [(index, tgt) for index in self.results.open_indexes() for tgt in self.results.pending_languages(index)]

    @property
    def buffered_ms(self) -> float:
        return self._nbytes / self._bytes_per_ms

    # ------------------------------------------------------------ main loop

    async def run(self) -> str:
        """Process events until the session ends; returns the close reason.

        Raises :class:`SlowClient` when the client stops reading. On any exit the audio
        buffer is dropped, every timer invalidated, unanswered jobs cancelled and the
        outbox closed.
        """
        slow: SlowClient | None = None
        try:
            async with trio.open_nursery() as nursery:
                for timer in self._timers.values():
                    nursery.start_soon(timer.run)
                try:
                    reason = await self._loop()
                except SlowClient as exc:  # raised here, not inside the nursery's exception group
                    slow = exc
                finally:
                    nursery.cancel_scope.cancel()
            if slow is not None:
                raise slow
            return reason
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()

    async def _loop(self) -> str:
        self._touch_idle()
        self._flush_results()  # a resumed session may owe results already past their deadline
        async for item in self._inbox:
            if self.taken_over:  # set by take_over_nowait, whose TakenOverIn only wakes the loop
                return "taken_over"
            self._handle(item)
            for _ in range(CLIENT_BATCH):
                ev = self.backlog.take()
                if ev is None:
                    break
                self._metrics.session_actor_backlog_size.observe(len(self.backlog) + 1)
                self._handle_client(ev)
            else:
                if len(self.backlog):
                    self._post_wake()  # more queued: come back after what else is in the inbox
            if self.closing is not None and self.results.outstanding == 0:
                self._emit(SessionClosed(reason=self.closing, utterances=self.next_index))
                return self.closing
        return "disconnected"  # pragma: no cover - the actor holds inbox_send, so never reached

    def _handle(self, item: object) -> None:
        match item:
            case ClientWake():
                pass  # the backlog is read after every inbox item
            case TimerFired():
                self._on_timer(item)
            case JobOutcome():
                self._on_outcome(item)
            case JobWaiting(utterance_index=index, tgt_lang=tgt, error=error):
                self.results.set_fallback(index, tgt, error)
            case ShutdownIn():
                self._begin_close("shutdown")
            case _:
                raise TypeError(f"session actor got an unknown event {item!r}")

    def _handle_client(self, ev: ClientEvent) -> None:
        self._touch_idle()
        if isinstance(ev, CloseIn):
            self._begin_close(ev.reason)
        elif self.closing is not None:
            return  # after close_session nothing more is taken
        elif isinstance(ev, AudioIn):
            self._on_audio(ev)
        else:
            self._finalize("is_final", trio.current_time())

    # ------------------------------------------------------------ audio and finalize

    def _new_turn_id(self) -> str:
        self._turn_seq += 1
        return f"{self._turn_prefix}{self._turn_seq}"

    def _on_audio(self, ev: AudioIn) -> None:
        now = trio.current_time()
        for pcm in ev.frames:
            if not pcm:
                continue
            if not self._chunks:
                self._timers["timeout"].arm(now + self.settings.utterance_timeout_ms / 1000, self.generation)
            self._chunks.append(pcm)
            self._nbytes += len(pcm)
            if audio.is_silent(pcm, self._silence_ms2):
                self._trailing_silence_ms += len(pcm) / self._bytes_per_ms
            else:
                self._has_speech = True
                self._trailing_silence_ms = 0.0
            self._timers["pause"].arm(now + self.settings.pause_ms / 1000, self.generation)
            if self.buffered_ms >= self.settings.max_utterance_ms:
                self._finalize("max_duration", now)
            elif self._trailing_silence_ms >= self.settings.pause_ms:
                # speech then enough silence: end of utterance; silence only: discard it
                self._finalize("pause", now)
        if ev.merged:
            self._on_pressure(now)
        elif self._busy_sent and len(self.backlog) < self.backlog.budget / 2:
            self._busy_sent = False  # recovered: a new crossing gets a new busy
        if ev.is_final:
            self._finalize("is_final", now)

    def _on_pressure(self, now: float) -> None:
        """The client got ``max_pending_events`` ahead and frames were merged."""
        backlog = len(self.backlog)
        early = backlog >= self.backlog.budget / 2 and self._finalize("backlog", now)
        if not self._busy_sent:
            self._busy_sent = True
            self._emit(Busy(backlog=backlog + 1, action="early_finalize" if early else "merged"))

    def _reset_utterance(self) -> None:
        self.generation += 1
        self._chunks = []
        self._nbytes = 0
        self._has_speech = False
        self._trailing_silence_ms = 0.0
        self._timers["pause"].disarm()
        self._timers["timeout"].disarm()

    def _finalize(self, reason: str, since: float) -> bool:
        """Cut the open utterance. Returns False (no index taken) when it is empty or silent."""
        if not self._has_speech:
            if self._chunks:
                self._reset_utterance()  # all silence: discarded, no message
            return False
        index = self.next_index
        self.next_index += 1
        pcm = b"".join(self._chunks)
        audio_ms = round(self._nbytes / self._bytes_per_ms)
        turn_id = self.turn_id
        if reason == "max_duration":
            turn_action = "keep"
            self._turn_kept = True
        else:
            turn_action = "end" if self._turn_kept else "none"
            self.turn_id = self._new_turn_id()
            self._turn_kept = False
        self._reset_utterance()

        now = trio.current_time()
        self._emit(UtteranceFinalized(utterance_index=index, reason=reason, turn_id=turn_id, audio_ms=audio_ms))
        deadline = now + self.settings.result_deadline_ms / 1000
        self.results.add(index, reason=reason, turn_id=turn_id, tgt_langs=self.tgt_langs, deadline=deadline)
        for tgt in self.tgt_langs:
            refused = self._jobs.submit_nowait(
                JobRequest(
                    job_key=job_key_for(self.session_id, index, tgt),
                    session_id=self.session_id,
                    utterance_index=index,
                    src_lang=self.src_lang,
                    tgt_lang=tgt,
                    turn_id=turn_id,
                    turn_action=turn_action,
                    turn_jobs=len(self.tgt_langs),
                    sample_rate=self.sample_rate,
                    audio=pcm,
                    deadline=deadline,
                    epoch=self.epoch,
                )
            )
            if refused is not None:
                self.results.record(index, tgt, Translation(status="FAILED", error=refused))
        self._flush_results()
        latency = max(0.0, trio.current_time() - since)
        self._metrics.finalize_total.labels(reason).inc()
        self._metrics.finalize_latency_seconds.observe(latency)
        event(log, "utterance_finalized", session_id=self.session_id, utterance_index=index, reason=reason,
              audio_ms=audio_ms, turn_id=turn_id, latency_ms=round(latency * 1000, 3))
        return True

    # ------------------------------------------------------------ timers

    def _touch_idle(self) -> None:
        self._idle_gen += 1
        self._timers["idle"].arm(trio.current_time() + self.settings.idle_timeout_ms / 1000, self._idle_gen)

    def _arm_result_timer(self) -> None:
        self._result_gen += 1
        deadline = self.results.next_deadline()
        if math.isinf(deadline):
            self._timers["result"].disarm()
        else:
            self._timers["result"].arm(deadline, self._result_gen)

    def fire_is_valid(self, fired: TimerFired) -> bool:
        """A finalize timer's fire counts only for the open utterance and its latest arming."""
        return fired.generation == self.generation and self._timers[fired.kind].is_current(fired)

    def _on_timer(self, fired: TimerFired) -> None:
        if fired.kind in ("pause", "timeout"):
            if self.closing is not None or fired.generation != self.generation:
                self._metrics.duplicate_finalize_suppressed_total.inc()  # utterance already finalized
                return
            if self.fire_is_valid(fired):
                self._finalize(fired.kind, trio.current_time())
        elif fired.kind == "idle" and fired.generation == self._idle_gen and self.closing is None:
            self._begin_close("idle_timeout")
        elif fired.kind == "result" and fired.generation == self._result_gen:
            skipped = self.results.expire(trio.current_time())
            if skipped:
                self._metrics.result_gap_timeout_total.inc(skipped)
            self._flush_results()

    # ------------------------------------------------------------ results and close

    def _on_outcome(self, outcome: JobOutcome) -> None:
        if not self.results.record(outcome.utterance_index, outcome.tgt_lang, outcome.translation, outcome.source_text):
            self._metrics.stale_answers_dropped_total.labels("LATE").inc()
            return
        self._flush_results()

    def _flush_results(self) -> None:
        for result in self.results.pop_ready():
            self._metrics.results_total.labels(result.status).inc()
            self._emit(result)
        self._arm_result_timer()

    def _begin_close(self, reason: str) -> None:
        if self.closing is not None:
            return
        self._finalize("close", trio.current_time())
        self.closing = reason
        self._reset_utterance()
        self._timers["idle"].disarm()

    def _emit(self, msg: UtteranceFinalized | Result | Busy | SessionClosed) -> None:
        try:
            self.outbox_send.send_nowait(msg)
        except trio.WouldBlock:
            raise SlowClient(f"client has {self.outbox.statistics().current_buffer_used} unread messages") from None

    async def _cleanup(self) -> None:
        self._reset_utterance()
        for timer in self._timers.values():
            timer.disarm()
        unanswered = [job_key_for(self.session_id, index, tgt) for index, tgt in self.missing_answers()]
        self._inbox.close()  # late producers now get BrokenResourceError instead of queueing
        if unanswered and not self.taken_over:  # a new owner still wants those answers
            with trio.move_on_after(5):
                await self._jobs.cancel(self.session_id, unanswered)
        self.outbox_send.close()
