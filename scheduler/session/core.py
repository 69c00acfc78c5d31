"""The session core: every decision about one client session, with no I/O and no clock.

``SessionCore.handle(event, now)`` takes one event (``events.py``) and the time, changes the
session's state and returns the effects for the shell to perform, in order:
:class:`Send` (a message for the client), :class:`Submit` (a job request), :class:`Cancel`
(jobs whose answers are no longer wanted), :class:`Finalized` and :class:`Count` (for logs
and metrics). ``next_deadline()`` says when the core next wants to be woken with
:class:`~scheduler.session.events.Tick` if nothing else happens. It imports no Trio, reads no
clock and performs no I/O, so a test drives it directly, step by step (the Trio shell is
``actor.py``).

States (h11's ``_state.py`` is the model; ``core.state``)::

    state      event                                          next      effects
    ---------  ---------------------------------------------  --------  -----------------------------------
    IDLE       audio                                          OPEN      pause and timeout deadlines set
    OPEN       audio                                          OPEN      pause deadline moves; a cut if the
                                                                        frame reaches max_utterance_ms
                                                                        (max_duration) or ends pause_ms of
                                                                        silence after speech (pause)
    OPEN       is_final, finalize, pause or timeout           IDLE      a cut
               deadline, merged audio with half the budget
               still queued (backlog)
    IDLE       is_final, finalize                             IDLE      nothing (an empty utterance)
    IDLE/OPEN  close_session, shutdown, idle deadline         CLOSING   a cut with reason close
    CLOSING    answer, waiting note, result deadline          CLOSING   results released in order
    CLOSING    the last owed result released                  ENDED     session_closed
    any        taken over                                     ENDED     nothing (the new owner has the jobs)
    any        end() (socket gone, slow client, or ENDED)     ENDED     Cancel of every unanswered job,
                                                                        unless taken over

A *cut* with speech takes the next index: ``utterance_finalized``, one job per target
language, and the index opens in the results sequencer with deadline ``now +
result_deadline_ms``. A cut of silence only discards the audio: no index, no message.
In every state, answers fill results and the result deadline turns what is missing into
SKIPPED (or FAILED when the job was waiting for a node); results leave in index order.

Deadlines instead of timers: ``pause`` (last frame + ``pause_ms``) and ``timeout`` (first
frame + ``utterance_timeout_ms``) belong to the open utterance and are cleared when it is
cut; ``idle`` (last client event + ``idle_timeout_ms``) is cleared on close; ``result`` is
the earliest open result deadline. The shell calls ``handle(Tick(), now)`` once
``next_deadline()`` has passed, after the events that were queued before it (so an event the
client sent before a deadline, but that waited in the queue, is taken first: it may move or
clear that deadline); a tick acts on every due deadline, earliest first. So the rule "a
timer for an old utterance never takes effect" holds by construction: no fire is ever
queued, and a deadline of an utterance that was cut no longer exists when the next tick
looks (``tests/test_core_stateful.py`` shows a core that keeps one is caught). When the pause
and the timeout deadline of one utterance are both due at one tick, it is cut once and the
other cause is counted in ``duplicate_finalize_suppressed_total``.

Redis outages: before each step the shell tells the core what the store that answers go
through says of its outages (``set_outage``: out since when, and the last one that ended).
While it is out, a result deadline after the outage's start is held, at most
``result_deadline_ms`` more (an answer that waits on Redis is the daemon's wait, not the
node's); once it ended, each such deadline moves later by the outage time it overlapped, at
most ``result_deadline_ms``. The pause, timeout and idle deadlines are the client's and do
not move.

Backpressure: an :class:`~scheduler.session.events.AudioIn` into which the backlog merged
frames sends ``busy`` (once per episode: again only after an unmerged event was taken with
less than half the budget queued behind it). If at least half the budget is still queued
behind it, the open utterance is cut at once (reason ``backlog``, ``busy.action =
"early_finalize"``; otherwise ``"merged"``).
"""

from __future__ import annotations

import collections
import enum
import math

import attrs

from scheduler.jobs import JobOutcome, JobRequest, JobWaiting, StoreOutage, job_key_for, outage_postponement
from scheduler.ops.config import Settings
from scheduler.protocol import Busy, Result, SessionClosed, Translation, UtteranceFinalized
from scheduler.session import audio
from scheduler.session.events import AudioIn, CloseIn, FinalizeIn, ShutdownIn, TakenOverIn, Tick
from scheduler.session.results import ResultsSequencer


class State(enum.Enum):
    IDLE = "idle"  # no open utterance
    OPEN = "open"  # buffered audio, with or without speech
    CLOSING = "closing"  # close taken; answers and result deadlines still run
    ENDED = "ended"


# ---------------------------------------------------------------- effects


@attrs.frozen
class Send:
    """A message for the client (``utterance_finalized``, ``result``, ``busy``, ``session_closed``)."""

    message: UtteranceFinalized | Result | Busy | SessionClosed


@attrs.frozen
class Submit:
    """Queue this job. If the scheduler refuses it, feed back ``JobOutcome(FAILED, error)``."""

    request: JobRequest


@attrs.frozen
class Cancel:
    """Withdraw these jobs: their answers are no longer wanted."""

    job_keys: tuple[str, ...]


@attrs.frozen
class Finalized:
    """An utterance was cut and took ``index`` (for the log line and the finalize metrics)."""

    index: int
    reason: str
    audio_ms: int
    turn_id: str


@attrs.frozen
class Count:
    """Add ``amount`` to the counter ``metric`` (a :class:`~scheduler.ops.metrics.Metrics` attribute)."""

    metric: str
    amount: int = 1
    label: str | None = None


Effect = Send | Submit | Cancel | Finalized | Count


@attrs.frozen
class PendingUtterance:
    """An utterance a previous owner finalized whose result the client has not had (resume)."""

    index: int
    reason: str
    turn_id: str
    deadline: float  # the shell's clock


class SessionCore:
    """One session's state machine; see the module docstring."""

    def __init__(self, *, session_id: str, src_lang: str, tgt_langs: tuple[str, ...], sample_rate: int,
                 settings: Settings, next_index: int = 0, pending: tuple[PendingUtterance, ...] = (),
                 epoch: int | None = None) -> None:
        """``next_index``, ``pending`` and ``epoch`` continue a resumed session: utterances are
        numbered from ``next_index``, and ``pending`` (consecutive, ending at ``next_index - 1``)
        are finalized utterances still owed a result."""
        if pending and pending[-1].index != next_index - 1:
            raise ValueError(f"pending utterances must end at next_index - 1 = {next_index - 1}")  # pragma: no mutate
        self.session_id = session_id
        self.src_lang = src_lang
        self.tgt_langs = tuple(tgt_langs)
        self.sample_rate = sample_rate
        self.settings = settings
        self.epoch = epoch
        self.state = State.IDLE
        self.close_reason: str | None = None
        self.taken_over = False
        self.next_index = next_index
        self.results = ResultsSequencer(pending[0].index if pending else next_index)
        for utt in pending:
            self.results.add(utt.index, reason=utt.reason, turn_id=utt.turn_id, tgt_langs=self.tgt_langs,
                             deadline=utt.deadline)
        self._bytes_per_ms = sample_rate * audio.BYTES_PER_SAMPLE / 1000.0
        self._silence_ms2 = audio.silence_threshold(settings.silence_dbfs)
        self._budget = settings.max_pending_events
        self._busy_sent = False
        self._out: list[Effect] = []
        # the open utterance and its deadlines
        self._chunks: list[bytes] = []
        self._nbytes = 0
        self._has_speech = False
        self._trailing_silence_ms = 0.0
        self._pause_at = math.inf
        self._timeout_at = math.inf
        self._idle_at = math.inf
        self.outage_since: float | None = None  # Redis is out since then (set_outage)
        self._counted_until = -math.inf  # the end of the last outage counted out
        # turns
        self._turn_seq = 0
        self._turn_prefix = f"{session_id}:t" if not epoch or epoch <= 1 else f"{session_id}:e{epoch}t"
        self.turn_id = self._new_turn_id()
        self._turn_kept = False

    # ------------------------------------------------------------ the interface

    @property
    def ended(self) -> bool:
        return self.state is State.ENDED

    @property
    def closing(self) -> str | None:
        """The close reason once the session is closing (None while it takes audio)."""
        return self.close_reason

    @property
    def buffered_ms(self) -> float:
        return self._nbytes / self._bytes_per_ms

    def deadlines(self) -> dict[str, float]:
        """When each deadline comes due (``inf``: none)."""
        return {"pause": self._pause_at, "timeout": self._timeout_at, "idle": self._idle_at,
                "result": self.results.next_deadline(**self._held())}

    def set_outage(self, outage: StoreOutage) -> None:
        """What the shell's store says of its outage (see the module docstring); the same news
        again changes nothing. An outage that ended is counted once, even one that began and
        ended between two steps."""
        if outage.since is not None:
            if self.outage_since is None:
                self.outage_since = outage.since
            return
        self.outage_since = None
        if outage.last is None or outage.last[1] <= self._counted_until:
            return
        last, self._counted_until = outage.last, outage.last[1]
        hold = self.settings.result_deadline_ms / 1000
        self.results.postpone(lambda d: outage_postponement(d, last, hold))

    def _held(self) -> dict[str, float]:
        if self.outage_since is None:
            return {}
        return {"held_from": self.outage_since, "hold": self.settings.result_deadline_ms / 1000}

    def next_deadline(self) -> float:
        """When to call :meth:`handle` with :class:`Tick` if nothing else happens first."""
        if self.state is State.ENDED:
            return math.inf
        return min(self._pause_at, self._timeout_at, self._idle_at, self.results.next_deadline(**self._held()))

    def takes_input(self) -> bool:
        """Whether the shell may hand the core client input now: not while, for some target
        language, ``max_jobs_per_session`` translations are unanswered (waiting in a lane or
        running on a node). The session's own answers, or their result deadlines, free it; its
        input waits in its backlog meanwhile (fair share: one session's flood costs it alone)."""
        limit = self.settings.max_jobs_per_session
        if not limit or self.state is not State.IDLE and self.state is not State.OPEN:
            return True
        if self.results.open_count() < limit:  # (one language's unanswered count is at most this: asked per event)
            return True
        unanswered = collections.Counter(tgt for _, tgt in self.missing_answers())
        return all(n < limit for n in unanswered.values())

    def missing_answers(self) -> list[tuple[int, str]]:
        """(utterance index, target language) of every answer still awaited."""
        return [(index, tgt) for index in self.results.open_indexes() for tgt in self.results.pending_languages(index)]

    def start(self, now: float) -> list[Effect]:
        """The session starts (or resumes) at ``now``: results already past their deadline go out."""
        self._idle_at = now + self.settings.idle_timeout_ms / 1000
        return self.handle(Tick(), now)

    def handle(self, ev: object, now: float) -> list[Effect]:
        """Act on ``ev`` at ``now`` (on :class:`Tick`: on the deadlines due); return the effects, in order."""
        if self.state is State.ENDED:
            return []
        if isinstance(ev, TakenOverIn):
            self.taken_over = True
            self.state = State.ENDED
            return []
        match ev:
            case AudioIn() | FinalizeIn() | CloseIn():
                self._on_client(ev, now)
            case JobOutcome():
                self._on_outcome(ev)
            case JobWaiting(utterance_index=index, tgt_lang=tgt, error=error):
                self.results.set_fallback(index, tgt, error)
            case ShutdownIn():
                self._begin_close("shutdown", now)
            case Tick():
                self._expire(now)
            case _:
                raise TypeError(f"session core got an unknown event {ev!r}")
        if self.state is State.CLOSING and self.results.outstanding == 0:
            self._out.append(Send(SessionClosed(reason=self.close_reason, utterances=self.next_index)))
            self.state = State.ENDED
        out, self._out = self._out, []
        return out

    def end(self) -> list[Effect]:
        """The session is over, however it ended: drop the audio; cancel every unanswered job
        unless the session was taken over (its new owner wants those answers)."""
        self.state = State.ENDED
        self._reset_utterance()
        self._idle_at = math.inf
        if self.taken_over:
            return []
        unanswered = tuple(job_key_for(self.session_id, index, tgt) for index, tgt in self.missing_answers())
        return [Cancel(unanswered)] if unanswered else []

    # ------------------------------------------------------------ deadlines

    def _expire(self, now: float) -> None:
        """Act on every deadline due at ``now``, earliest first (each one acted on goes away)."""
        while self.next_deadline() <= now:
            kind = min(self.deadlines().items(), key=lambda kv: kv[1])[0]
            if kind in ("pause", "timeout"):
                if max(self._pause_at, self._timeout_at) <= now:
                    self._out.append(Count("duplicate_finalize_suppressed_total"))  # both causes due: one cut
                self._cut(kind, now)
            elif kind == "idle" and not self.takes_input():  # its client waits for the session, not the other way:
                self._idle_at = now + self.settings.idle_timeout_ms / 1000  # idle counts once its input is taken again
            elif kind == "idle":
                self._begin_close("idle_timeout", now)
            else:
                skipped = self.results.expire(now, **self._held())
                if skipped:
                    self._out.append(Count("result_gap_timeout_total", skipped))
                self._flush_results()

    # ------------------------------------------------------------ client events

    def _on_client(self, ev: AudioIn | FinalizeIn | CloseIn, now: float) -> None:
        if self.state is not State.CLOSING:
            self._idle_at = now + self.settings.idle_timeout_ms / 1000
        if isinstance(ev, CloseIn):
            self._begin_close(ev.reason, now)
        elif self.state is State.CLOSING:
            return  # after close_session nothing more is taken
        elif isinstance(ev, AudioIn):
            self._on_audio(ev, now)
        else:
            self._cut("is_final", now)

    def _on_audio(self, ev: AudioIn, now: float) -> None:
        pause_s = self.settings.pause_ms / 1000
        for pcm in ev.frames:
            if not pcm:
                continue
            if not self._chunks:
                self.state = State.OPEN
                self._timeout_at = now + self.settings.utterance_timeout_ms / 1000
            self._chunks.append(pcm)
            self._nbytes += len(pcm)
            if audio.is_silent(pcm, self._silence_ms2):
                self._trailing_silence_ms += len(pcm) / self._bytes_per_ms
            else:
                self._has_speech = True
                self._trailing_silence_ms = 0.0
            self._pause_at = now + pause_s
            if self.buffered_ms >= self.settings.max_utterance_ms:
                self._cut("max_duration", now)
            elif self._trailing_silence_ms >= self.settings.pause_ms:
                self._cut("pause", now)  # speech then enough silence: its end; silence only: discarded
        if ev.merged:
            self._on_pressure(ev.queued_behind, now)
        elif self._busy_sent and ev.queued_behind < self._budget / 2:
            self._busy_sent = False  # recovered: a new crossing gets a new busy
        if ev.is_final:
            self._cut("is_final", now)

    def _on_pressure(self, queued_behind: int, now: float) -> None:
        """The client got ``max_pending_events`` ahead and frames were merged."""
        early = queued_behind >= self._budget / 2 and self._cut("backlog", now)
        if not self._busy_sent:
            self._busy_sent = True
            self._out.append(Send(Busy(backlog=queued_behind + 1, action="early_finalize" if early else "merged")))

    def _begin_close(self, reason: str, now: float) -> None:
        if self.close_reason is not None:
            return
        self._cut("close", now)
        self._reset_utterance()
        self.close_reason = reason
        self.state = State.CLOSING
        self._idle_at = math.inf

    # ------------------------------------------------------------ cutting an utterance

    def _new_turn_id(self) -> str:
        self._turn_seq += 1
        return f"{self._turn_prefix}{self._turn_seq}"

    def _reset_utterance(self) -> None:
        self._chunks = []
        self._nbytes = 0
        self._has_speech = False
        self._trailing_silence_ms = 0.0
        self._pause_at = self._timeout_at = math.inf
        if self.state is State.OPEN:
            self.state = State.IDLE

    def _cut(self, reason: str, now: float) -> bool:
        """Cut the open utterance. Returns False (no index taken) when it is empty or silent."""
        if not self._has_speech:
            self._reset_utterance()  # all silence (or nothing): discarded, no message
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
        self._out.append(Send(UtteranceFinalized(utterance_index=index, reason=reason, turn_id=turn_id, audio_ms=audio_ms)))
        deadline = now + self.settings.result_deadline_ms / 1000
        self.results.add(index, reason=reason, turn_id=turn_id, tgt_langs=self.tgt_langs, deadline=deadline)
        for tgt in self.tgt_langs:
            self._out.append(Submit(JobRequest(
                job_key=job_key_for(self.session_id, index, tgt), session_id=self.session_id, utterance_index=index,
                src_lang=self.src_lang, tgt_lang=tgt, turn_id=turn_id, turn_action=turn_action,
                turn_jobs=len(self.tgt_langs), sample_rate=self.sample_rate, audio=pcm, deadline=deadline,
                epoch=self.epoch, finalize_reason=reason if tgt == self.tgt_langs[0] else "")))
        self._out.append(Finalized(index, reason, audio_ms, turn_id))
        return True

    # ------------------------------------------------------------ results

    def _on_outcome(self, outcome: JobOutcome) -> None:
        if not self.results.record(outcome.utterance_index, outcome.tgt_lang, outcome.translation, outcome.source_text):
            self._out.append(Count("stale_answers_dropped_total", label="LATE"))
            return
        self._flush_results()

    def _flush_results(self) -> None:
        self._out.extend(Send(result) for result in self.results.pop_ready())


def refused(request: JobRequest, error: str) -> JobOutcome:
    """What the shell feeds back when the scheduler refuses ``request`` at once (e.g. OVERLOADED)."""
    return JobOutcome(request.utterance_index, request.tgt_lang, Translation(status="FAILED", error=error))
