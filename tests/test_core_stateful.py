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

from scheduler.session.core import SessionCore

from . import session_rules
from .core_harness import CoreHarness
from .session_rules import RESUME, SessionRules, step_limit


class CoreMachine(SessionRules):
    core_class: type[SessionCore] = SessionCore

    @initialize(tgts=st.sampled_from([("en",), ("en", "de")]), outbox=st.sampled_from([6, 64]), resume=RESUME)
    def start(self, tgts, outbox, resume):
        with step_limit("start"):
            self.h = CoreHarness(core_class=self.core_class, tgt_langs=tgts, outbox_size=outbox, resume=resume)
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


class StaleTimeoutCore(SessionCore):
    """Deliberately broken: the next utterance inherits the timeout deadline of the one cut
    before it, so an old utterance's deadline takes effect (what generation checks used to prevent)."""

    _old_timeout = math.inf

    def _cut(self, reason, now):
        self._old_timeout = self._timeout_at
        return super()._cut(reason, now)

    def _on_audio(self, ev, now):
        opening = not self._chunks
        super()._on_audio(ev, now)
        if opening and self._chunks and not math.isinf(self._old_timeout):
            self._timeout_at, self._old_timeout = self._old_timeout, math.inf


def search_broken(core_class: type[SessionCore], *, max_examples: int = 2000, shrink: bool = True) -> None:
    """Run the machine on a deliberately broken core; the caller expects the failure.
    Derandomized: the same search every run, so the test's time is stable."""
    machine = type(f"{core_class.__name__}Machine", (CoreMachine,), {"core_class": core_class})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=max_examples, stateful_step_count=30, database=None, derandomize=True,
                          phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate], deadline=None,
                          print_blob=False, report_multiple_bugs=False),
    )


def test_hypothesis_finds_a_stale_deadline():
    with pytest.raises(AssertionError, match="timeout cut|pause cut|indexes|late|overdue"):
        search_broken(StaleTimeoutCore)


class DropsSpeechOnClose(SessionCore):
    """Deliberately broken: close_session drops the open utterance instead of cutting it."""

    def _begin_close(self, reason, now):
        if self.close_reason is None:
            self._reset_utterance()
        super()._begin_close(reason, now)


def test_hypothesis_finds_speech_dropped_on_close():
    with pytest.raises(AssertionError, match="sent before the close are in no utterance"):
        search_broken(DropsSpeechOnClose)


class SpinsOnTick(SessionCore):
    """Deliberately broken: a deadline that never goes away, so acting on it never ends."""

    def _expire(self, now):
        while self.next_deadline() <= now:
            pass


def test_a_livelock_fails_naming_its_step(monkeypatch):
    monkeypatch.setattr(session_rules, "STEP_LIMIT_S", 0.5)
    with pytest.raises(AssertionError, match=r"step '.*' took over .* a livelock\?"):
        search_broken(SpinsOnTick, max_examples=50, shrink=False)
