"""What a session must guarantee, checked from outside: shared by the core's and the actor's machines.

:class:`SessionModel` plays the client (frames, finalize, close), the nodes (answers,
"waiting" notes) and the scheduler (:class:`ScriptedPort`, a faithful in-process stand-in for
the dispatcher behind the same ``JobPort`` interface: see ``test_core_stateful.py`` for why
it, and not the Lua scripts, is used here), records what the session sent, and checks it.
Two subclasses run the session: ``core_harness.CoreHarness`` drives the sans-IO
:class:`~scheduler.session.core.SessionCore` directly with a plain float clock;
``actor_harness.ActorHarness`` runs the Trio :class:`~scheduler.session.actor.SessionActor`
under a MockClock.

Every audio frame carries a serial number in its first 8 samples (values 0-15, far below
the silence threshold), so each job's audio can be split back into the exact frames it was
built from. :meth:`ActorHarness.check` then verifies, from what the actor emitted and what it
submitted:

- indexes contiguous from the first one (0, or where a resumed session numbers on), each
  finalized once; one result per index, in order, owed results of a resume first;
- no result later than its deadline; a result matches its utterance (reason, turn) and the
  first answer given before the deadline (else SKIPPED, or FAILED when told "waiting");
- job audio is whole consecutive frames; between utterances only silent frames are skipped;
- each finalize reason is justified by what was sent and when;
- one job per (index, language) key, never two; bounded backlog, buffer and outbox;
- session_closed comes last, after every result.
"""

from __future__ import annotations

import bisect
import struct

import attrs
import numpy as np

from scheduler.jobs import JobOutcome, JobWaiting, StoreOutage
from scheduler.ops.config import Settings
from scheduler.ops.metrics import Metrics
from scheduler.protocol import Busy, Result, SessionClosed, Translation, UtteranceFinalized
from scheduler.session.actor import SlowClient
from scheduler.session.core import PendingUtterance, State
from scheduler.session.events import AudioIn, CloseIn, FinalizeIn, ShutdownIn, TakenOverIn

RATE = 16000
FRAME_MS = 100
FRAME_BYTES = RATE * 2 * FRAME_MS // 1000
EPS = 1e-6
_TONE = (np.sin(2 * np.pi * 440 * np.arange(FRAME_BYTES // 2) / RATE) * 9000).astype("<i2")


REASONS = {"pause", "timeout", "max_duration", "is_final", "backlog", "close"}  # utterance_finalized.reason (protocol)

_BODY = {True: _TONE.tobytes()[16:], False: bytes(FRAME_BYTES - 16)}


def make_frame(serial: int, speech: bool) -> bytes:
    """A 100 ms frame whose first 8 samples carry ``serial``, 4 bits each (inaudible)."""
    return struct.pack("<8h", *((serial >> (4 * (7 - i))) & 0xF for i in range(8))) + _BODY[speech]


def frame_serial(frame: bytes) -> int:
    serial = 0
    for nibble in struct.unpack("<8h", frame[:16]):
        serial = (serial << 4) | nibble
    return serial


@attrs.frozen
class _OwedJob:
    """A job the previous owner of a resumed session placed (only its identity matters here)."""

    utterance_index: int
    tgt_lang: str


class ScriptedPort:
    """In-process JobPort: records jobs (one per key; a second create is blocked and counted),
    can refuse submissions as ``OVERLOADED``, and records cancellations."""

    def __init__(self) -> None:
        self.jobs: dict[str, object] = {}
        self.order: list[str] = []
        self.duplicates = 0
        self.refused: dict[str, object] = {}  # refused as OVERLOADED: key -> request
        self.overloaded = False
        self.cancelled: list[str] = []
        self.out_since: float | None = None  # Redis out since then (the machine's outage)
        self.last_outage: tuple[float, float] | None = None

    def outage(self, now: float) -> StoreOutage:
        return StoreOutage(self.out_since, self.last_outage)

    def submit_nowait(self, request) -> str | None:
        if request.job_key in self.jobs or request.job_key in self.refused:
            self.duplicates += 1
            return None
        if self.overloaded:
            self.refused[request.job_key] = request
            return "OVERLOADED"
        self.jobs[request.job_key] = request
        self.order.append(request.job_key)
        return None

    async def cancel(self, session_id: str, job_keys: list[str]) -> None:
        assert job_keys, "a cancel of no job"
        self.cancelled.extend(job_keys)


@attrs.frozen
class Owed:
    """An utterance the actor is owed a result for since it started: a resumed session's
    finalized-but-unanswered one (``t_fin`` None), or one it finalized itself."""

    index: int
    t_fin: float | None
    due: float
    reason: str
    turn_id: str


@attrs.define
class Sent:
    serial: int
    speech: bool
    put_at: float


class SessionModel:
    """The client, the nodes and the checks; a subclass runs the session (see the module docstring)."""

    SETTINGS = dict(pause_ms=800, utterance_timeout_ms=3000, max_utterance_ms=2000, result_deadline_ms=5000,
                    idle_timeout_ms=10_000, max_pending_events=8)

    def __init__(self, *, tgt_langs=("en", "de"), outbox_size: int = 24, resume: tuple[int, list[float]] | str | None = None,
                 **overrides) -> None:
        """``resume=(first, offsets)``: start as a resumed session (epoch 2) owed results for
        utterances ``first, first + 1, ...`` (deadlines ``now + offset``), numbering on after
        them; ``"fresh"``: a new session with the resume journal on (epoch 1, as the daemon
        opens one); None: with the journal off (no epoch)."""
        self.settings = Settings(**{**self.SETTINGS, **overrides})
        self.tgt_langs = tuple(tgt_langs)
        self.outbox_size = outbox_size
        self.port = ScriptedPort()
        self.outages: list[list] = []  # [start, end or None]: Redis out, as the port told the session
        self.metrics = Metrics()
        epoch = 2 if isinstance(resume, tuple) else 1 if resume == "fresh" else None
        first, offsets = resume if isinstance(resume, tuple) else (0, [])
        now = self.now()
        self.owed = [Owed(first + i, None, now + off, "pause", f"old:t{i}") for i, off in enumerate(offsets)]
        self.first_index, self.base_index = first, first + len(offsets)
        self.owed_keys = {f"S:{o.index}:translate:{t}": (o.index, t) for o in self.owed for t in tgt_langs}
        self.session_args = dict(session_id="S", src_lang="zh", tgt_langs=self.tgt_langs, sample_rate=RATE,
                                 settings=self.settings, next_index=self.base_index, epoch=epoch,
                                 pending=tuple(PendingUtterance(o.index, o.reason, o.turn_id, o.due) for o in self.owed))
        self.emitted: list[tuple[float, object]] = []
        self.sent: dict[int, Sent] = {}
        self.next_serial = 1
        self.finalize_events = 0  # finalize messages and is_final frames put
        self.close_put = False
        self.answers: dict[str, tuple[float, Translation]] = {}  # first answer per job key
        self.answer_order: list[str] = []  # job keys in the order of their first answer
        self.repeated_answers = 0  # second answers delivered to a live session
        self.waiting: dict[str, list[tuple[float, str | None]]] = {}  # job key -> (time, error) notes
        self.client_reading = True
        self.ended: object = None  # close reason, SlowClient, or "disconnected"
        self._audio_checked = 0  # finalized utterances whose audio check passed
        self._results_checked = 0  # results whose check passed
        self._utts = list(self.owed)  # every utterance owed a result so far, in index order
        self._covered: set[int] = set()  # serials of the frames in a finalized utterance
        self._audio_last_serial = 0  # the last frame of the last of them
        # close: the first cause asked for, the one the session took, and the last frame sent before it
        self.close_asked: str | None = None
        self.close_taken: str | None = None
        self.close_after: int | None = None
        self.cuts: list[int] = []  # per finalize / is_final sent: the serial of the frame it cuts after
        self.taken_at: dict[int, float] = {}  # frame serial -> when the session took it
        self.taken_open: set[int] = set()  # serials of the speech frames taken while the session was open
        self.busy_owed = 0  # busy messages the hysteresis calls for, from the audio events taken
        self.busy_backlog: list[int] = []  # the backlog each of them reports
        self.early_allowed = 0  # merged events taken with half the budget or more behind them
        self._take_marks: list[int] = []  # len(emitted) as each client event was taken
        self._last_speech = 0  # the last speech frame taken while open (0: none)
        self._silence_after = 0  # silent frames taken after it
        self._busy_episode = False
        self.merged_taken = 0  # frames that arrived merged into another frame's event
        self._turn = 1  # the number of the turn the next utterance belongs to (protocol: t1, t2, ...)
        self._last_client_at = self.now()  # when the session last took a client event (idle deadline)
        self._last_frame_at = self.now()  # when it last took an audio frame (pause deadline)
        self.both_due = 0  # cuts at which the pause and the timeout deadline were both due
        self._idle_checked = False
        self._held_now, self._held_ended = False, float("-inf")  # its input held (max_jobs_per_session), and when that ended
        self._closed_at: float | None = None  # when the session was first seen closing
        self._turn_kept = False  # the last utterance was cut at max_duration: its turn goes on
        self._tail_open_audio = False  # the newest queued event is audio that is not final (merging target)

    # ------------------------------------------------------------ what a subclass provides

    def now(self) -> float:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    @property
    def held(self) -> bool:
        raise NotImplementedError

    def _deliver(self, item: object) -> None:
        """Hand an inbox item (answer, note, shutdown, take-over) to the session."""
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError

    backlog: object  # the session's ClientBacklog
    closing: str | None
    state: State  # the core's state
    buffered_ms: float
    outbox_fill: tuple[int, int]  # (used, capacity)

    def deadlines(self) -> dict[str, float]:
        raise NotImplementedError

    def watch(self, backlog) -> None:
        """Record what the session takes from ``backlog``: when each frame was taken, and the
        busy episodes (protocol.md "Backpressure": a merged event starts one, an unmerged event
        with less than half the budget queued behind it ends it), for the checks."""
        take = backlog.take

        def watched():
            ev = take()
            if isinstance(ev, CloseIn) and self.closing is None and self.close_asked is None:
                # the client's close counts from when the session takes it (held input waits:
                # a shutdown delivered meanwhile comes first), over the frames sent before it
                self.close_asked, self.close_after = "client_close", self._close_put_after
            if ev is not None:
                self._take_marks.append(len(self.emitted))
            if ev is not None and self.closing is None:
                self._last_client_at = self.now()
            if isinstance(ev, AudioIn):
                now = self.now()
                if self.closing is None and any(ev.frames):
                    self._last_frame_at = now
                    for pcm in filter(None, ev.frames):  # speech, then how much silence after it
                        serial = frame_serial(pcm)
                        if self.sent[serial].speech:
                            self._last_speech, self._silence_after = serial, 0
                        else:
                            self._silence_after += 1
                for pcm in filter(None, ev.frames):  # (an empty frame carries nothing)
                    self.taken_at[frame_serial(pcm)] = now
                    if self.closing is None and self.sent[frame_serial(pcm)].speech:
                        self.taken_open.add(frame_serial(pcm))
                self.merged_taken += len(ev.frames) - 1
                behind = len(backlog)
                assert ev.queued_behind == behind, f"told {ev.queued_behind} events queued behind, {behind} are"
                if self.closing is None:
                    self.early_allowed += bool(ev.merged) and behind >= backlog.budget / 2
                    if ev.merged and not self._busy_episode:
                        self._busy_episode, self.busy_owed = True, self.busy_owed + 1
                        self.busy_backlog.append(behind + 1)  # busy.backlog: this event and those behind it
                    elif not ev.merged and behind < backlog.budget / 2:
                        self._busy_episode = False
            return ev

        backlog.take = watched

    def settled(self) -> None:
        """The harness calls this whenever the session has taken everything due (time stops at
        every deadline on the way): the time the close was taken is noted here."""
        if self.closing is not None and self._closed_at is None:
            self._closed_at = self.now()
        if self.alive and self.held:
            self._held_now = True
        elif self._held_now:
            self._held_now, self._held_ended = False, self.now()

    def _ask_close(self, reason: str) -> None:
        """The client or the daemon asks for the end: the first cause asked while open is the one to win."""
        if self.closing is None and self.close_asked is None:
            self.close_asked = reason
            self.close_after = self.next_serial - 1

    # ------------------------------------------------------------ client side

    def queued_bytes(self) -> int:
        """Audio the client sent that the session has not taken yet."""
        return FRAME_BYTES * (len(self.sent) - len(self.taken_at))

    def can_put(self) -> bool:
        """The client can send while the backlog is under its memory bound (2 x budget events
        and max_bytes of audio: protocol.md "Backpressure"); past it, its socket blocks."""
        full = len(self.backlog) >= 2 * self.settings.max_pending_events or self.queued_bytes() >= self.backlog.max_bytes
        assert self.backlog._full() == full, f"backlog full={self.backlog._full()} with {len(self.backlog)} events, {self.queued_bytes()} bytes"
        return self.alive and not full

    def _put(self, ev) -> None:
        """Queue one client event; past the budget, audio joins the newest queued audio event
        unless that is final (or a finalize or close came after it): merged, never dropped."""
        if not len(self.backlog):
            self._tail_open_audio = False
        before, takes = len(self.backlog), len(self._take_marks)
        self.backlog.put_nowait(ev)
        queued = len(self.backlog) + len(self._take_marks) - takes  # (the actor may take it at once: actor.py)
        if isinstance(ev, AudioIn) and before >= self.settings.max_pending_events and self._tail_open_audio:
            assert queued == before, "a frame past the budget was queued on its own instead of merged"
        else:
            assert queued == before + 1, "an event under the budget (or after a final one) was merged"
        self._tail_open_audio = isinstance(ev, AudioIn) and not ev.is_final

    def put_frames(self, kinds: list[bool], is_final: bool = False) -> None:
        """Queue frames (True = speech) as separate events, unless the client would be blocked."""
        for n, speech in enumerate(kinds):
            if not self.can_put():
                return  # the client's socket would block here: this frame is never sent
            serial = self.next_serial
            self.next_serial += 1
            self.sent[serial] = Sent(serial, speech, self.now())
            final = is_final and n == len(kinds) - 1
            self.finalize_events += final
            if final:
                self.cuts.append(serial)
            self._put(AudioIn.of(make_frame(serial, speech), final))

    def put_finalize(self) -> None:
        if self.can_put():
            self.finalize_events += 1
            self.cuts.append(self.next_serial - 1)
            self._put(FinalizeIn())

    def put_close(self) -> None:
        if self.can_put():
            if not self.close_put:  # (asked when the session takes the first one: watch())
                self._close_put_after = self.next_serial - 1
            self.close_put = True
            self._put(CloseIn())

    def shutdown(self) -> None:
        if self.alive:
            self._ask_close("shutdown")
            self.close_put = True
            self._deliver(ShutdownIn())

    def take_over(self) -> None:
        """The session was resumed elsewhere."""
        self._deliver(TakenOverIn())

    def redis_out(self) -> None:
        """Redis goes out now (the session learns it at its next step, as from the adapter)."""
        if self.port.out_since is None:
            self.port.out_since = self.now()
            self.outages.append([self.now(), None])

    def redis_back(self) -> None:
        """Redis is back now; the session is woken (the daemon wakes every session)."""
        if self.port.out_since is not None:
            self.port.last_outage, self.port.out_since = (self.port.out_since, self.now()), None
            self.outages[-1][1] = self.now()
            self.wake()

    def wake(self) -> None:
        raise NotImplementedError

    def occupy(self) -> None:
        """Give the session something to take before client input (an inbox item), so that
        the input that comes next queues in the backlog."""
        raise NotImplementedError

    def due(self, utt: Owed) -> float:
        """When ``utt``'s result is due: its deadline, held while Redis is out (at most one more
        deadline) and later by the outage time it overlapped (at most one deadline), as
        ``SessionCore.set_outage`` says."""
        hold, d = self.settings.result_deadline_ms / 1000, utt.due
        for start, end in self.outages:
            if d <= start:
                continue
            if end is None:
                return d + hold
            d += min(max(0.0, end - max(start, d - hold)), hold)
        return d

    def put_events(self, events: list[str]) -> None:
        """Queue a mixed sequence: "speech", "silence", "speech_final", "finalize", "empty" (a
        binary frame of no bytes, which the daemon accepts and ignores), "occupy" (:meth:`occupy`)."""
        for ev in events:
            if ev == "occupy":
                self.occupy()
            elif ev == "finalize":
                self.put_finalize()
            elif ev == "empty":
                if self.can_put():
                    self._put(AudioIn.of(b""))
            else:
                self.put_frames([ev != "silence"], is_final=ev == "speech_final")

    # ------------------------------------------------------------ node side

    def unanswered_keys(self) -> list[str]:
        return [k for k in [*self.owed_keys, *self.port.order] if k not in self.answers]

    def _job(self, job_key: str):
        if job_key in self.owed_keys:  # placed by the previous owner
            index, tgt = self.owed_keys[job_key]
            return _OwedJob(index, tgt)
        return self.port.jobs[job_key]

    def answer(self, job_key: str, ok: bool) -> None:
        request = self._job(job_key)
        text = f"{job_key}:{'ok' if ok else 'err'}"
        translation = (Translation(status="SUCCESS", text=text, node_id="n1") if ok
                       else Translation(status="FAILED", node_id="n1", error="NODE_ERROR"))
        if self.alive:  # an answer after the session ended is simply refused by its closed inbox
            if job_key in self.answers:
                self.repeated_answers += 1  # dropped and counted as LATE
            else:
                self.answer_order.append(job_key)
            self.answers.setdefault(job_key, (self.now(), translation))
        self._deliver(JobOutcome(request.utterance_index, request.tgt_lang, translation, f"src:{job_key}"))

    def tell_waiting(self, job_key: str, error: str | None) -> None:
        request = self._job(job_key)
        self.waiting.setdefault(job_key, []).append((self.now(), error))
        self._deliver(JobWaiting(request.utterance_index, request.tgt_lang, error))

    # ------------------------------------------------------------ the guarantees

    def messages(self, kind: type) -> list[tuple[float, object]]:
        return [(t, m) for t, m in self.emitted if isinstance(m, kind)]

    def check(self) -> None:
        s = self.settings
        # close: the first cause wins and never changes (the client's close_session, the
        # daemon's shutdown, or else the idle deadline)
        if self.closing is not None and self.close_taken is None:
            self.close_taken = self.closing
            if self.close_after is None:  # idle: every frame sent so far was taken before it
                self.close_after = self.next_serial - 1
            first = self.close_asked or "idle_timeout"
            assert self.closing == first, f"closed for {self.closing!r}, but the first cause was {first!r}"
        assert self.closing in (None, self.close_taken), f"close reason {self.close_taken!r} overwritten by {self.closing!r}"
        # the state, as the core's states table names it
        if self.alive:
            expected = State.CLOSING if self.closing is not None else State.OPEN if self.buffered_ms > 0 else State.IDLE
            assert self.state is expected, f"state {self.state}, expected {expected}"
        if not self.alive:
            assert self.state is State.ENDED, f"state {self.state} after the session ended"
        # liveness of the pause and idle deadlines: an open utterance is cut (or, if silent,
        # dropped) pause_ms after its last frame; a session with no client event for
        # idle_timeout_ms is closed, and never before
        if self.alive and self.closing is None:
            quiet = self.now() - self._last_frame_at
            assert not self.buffered_ms or quiet < s.pause_ms / 1000 + EPS, f"utterance still open {quiet * 1000:.0f} ms after its last frame"
            idle = self.now() - max(self._last_client_at, self._held_ended)  # (held: its idle deadline waits)
            assert self._held_now or idle < s.idle_timeout_ms / 1000 + EPS, (
                f"no client event for {idle:.2f} s and the session is still open")
        if self.close_taken == "idle_timeout" and not self._idle_checked and self._closed_at is not None:
            self._idle_checked = True
            idle = self._closed_at - self._last_client_at
            assert idle >= s.idle_timeout_ms / 1000 - EPS, f"closed for idle after {idle:.2f} s without a client event"
        finalized = self.messages(UtteranceFinalized)
        results = self.messages(Result)
        base, first = self.base_index, self.first_index
        assert [m.utterance_index for _, m in finalized] == list(range(base, base + len(finalized))), "indexes not contiguous"
        assert [m.utterance_index for _, m in results] == list(range(first, first + len(results))), "results not in order"
        tgts = self.tgt_langs
        deadline_s = s.result_deadline_ms / 1000
        self._utts.extend(Owed(m.utterance_index, t, t + deadline_s, m.reason, m.turn_id)
                          for t, m in finalized[len(self._utts) - len(self.owed):])
        utts = self._utts
        assert len(results) <= len(utts)

        # jobs: exactly one per (finalized index, language) key, never two
        assert self.port.duplicates == 0, "a job was created twice for one key"
        expected = {f"S:{m.utterance_index}:translate:{t}" for _, m in finalized for t in tgts}
        assert set(self.port.order) | set(self.port.refused) == expected

        # results: timing, identity, content (a result that passed stays right: what it is
        # checked against, answers and notes given before its deadline, cannot change later)
        done = self._results_checked
        for utt, (t_res, res) in zip(utts[done:], results[done:], strict=False):
            due = self.due(utt)
            assert t_res <= due + EPS, f"result {res.utterance_index} late by {t_res - due:.3f}s"
            skipped = any(t.status == "SKIPPED" for t in res.translations.values())
            assert not skipped or t_res >= due - EPS, f"result {res.utterance_index} SKIPPED {due - t_res:.3f}s early"
            assert (res.reason, res.turn_id) == (utt.reason, utt.turn_id)
            assert list(res.translations) == list(tgts)
            status = next((t.status for t in res.translations.values() if t.status != "SUCCESS"), "SUCCESS")
            assert res.status == status, f"result {res.utterance_index} status {res.status}, translations say {status}"
            keys = [f"S:{res.utterance_index}:translate:{t}" for t in tgts]
            sources = [self._source(keys, due - EPS), self._source(keys, due + EPS)]
            assert res.source_text in sources, f"result {res.utterance_index} source {res.source_text!r}, expected one of {sources}"
            for tgt, tr in res.translations.items():
                key = f"S:{res.utterance_index}:translate:{tgt}"
                # an event at the deadline instant may land on either side of it (float rounding)
                allowed = [self._expected(key, due - EPS), self._expected(key, due + EPS)]
                assert any(ok(tr) for ok in allowed), f"{key}: got {tr}"
        self._results_checked = len(results)
        # the next result is never overdue while the session lives (no permanent stall)
        if len(results) < len(utts) and self.alive:
            assert self.now() < self.due(utts[len(results)]) + EPS, "result overdue: the session is stuck"

        # audio: whole consecutive frames, only silence skipped between utterances (a finalized
        # utterance never changes, so each is checked once)
        previous_last = self._audio_last_serial
        for t_fin, fin in finalized[self._audio_checked:]:
            key0 = f"S:{fin.utterance_index}:translate:{tgts[0]}"
            pcm = (self.port.jobs.get(key0) or self.port.refused[key0]).audio
            assert len(pcm) % FRAME_BYTES == 0
            serials = [frame_serial(pcm[i:i + FRAME_BYTES]) for i in range(0, len(pcm), FRAME_BYTES)]
            assert serials == list(range(serials[0], serials[0] + len(serials))), "frames lost, repeated or reordered"
            assert all(pcm == self.port.jobs[k].audio for t in tgts if (k := f"S:{fin.utterance_index}:translate:{t}") in self.port.jobs)
            skipped = range(previous_last + 1, serials[0])
            assert all(not self.sent[n].speech for n in skipped), "speech dropped between utterances"
            previous_last = serials[-1]
            self._covered.update(serials)
            assert fin.audio_ms == len(serials) * FRAME_MS
            self._check_cuts(t_fin, fin, serials)
            self._check_reason(t_fin, fin, [self.sent[n] for n in serials])
            self._check_jobs(t_fin, fin)
            self._audio_checked, self._audio_last_serial = self._audio_checked + 1, previous_last

        # speech followed by pause_ms of silence is cut there (pause liveness by content)
        if self.alive and self.closing is None and self._last_speech and self._last_speech not in self._covered:
            assert self._silence_after * FRAME_MS < s.pause_ms, (
                f"speech frame {self._last_speech} followed by {self._silence_after * FRAME_MS} ms of silence, not cut")

        # the Finalized effect (logs, finalize_total) says what utterance_finalized says
        for reason in REASONS:
            counted = self.metrics.finalize_total.labels(reason)._value.get()
            assert counted == sum(m.reason == reason for _, m in finalized), f"finalize_total{{{reason}}} = {counted}"
        effects = getattr(self, "finalized_effects", None)
        if effects is not None:
            assert [(e.index, e.reason, e.audio_ms, e.turn_id) for e in effects] == [
                (m.utterance_index, m.reason, m.audio_ms, m.turn_id) for _, m in finalized[:len(effects)]], "Finalized effects differ"

        # counts of reasons that need a client event
        reasons = [m.reason for _, m in finalized]
        assert reasons.count("is_final") <= self.finalize_events
        assert reasons.count("close") <= 1 and ("close" not in reasons or self.close_put)
        if "backlog" in reasons:
            assert self.backlog.merged_frames_total > 0
        dropped = self.metrics.stale_answers_dropped_total.labels("LATE")._value.get()
        assert dropped >= self.repeated_answers, f"{self.repeated_answers} repeated answers, {dropped} counted as dropped"
        counted = self.metrics.duplicate_finalize_suppressed_total._value.get()
        assert counted == self.both_due, f"{counted} cuts counted as pause and timeout due at once, {self.both_due} were"
        busies = self.messages(Busy)
        for _, busy in busies:
            assert busy.action in ("merged", "early_finalize")
        assert [b.backlog for _, b in busies] == self.busy_backlog[:len(busies)], "busy.backlog is not the events queued"
        # early finalize: a backlog cut only at a merged event with half the budget behind it,
        # and busy says early_finalize exactly when it follows such a cut
        assert reasons.count("backlog") <= self.early_allowed, "a backlog cut without the backlog for it"
        marks = [*self._take_marks, len(self.emitted)]
        for start, end in zip(marks, marks[1:], strict=False):  # what each taken event made the session send
            sent = [m for _, m in self.emitted[start:end]]
            for busy in (m for m in sent if isinstance(m, Busy)):
                cut = any(isinstance(m, UtteranceFinalized) and m.reason == "backlog" for m in sent)
                assert (busy.action == "early_finalize") == cut, f"busy {busy.action} with {sent}"
        # busy once per episode: the session sent as many as the episodes it took (fewer only
        # if it ended on a full outbox)
        assert len(busies) == self.busy_owed or (not self.alive and len(busies) < self.busy_owed), (
            f"{len(busies)} busy sent for {self.busy_owed} backpressure episodes")

        # the backlog: drained after every step while the session lives (it was woken) unless
        # it holds max_jobs_per_session unanswered translations of a language (then its own
        # answers or deadlines free it: no stall, checked at the end), its byte count and
        # merge count exact
        assert not self.alive or not len(self.backlog) or self.held, f"{len(self.backlog)} client events left untaken"
        assert self.backlog.nbytes == self.queued_bytes(), f"backlog counts {self.backlog.nbytes} bytes, holds {self.queued_bytes()}"
        if not len(self.backlog):
            assert self.backlog.merged_frames_total == self.merged_taken, "merged frames miscounted"

        # bounds
        assert len(self.backlog) <= 2 * s.max_pending_events
        assert self.backlog.nbytes <= self.backlog.max_bytes + FRAME_BYTES
        assert self.buffered_ms < s.max_utterance_ms + EPS
        assert self.outbox_fill[0] <= self.outbox_fill[1]

        # close
        closed = self.messages(SessionClosed)
        assert len(closed) <= 1
        if closed:
            assert self.emitted[-1][1] is closed[0][1], "session_closed is not the last message"
            assert closed[0][1].reason == self.close_taken, f"session_closed says {closed[0][1].reason!r}, the session took {self.close_taken!r}"
            assert closed[0][1].utterances == base + len(finalized), f"session_closed counts {closed[0][1].utterances} utterances"
            assert len(results) == len(utts), "session_closed before every result"

    def _check_jobs(self, t_fin: float, fin: UtteranceFinalized) -> None:
        """The utterance's turn (protocol: ``{session_id}:t{n}``, ``:e{epoch}t{n}`` after a
        resume; a max_duration cut keeps its turn) and every field of its jobs."""
        prefix = "S:e2t" if (self.session_args["epoch"] or 0) > 1 else "S:t"
        assert fin.turn_id == f"{prefix}{self._turn}", f"utterance #{fin.utterance_index} in turn {fin.turn_id}, expected {prefix}{self._turn}"
        action = "keep" if fin.reason == "max_duration" else "end" if self._turn_kept else "none"
        self._turn_kept = fin.reason == "max_duration"
        self._turn += not self._turn_kept
        deadline = t_fin + self.settings.result_deadline_ms / 1000
        for tgt in self.tgt_langs:
            key = f"S:{fin.utterance_index}:translate:{tgt}"
            req = self.port.jobs.get(key) or self.port.refused[key]
            assert (req.job_key, req.session_id, req.utterance_index, req.src_lang, req.tgt_lang, req.turn_id, req.turn_action,
                    req.turn_jobs, req.sample_rate, req.epoch) == (
                key, "S", fin.utterance_index, "zh", tgt, fin.turn_id, action, len(self.tgt_langs), RATE,
                self.session_args["epoch"]), f"job {key}: {req}"
            assert abs(req.deadline - deadline) < EPS, f"job {key} deadline {req.deadline}, expected {deadline}"

    def _check_cuts(self, t_fin: float, fin: UtteranceFinalized, serials: list[int]) -> None:
        """Where one finalized utterance starts and ends: after every frame it holds was sent
        and before the close was taken; never across a finalize or is_final (so merging moved
        no frame across one, and swallowed none); and cut no later than utterance_timeout_ms
        after its first frame was taken (timeout liveness)."""
        first, last = serials[0], serials[-1]
        if self.close_after is not None:
            assert last <= self.close_after, f"utterance #{fin.utterance_index} holds frame {last}, sent after the close was taken"
        i = bisect.bisect_left(self.cuts, first)
        assert i == len(self.cuts) or self.cuts[i] >= last, (
            f"utterance #{fin.utterance_index} (frames {first}-{last}) runs across the finalize after frame {self.cuts[i]}")
        assert fin.reason in REASONS, f"utterance #{fin.utterance_index} cut for {fin.reason!r}"
        if fin.reason in ("pause", "timeout"):  # the pause and the timeout deadline due at one tick: one cut, counted
            pause_at = self.taken_at[last] + self.settings.pause_ms / 1000
            timeout_at = self.taken_at[first] + self.settings.utterance_timeout_ms / 1000
            self.both_due += max(pause_at, timeout_at) <= t_fin
        age = t_fin - self.taken_at[first]
        assert age <= self.settings.utterance_timeout_ms / 1000 + EPS, (
            f"utterance #{fin.utterance_index} cut {age * 1000:.0f} ms after its first frame was taken (timeout missed)")

    def _expected(self, key: str, cutoff: float):
        """A predicate for the translation ``key`` must have if the deadline fell at ``cutoff``."""
        if key in self.port.refused:
            return lambda tr: tr == Translation(status="FAILED", error="OVERLOADED")
        answered = self.answers.get(key)
        if answered is not None and answered[0] < cutoff:
            return lambda tr: tr == answered[1]
        notes = [e for t, e in self.waiting.get(key, []) if t < cutoff]
        if notes and notes[-1]:
            return lambda tr: tr.status == "FAILED" and tr.error == notes[-1]
        return lambda tr: tr == Translation(status="SKIPPED", error="RESULT_DEADLINE")

    def _source(self, keys: list[str], cutoff: float) -> str | None:
        """A result's source_text: that of the first SUCCESS answer accepted before ``cutoff``."""
        first = next((k for k in self.answer_order if k in keys and self.answers[k][0] < cutoff
                      and self.answers[k][1].status == "SUCCESS"), None)
        return None if first is None else f"src:{first}"

    def coverage(self) -> list[str]:
        """Names of the interesting things this run reached, for Hypothesis statistics."""
        seen = {f"finalize:{m.reason}" for _, m in self.messages(UtteranceFinalized)}
        seen |= {f"busy:{m.action}" for _, m in self.messages(Busy)}
        seen |= {f"translation:{t.status}" for _, m in self.messages(Result) for t in m.translations.values()}
        seen.add(f"ended:{type(self.ended).__name__ if isinstance(self.ended, SlowClient) else self.ended}")
        if self.metrics.duplicate_finalize_suppressed_total._value.get():
            seen.add("pause_and_timeout_due_at_one_tick")
        return sorted(seen)

    def _check_reason(self, t_fin: float, fin: UtteranceFinalized, frames: list[Sent]) -> None:
        s = self.settings
        if fin.reason == "pause":
            trailing = 0
            for f in reversed(frames):
                if f.speech:
                    break
                trailing += FRAME_MS
            quiet_for = (t_fin - frames[-1].put_at) * 1000
            assert quiet_for >= s.pause_ms - 1e-3 or trailing >= s.pause_ms, (
                f"pause cut of #{fin.utterance_index} after {quiet_for:.0f} ms without audio and {trailing} ms silence")
        elif fin.reason == "timeout":
            age = (t_fin - frames[0].put_at) * 1000
            assert age >= s.utterance_timeout_ms - 1e-3, f"timeout cut of #{fin.utterance_index} at age {age:.0f} ms"
        elif fin.reason == "max_duration":
            assert fin.audio_ms >= s.max_utterance_ms > fin.audio_ms - FRAME_MS, "max_duration not cut at the first frame reaching it"
        assert any(f.speech for f in frames), "a silent utterance took an index"

    def check_end(self) -> None:
        """After :meth:`finish` ran the session out: it ended properly and cancelled what it should."""
        if not isinstance(self.ended, SlowClient) and self.ended not in ("disconnected", "taken_over"):
            assert not self.alive, "session did not end after close + result deadline"
            assert self.messages(SessionClosed), "no session_closed"
        self.check()
        if self.ended == "disconnected":
            released = {m.utterance_index for _, m in self.messages(Result)}
            owed = [o.index for o in self.owed] + [m.utterance_index for _, m in self.messages(UtteranceFinalized)]
            unanswered = {f"S:{i}:translate:{t}" for i in owed for t in self.tgt_langs if i not in released}
            unanswered -= set(self.answers) | set(self.port.refused)
            assert set(self.port.cancelled) == unanswered, "unanswered jobs not cancelled on exit"
        if self.ended == "taken_over":
            assert not self.port.cancelled, "jobs cancelled though the new owner wants their answers"
        if not self.alive and self.messages(SessionClosed):  # every result out: each SKIPPED one counted once
            skipped = sum(t.status == "SKIPPED" for _, r in self.messages(Result) for t in r.translations.values())
            assert self.metrics.result_gap_timeout_total._value.get() == skipped, "result_gap_timeout_total miscounted"
        # completeness: a session closed by its client took every frame sent before the close,
        # so every speech frame among them is in exactly one utterance
        last = self.close_after if self.ended == "client_close" else None
        if last is not None:
            dropped = [n for n, f in self.sent.items() if f.speech and n <= last and n not in self._covered]
            assert not dropped, f"speech frames {dropped[:5]} sent before the close are in no utterance"
        # a drain (shutdown) or an idle close finalizes the open utterance: every speech frame
        # the session took before it closed is in an utterance, whose results went out before
        # session_closed (checked above: no session_closed before every result)
        if self.ended in ("shutdown", "idle_timeout", "client_close"):
            dropped = sorted(self.taken_open - self._covered)
            assert not dropped, f"speech frames {dropped[:5]} taken before the {self.ended} are in no utterance"
