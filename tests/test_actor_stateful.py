"""The Trio shell of the session (``actor.py``) under Hypothesis: a smaller machine than the core's.

What runs: the real :class:`SessionActor` (its core, backlog, channels and cancel-scope
deadlines) inside a Trio run on its own thread, under a ``MockClock`` that only the rules
move. Trio's scheduler order is shuffled by a Hypothesis-controlled RNG (Trio's Hypothesis
plugin), so the shell's own interleavings (the backlog's wake token, answers in the inbox,
deadlines passing while events wait) are explored; every failure replays and shrinks.

The decisions themselves are proven on the sans-IO core, step by step and much faster, by
``test_core_stateful.py`` (which ``just stress`` runs with 10,000 examples). This machine
checks that the shell feeds the core faithfully: the same rules and the same guarantees
(:meth:`SessionModel.check` after every step, :meth:`ActorHarness.finish` at the end: every
result and ``session_closed``, no permanent stall), at most 60 examples of 30 steps.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, run_state_machine_as_test

from scheduler.session.actor import _WAKE, SessionActor

from .actor_harness import ActorHarness
from .session_rules import RESUME, SessionRules, step_limit
from .trio_thread import TrioThread


class ActorMachine(SessionRules):
    actor_class: type[SessionActor] = SessionActor

    @initialize(tgts=st.sampled_from([("en",), ("en", "de")]), outbox=st.sampled_from([6, 64]), resume=RESUME)
    def start(self, tgts, outbox, resume):
        """``resume``: start as a session resumed owing results (session.py, PendingUtterance)."""
        self.trio = TrioThread()
        self.h: ActorHarness = self.trio.call_sync(
            lambda: ActorHarness(self.trio.nursery, self.trio.clock, actor_class=self.actor_class,
                                 tgt_langs=tgts, outbox_size=outbox, resume=resume))
        self.trio.call(self.h.settle)

    def teardown(self):
        if hasattr(self, "trio"):
            try:
                with step_limit("finish"):
                    self.trio.call(self.h.finish)
                for name in self.h.coverage():
                    event(name)  # what this example reached (--hypothesis-show-statistics)
            finally:
                self.trio.close()

    def do(self, fn, *args):
        self.trio.call_sync(fn, *args)
        self.trio.call(self.h.settle)

    def advance_by(self, seconds):
        self.trio.call(self.h.advance, seconds)

    def race(self, events, seconds):
        self.trio.call(self.h.race_with, events, seconds)

    def verify(self):
        self.trio.call_sync(self.h.check)


TestActorMachine = ActorMachine.TestCase
# the shell's machine is the smaller one: the core's (test_core_stateful.py) explores the decisions
TestActorMachine.settings = settings(settings(), max_examples=min(settings().max_examples, 60), stateful_step_count=30)


class ForgetsTheWakeToken(SessionActor):
    """The backlog does not wake the actor: client input waits for the next answer or deadline."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backlog._wake = lambda: None


def test_the_actor_machine_finds_input_left_waiting():
    """The check that queued input is worked off at once can fail: it catches an actor that
    lets its input wait for an unrelated event."""
    class Broken(ActorMachine):
        actor_class = ForgetsTheWakeToken

    with pytest.raises(AssertionError, match="queued while the actor waits"):
        run_state_machine_as_test(Broken, settings=settings(max_examples=200, stateful_step_count=10, deadline=None,
                                                            database=None, print_blob=False, report_multiple_bugs=False))


class KeepsTheOldDeadline(SessionActor):
    """An inline step (actor.py ``_client_wake``) that leaves the wait's deadline as it was."""

    def _client_wake(self):
        if not self._parked:
            self._post_wake()
            return
        self._step(_WAKE)
        if self.core.ended:
            self._post_wake()


class StepsEvenWithAnItemWaiting(SessionActor):
    """Client input stepped inline even while an inbox item waits for the loop."""

    def _client_wake(self):
        self._step(_WAKE)
        if self.core.ended:
            self._post_wake()
        else:
            self._wait.deadline = self.core.next_deadline()


@pytest.mark.parametrize(("broken", "found"), [(KeepsTheOldDeadline, "late by|missed"),
                                               (StepsEvenWithAnItemWaiting, "sent after the close was taken")])
def test_the_actor_machine_finds_a_broken_inline_step(broken, found):
    """The checks can fail for the inline step: a wait left with an old deadline lets a result
    go late or an utterance uncut; a step that does not wait for an inbox item lets frames sent after the drain in."""
    class Broken(ActorMachine):
        actor_class = broken

    with pytest.raises(AssertionError, match=found):
        run_state_machine_as_test(Broken, settings=settings(max_examples=300, stateful_step_count=30, deadline=None,
                                                            database=None, print_blob=False, report_multiple_bugs=False,
                                                            derandomize=True, phases=[Phase.generate]))


# ---------------------------------------------------------------- named regressions (seed cases)


async def run_script(nursery, clock, script, **settings_overrides):
    h = ActorHarness(nursery, clock, **settings_overrides)
    await h.settle()
    for step in script:
        step(h)
        await h.settle()
        h.check()
    return h


async def test_concurrent_finalize_stress(nursery, mock_clock):
    """is_final, finalize, pause and max_duration all due at one instant, many times over (no
    bound on unanswered jobs: nobody answers here, and every finalize is to be taken)."""
    h = ActorHarness(nursery, mock_clock, tgt_langs=("en",), max_jobs_per_session=0)
    await h.settle()
    for i in range(30):
        h.put_frames([True] * (i % 7 + 1), is_final=i % 2 == 0)
        h.put_finalize()
        h.put_finalize()
        await h.race(0.8)  # the pause deadline of the last frame, with events still queued
        h.check()
    await h.finish()
    assert len([m for _, m in h.emitted if m.TYPE == "utterance_finalized"]) >= 30


async def test_rapid_chunks_then_pause_exceeded(nursery, mock_clock):
    h = ActorHarness(nursery, mock_clock, tgt_langs=("en",))
    await h.settle()
    for _ in range(12):  # 1.2 s of speech as fast as possible
        h.put_frames([True])
    await h.advance(0.81)
    (t, fin), = [(t, m) for t, m in h.emitted if m.TYPE == "utterance_finalized"]
    assert (fin.utterance_index, fin.reason, fin.audio_ms) == (0, "pause", 1200)
    await h.finish()


async def test_timeout_racing_is_final(nursery, mock_clock):
    """The is_final frame was queued before the timeout deadline passed: it wins, the timer is stale."""
    h = ActorHarness(nursery, mock_clock, tgt_langs=("en",), max_utterance_ms=20_000)
    await h.settle()
    for _ in range(29):  # speech every 100 ms up to just before the 3 s timeout
        h.put_frames([True])
        await h.advance(0.1)
    h.put_frames([True], is_final=True)
    await h.race(0.2)  # the timeout deadline (3.0 s) passes while the frame waits
    h.check()
    fins = [(m.utterance_index, m.reason, m.audio_ms) for _, m in h.emitted if m.TYPE == "utterance_finalized"]
    assert fins == [(0, "is_final", 3000)]
    assert h.metrics.duplicate_finalize_suppressed_total._value.get() == 0
    await h.finish()


async def test_max_duration_racing_close(nursery, mock_clock):
    h = ActorHarness(nursery, mock_clock, tgt_langs=("en",))
    await h.settle()
    h.put_frames([True] * 20)  # reaches max_utterance_ms (2000) exactly on the last frame
    h.put_close()
    await h.settle()
    h.check()
    fins = [(m.utterance_index, m.reason, m.audio_ms) for _, m in h.emitted if m.TYPE == "utterance_finalized"]
    assert fins == [(0, "max_duration", 2000)]  # close finds an empty utterance: no second index
    await h.finish()


@given(n=st.integers(min_value=1, max_value=60))
@settings(max_examples=20, deadline=None)
def test_flood_loses_no_frame(n):
    """Whatever the flood, every frame lands in exactly one utterance, in order."""
    async def main():
        async with trio.open_nursery() as nursery:
            clock = trio.lowlevel.current_clock()
            h = ActorHarness(nursery, clock, tgt_langs=("en",))
            h.put_frames([True] * n)
            h.put_finalize()
            await h.settle()
            h.check()
            total = sum(m.audio_ms for _, m in h.emitted if m.TYPE == "utterance_finalized")
            assert total == len(h.sent) * 100 and len(h.sent) >= min(n, 40)
            await h.finish()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock())
