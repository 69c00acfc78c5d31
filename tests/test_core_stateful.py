"""Hypothesis stateful proof of the session's guarantees, on the sans-IO core itself.

What runs: the real :class:`~scheduler.session.core.SessionCore` with the real backlog and
results sequencer, driven step by step by ``core_harness.CoreHarness`` (no Trio, no thread:
time is a float the rules move). Every failure replays exactly and shrinks.

Why a faithful in-process scheduler port, not the Lua scripts: the guarantees are about the
session's own state (indexes, deadlines, ordering), and the port reproduces exactly what the
session can observe from the real dispatcher through the same ``JobPort`` interface:
idempotent job creation per ``job_key`` (a second create is blocked and counted), refusal
when the scheduler is overloaded, "waiting for a node" notes, answers (success, node error,
twice, late, never), and cancellation on exit. The Lua side has its own real-Valkey machine
(``test_lua_stateful.py``) and the end-to-end tests join the two over real sockets.

A run may start as a resumed session (utterances finalized by a previous owner and still
owed a result, with their deadlines) and may end by being taken over by another owner (whose
jobs must then not be cancelled).

Invariants after every step are :meth:`SessionModel.check` (indexes contiguous, no index
finalized twice, results in order and one per index, none later than its deadline, every
finalize reason justified, job audio exact, one job per key, bounded queues); at the end,
:meth:`CoreHarness.finish` closes the session and requires every result and
``session_closed`` (no permanent stall).

Profiles: ``ci`` (200 examples, the default under CI=true), ``dev`` (50), and ``stress``
(10,000; ``just stress``). The Trio shell has its own, smaller machine
(``test_actor_stateful.py``).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, run_state_machine_as_test

from scheduler.session.backlog import ClientBacklog, _Merging
from scheduler.session.core import SessionCore, State
from scheduler.session.events import AudioIn, CloseIn

from . import session_rules
from .core_harness import CoreHarness
from .session_rules import RESUME, SessionRules, step_limit


class CoreMachine(SessionRules):
    core_class: type[SessionCore] = SessionCore
    backlog_class: type[ClientBacklog] = ClientBacklog

    @initialize(tgts=st.sampled_from([("en",), ("en", "de")]), outbox=st.sampled_from([6, 64]), resume=RESUME)
    def start(self, tgts, outbox, resume):
        with step_limit("start"):
            self.h = CoreHarness(core_class=self.core_class, backlog_class=self.backlog_class, tgt_langs=tgts,
                                 outbox_size=outbox, resume=resume)
            self.h.settle()

    def teardown(self):
        if hasattr(self, "h"):
            with step_limit("finish"):
                self.h.finish()
            for name in self.h.coverage():
                event(name)  # what this example reached (--hypothesis-show-statistics)

    def do(self, fn, *args):
        fn(*args)
        self.h.settle()

    def advance_by(self, seconds):
        self.h.advance(seconds)

    def race(self, events, seconds):
        self.h.race_with(events, seconds)

    def verify(self):
        self.h.check()


TestCoreMachine = CoreMachine.TestCase
# 30 steps (a step is a rule: a flood is up to 40 frames, a slow talker up to 8 frames and gaps):
# with 10,000 examples in two processes this keeps `just stress` under 3 minutes on 2 cores
TestCoreMachine.settings = settings(stateful_step_count=30)


# ---------------------------------------------------------------- the machine can fail
#
# Each class below is one realistic bug, written as a small change to the real core or
# backlog. The machine must find each one; the test names the check that must fire.


class StaleTimeoutCore(SessionCore):
    """The next utterance inherits the timeout deadline of the one cut before it, so an old
    utterance's deadline takes effect (what generation checks used to prevent)."""

    _old_timeout = math.inf

    def _cut(self, reason, now):
        self._old_timeout = self._timeout_at
        return super()._cut(reason, now)

    def _on_audio(self, ev, now):
        opening = not self._chunks
        super()._on_audio(ev, now)
        if opening and self._chunks and not math.isinf(self._old_timeout):
            self._timeout_at, self._old_timeout = self._old_timeout, math.inf


class DropsSpeechOnClose(SessionCore):
    """close_session drops the open utterance instead of cutting it."""

    def _begin_close(self, reason, now):
        if self.close_reason is None:
            self._reset_utterance()
        super()._begin_close(reason, now)


class DropsSpeechOnShutdown(SessionCore):
    """The daemon's drain drops the open utterance (close_session still cuts it)."""

    def _begin_close(self, reason, now):
        if self.close_reason is None and reason == "shutdown":
            self._reset_utterance()
        super()._begin_close(reason, now)


class TakesAudioAfterClose(SessionCore):
    """Audio (and finalize) sent after close_session is still cut into utterances."""

    def _on_client(self, ev, now):
        if self.state is not State.CLOSING or isinstance(ev, CloseIn):
            return super()._on_client(ev, now)
        self.state = State.IDLE
        super()._on_client(ev, now)
        self.state = State.CLOSING


class LaterCloseCauseWins(SessionCore):
    """A second close cause (shutdown after close_session, say) overwrites the first."""

    def _begin_close(self, reason, now):
        if self.close_reason is not None:
            self.close_reason = reason
        super()._begin_close(reason, now)


class TimeoutFromLastFrame(SessionCore):
    """The utterance timeout is measured from the last frame instead of the utterance's start."""

    def _on_audio(self, ev, now):
        super()._on_audio(ev, now)
        if self._chunks:
            self._timeout_at = now + self.settings.utterance_timeout_ms / 1000


class BusyOncePerSession(SessionCore):
    """busy is sent once per session: the hysteresis never re-arms it."""

    def _on_audio(self, ev, now):
        sent = self._busy_sent
        super()._on_audio(ev, now)
        self._busy_sent = self._busy_sent or sent


class SecondAnswerWins(SessionCore):
    """A second answer for one job overwrites the first."""

    def _on_outcome(self, outcome):
        utt = self.results._open.get(outcome.utterance_index)
        if utt is not None:
            utt.translations.pop(outcome.tgt_lang, None)
        super()._on_outcome(outcome)


class MergesIntoFinal(ClientBacklog):
    """Merging ignores a queued is_final: later frames join the event before its cut."""

    def put_nowait(self, ev):
        tail = self._queue[-1] if self._queue else None
        if isinstance(ev, AudioIn) and len(self._queue) >= self.budget and isinstance(tail, _Merging) and tail.is_final:
            tail.is_final = False
            super().put_nowait(AudioIn(ev.frames, True))
        else:
            super().put_nowait(ev)


class MergesPastFinalize(ClientBacklog):
    """Merging looks past a queued finalize for the newest audio event, moving frames before it."""

    def put_nowait(self, ev):
        if isinstance(ev, AudioIn) and len(self._queue) >= self.budget:
            audio = [item for item in self._queue if isinstance(item, _Merging)]
            if audio and not audio[-1].is_final and not isinstance(self._queue[-1], _Merging):
                audio[-1].frames.extend(ev.frames)
                audio[-1].is_final = ev.is_final
                self._bytes += ev.nbytes
                self.merged_frames_total += len(ev.frames)
                return
        super().put_nowait(ev)


class MergeSwallowsIsFinal(ClientBacklog):
    """A merged frame's is_final is lost."""

    def put_nowait(self, ev):
        merging = isinstance(ev, AudioIn) and len(self._queue) >= self.budget and isinstance(self._queue[-1], _Merging)
        super().put_nowait(AudioIn(ev.frames, False) if merging and not self._queue[-1].is_final else ev)


def search_broken(core_class: type[SessionCore] = SessionCore, backlog_class: type[ClientBacklog] = ClientBacklog, *,
                  max_examples: int = 2000, shrink: bool = False) -> None:
    """Run the machine on a deliberately broken core or backlog; the caller expects the failure.
    Derandomized: the same search every run, so the test's time is stable (no shrinking: the
    first failure's message is what the test matches)."""
    machine = type(f"{core_class.__name__}{backlog_class.__name__}Machine", (CoreMachine,),
                   {"core_class": core_class, "backlog_class": backlog_class})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=max_examples, stateful_step_count=30, database=None, derandomize=True,
                          phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate], deadline=None,
                          print_blob=False, report_multiple_bugs=False),
    )


@pytest.mark.parametrize(("broken", "check"), [
    (StaleTimeoutCore, "timeout cut|pause cut|indexes|late|overdue|timeout missed"),
    (DropsSpeechOnClose, "sent before the close are in no utterance|taken before the"),
    (DropsSpeechOnShutdown, "taken before the shutdown are in no utterance"),
    (TakesAudioAfterClose, "sent after the close was taken"),
    (LaterCloseCauseWins, "overwritten by|session_closed says|sent before the close are in no utterance"),
    (TimeoutFromLastFrame, "timeout missed"),
    (BusyOncePerSession, "busy sent for"),
    (SecondAnswerWins, ": got Translation| source |counted as dropped"),
    (MergesIntoFinal, "runs across the finalize|was merged"),
    (MergesPastFinalize, "runs across the finalize|was merged"),
    (MergeSwallowsIsFinal, "runs across the finalize|was merged"),
], ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_the_machine_finds_a_broken_session(broken, check):
    kind = {"backlog_class" if issubclass(broken, ClientBacklog) else "core_class": broken}
    with pytest.raises(AssertionError, match=check):
        search_broken(**kind)


class SpinsOnTick(SessionCore):
    """Deliberately broken: a deadline that never goes away, so acting on it never ends."""

    def _expire(self, now):
        while self.next_deadline() <= now:
            pass


def test_a_livelock_fails_naming_its_step(monkeypatch):
    monkeypatch.setattr(session_rules, "STEP_LIMIT_S", 0.5)
    with pytest.raises(AssertionError, match=r"step '.*' took over .* a livelock\?"):
        search_broken(SpinsOnTick, max_examples=50)
