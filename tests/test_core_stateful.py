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
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from scheduler.session.core import SessionCore

from .core_harness import CoreHarness

DURATIONS = st.sampled_from([0.01, 0.1, 0.3, 0.79, 0.8, 0.81, 1.0, 2.0, 2.99, 3.0, 3.2, 4.99, 5.0, 5.2, 8.0, 11.0])
# up to 6 frames, speech (True) or silence, as one draw: the low bits of a number, after a 1
FRAMES = st.integers(min_value=2, max_value=127).map(lambda n: [bit == "1" for bit in bin(n)[3:]])
RESUME = st.none() | st.tuples(st.integers(0, 5), st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 5.0]), max_size=3).map(sorted))


class CoreMachine(RuleBasedStateMachine):
    core_class: type[SessionCore] = SessionCore

    @initialize(tgts=st.sampled_from([("en",), ("en", "de")]), outbox=st.sampled_from([6, 64]), resume=RESUME)
    def start(self, tgts, outbox, resume):
        self.h = CoreHarness(core_class=self.core_class, tgt_langs=tgts, outbox_size=outbox, resume=resume)
        self.h.settle()

    def teardown(self):
        if hasattr(self, "h"):
            self.h.finish()
            for name in self.h.coverage():
                event(name)  # what this example reached (--hypothesis-show-statistics)

    def _do(self, fn, *args):
        fn(*args)
        self.h.settle()

    steps = 0

    # ------------------------------------------------------------ client
    @rule(kinds=FRAMES)
    def audio(self, kinds):
        self._do(self.h.put_frames, kinds)

    @rule(kinds=FRAMES)
    def audio_is_final(self, kinds):
        self._do(self.h.put_frames, kinds, True)

    @rule()
    def finalize(self):
        self._do(self.h.put_finalize)

    @rule(n=st.integers(min_value=9, max_value=40), then_finalize=st.integers(min_value=0, max_value=8))
    def flood(self, n, then_finalize):
        """Faster than the session takes them: merging, busy, early backlog finalize."""
        self.h.put_frames([True] * n)
        for _ in range(then_finalize):
            self.h.put_finalize()
        self.h.settle()

    @rule(frames=st.integers(min_value=1, max_value=8), gap=st.sampled_from([0.3, 0.5, 0.7]))
    def slow_talker(self, frames, gap):
        """One frame at a time with gaps shorter than the pause: the utterance ages (timeout)."""
        for _ in range(frames):
            self.h.put_frames([True])
            self.h.advance(gap)

    @rule(how=st.sampled_from(["close", "shutdown", "disconnect", "take_over"]))
    def end_session(self, how):
        """Ending rules only late in a run, so that most runs have a long life first."""
        if self.steps < 12:
            return
        self._do({"close": self.h.put_close, "shutdown": self.h.shutdown, "disconnect": self.h.disconnect,
                  "take_over": self.h.take_over}[how])

    @rule(reading=st.booleans())
    def client_reads(self, reading):
        self.h.client_reading = reading
        self.h.settle()

    # ------------------------------------------------------------ time
    @rule(seconds=DURATIONS)
    def advance(self, seconds):
        self.h.advance(seconds)

    @rule(events=st.lists(st.sampled_from(["speech", "silence", "speech_final", "finalize"]), min_size=1, max_size=4),
          seconds=DURATIONS)
    def events_racing_the_clock(self, events, seconds):
        """Events queued and the clock moved before the session takes them: deadlines race client events."""
        self.h.race_with(events, seconds)

    # ------------------------------------------------------------ scheduler and nodes
    # (no preconditions: a rule with nothing to act on does nothing, which keeps rule drawing cheap)
    @rule(pick=st.integers(min_value=0, max_value=99), ok=st.booleans())
    def node_answers(self, pick, ok):
        if keys := self.h.unanswered_keys():
            self._do(self.h.answer, keys[pick % len(keys)], ok)

    @rule(ok=st.booleans())
    def node_answers_everything(self, ok):
        for key in self.h.unanswered_keys():
            self._do(self.h.answer, key, ok)

    @rule(pick=st.integers(min_value=0, max_value=99))
    def node_answers_again(self, pick):
        if keys := sorted(self.h.answers):
            self._do(self.h.answer, keys[pick % len(keys)], True)

    @rule(pick=st.integers(min_value=0, max_value=99), placed=st.booleans())
    def job_waits_for_a_node(self, pick, placed):
        if keys := self.h.unanswered_keys():
            self._do(self.h.tell_waiting, keys[pick % len(keys)], None if placed else "NO_AVAILABLE_NODE")

    @rule(overloaded=st.booleans())
    def scheduler_overloaded(self, overloaded):
        self.h.port.overloaded = overloaded

    # ------------------------------------------------------------ invariants
    @invariant()
    def guarantees_hold(self):
        self.steps += 1
        if hasattr(self, "h"):
            self.h.check()


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(stateful_step_count=40)


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


class BrokenMachine(CoreMachine):
    core_class = StaleTimeoutCore


def test_hypothesis_finds_a_stale_deadline():
    with pytest.raises(AssertionError, match="timeout cut|pause cut|indexes|late|overdue"):
        run_state_machine_as_test(
            BrokenMachine,
            # derandomized: the same search every run, so this test's time is stable
            settings=settings(max_examples=2000, stateful_step_count=30, phases=[Phase.generate, Phase.shrink],
                              database=None, derandomize=True, deadline=None, print_blob=False,
                              report_multiple_bugs=False),
        )
