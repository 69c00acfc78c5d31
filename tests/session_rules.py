"""The rules both session machines share: the client, time, the scheduler and the nodes.

``test_core_stateful.py`` runs them on the sans-IO core (``core_harness.py``), and
``test_actor_stateful.py`` on the Trio shell (``actor_harness.py``); each machine says how
its session takes a step (``_do``), how time moves (``_advance``, ``_race_with``) and how
the guarantees are checked (``_check``: :meth:`SessionModel.check`).
"""

from __future__ import annotations

import contextlib
import signal

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

DURATIONS = st.sampled_from([0.01, 0.1, 0.3, 0.79, 0.8, 0.81, 1.0, 2.0, 2.99, 3.0, 3.2, 4.99, 5.0, 5.2, 8.0, 11.0])
# up to 6 frames, speech (True) or silence, as one draw: the low bits of a number, after a 1
FRAMES = st.integers(min_value=2, max_value=127).map(lambda n: [bit == "1" for bit in bin(n)[3:]])
RESUME = st.none() | st.just("fresh") | st.tuples(st.integers(0, 5), st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 5.0]), max_size=3).map(sorted))


STEP_LIMIT_S = 10.0
"""A step (a rule, the invariant, the end) taking longer than this is a livelock: it fails
with a message naming the step, instead of hanging the run."""


@contextlib.contextmanager
def step_limit(name: str):
    """Fail the step with an AssertionError after STEP_LIMIT_S (SIGALRM: Hypothesis runs the
    machine in the main thread)."""
    def alarm(signum, frame):
        raise AssertionError(f"step {name!r} took over {STEP_LIMIT_S:g} s: a livelock?")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, STEP_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class SessionRules(RuleBasedStateMachine):
    """Rules and the invariant; a subclass adds ``@initialize`` (making ``self.h``), ``teardown``
    and says how a step is taken (``do``), how time moves (``advance_by``, ``race``) and how
    the guarantees are checked (``verify``). Every step runs under :func:`step_limit`."""

    def _do(self, fn, *args) -> None:
        """Call ``fn(*args)`` on the client or node side, then let the session take it."""
        with step_limit(getattr(fn, "__name__", "step")):
            self.do(fn, *args)

    def _advance(self, seconds: float) -> None:
        with step_limit(f"advance {seconds}"):
            self.advance_by(seconds)

    def _race_with(self, events: list[str], seconds: float) -> None:
        with step_limit(f"race {events} {seconds}"):
            self.race(events, seconds)

    def _check(self) -> None:
        with step_limit("check"):
            self.verify()

    def do(self, fn, *args) -> None:
        raise NotImplementedError

    def advance_by(self, seconds: float) -> None:
        raise NotImplementedError

    def race(self, events: list[str], seconds: float) -> None:
        raise NotImplementedError

    def verify(self) -> None:
        raise NotImplementedError

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

    @rule(n=st.integers(min_value=9, max_value=40), then=st.lists(st.sampled_from(["speech", "silence", "speech_final", "finalize",
                                                                                  "empty"]),
                                                                  max_size=12),
          occupied=st.booleans())
    def flood(self, n, then, occupied):
        """Faster than the session takes them: merging, busy, early backlog finalize; what follows
        the speech is merged too, across (never past) finalize and is_final. ``occupied``: the
        session has an inbox item to take first, so the flood queues from its first frame
        (otherwise an idle actor steps input inline as it comes, until input is held)."""
        def put():
            if occupied:
                self.h.occupy()
            self.h.put_frames([True] * n)
            self.h.put_events(then)
        self._do(put)

    @rule(speech=st.integers(min_value=1, max_value=5), silence=st.integers(min_value=6, max_value=12))
    def open_mic(self, speech, silence):
        """Speech, then the microphone keeps streaming silence: around pause_ms of it, the
        utterance is cut by its content, with no time passing."""
        self._do(self.h.put_frames, [True] * speech + [False] * silence)

    @rule(frames=st.integers(min_value=1, max_value=8), gap=st.sampled_from([0.3, 0.5, 0.7]))
    def slow_talker(self, frames, gap):
        """One frame at a time with gaps shorter than the pause: the utterance ages (timeout)."""
        for _ in range(frames):
            self._do(self.h.put_frames, [True])
            self._advance(gap)

    @rule(how=st.sampled_from(["close", "shutdown", "disconnect", "take_over"]))
    def end_session(self, how):
        """Ending rules only late in a run, so that most runs have a long life first."""
        if self.steps < 12:
            return
        self._do({"close": self.h.put_close, "shutdown": self.h.shutdown, "disconnect": self.h.disconnect,
                  "take_over": self.h.take_over}[how])

    @rule(first=st.sampled_from(["answer", "shutdown"]), ok=st.booleans(),
          events=st.lists(st.sampled_from(["speech", "silence", "speech_final", "finalize"]), min_size=1, max_size=4))
    def events_behind_an_inbox_item(self, first, ok, events):
        """Client events that come while an inbox item (an answer; late in a run, the drain)
        waits for the session: the item is taken first. (The actor steps client input inline
        only while nothing waits in its inbox: frames sent after a drain must not slip in.)"""
        def put():
            if first == "shutdown" and self.steps >= 12:
                self.h.shutdown()
            elif keys := self.h.unanswered_keys():
                self.h.answer(keys[0], ok)
            self.h.put_events(events)
        self._do(put)

    @rule(reading=st.booleans())
    def client_reads(self, reading):
        self.h.client_reading = reading
        self._do(lambda: None)

    # ------------------------------------------------------------ time
    @rule(seconds=DURATIONS)
    def advance(self, seconds):
        self._advance(seconds)

    @rule(events=st.lists(st.sampled_from(["speech", "silence", "speech_final", "finalize"]), min_size=1, max_size=4),
          seconds=DURATIONS, occupied=st.booleans())
    def events_racing_the_clock(self, events, seconds, occupied):
        """Events queued and the clock moved before the session takes them: deadlines race
        client events (``occupied``: see :meth:`flood`; an idle actor takes them inline first)."""
        self._race_with(["occupy"] * occupied + events, seconds)

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

    @rule(pick=st.integers(min_value=0, max_value=99), ok=st.booleans())
    def node_answers_again(self, pick, ok):
        """A second answer for one job (a retried node, a relayed copy), maybe with another
        status: the first one stands."""
        if keys := sorted(self.h.answers):
            self._do(self.h.answer, keys[pick % len(keys)], ok)

    @rule(pick=st.integers(min_value=0, max_value=99), placed=st.booleans())
    def job_waits_for_a_node(self, pick, placed):
        if keys := self.h.unanswered_keys():
            self._do(self.h.tell_waiting, keys[pick % len(keys)], None if placed else "NO_AVAILABLE_NODE")

    @rule(overloaded=st.booleans())
    def scheduler_overloaded(self, overloaded):
        self.h.port.overloaded = overloaded

    @rule(out=st.booleans())
    def redis_outage(self, out):
        """Redis goes out (the adapter's outage clock says since when) or comes back: result
        deadlines are held meanwhile and then count the outage out; pause, timeout and idle
        do not move."""
        self._do(self.h.redis_out if out else self.h.redis_back)

    # ------------------------------------------------------------ invariants
    @invariant()
    def guarantees_hold(self):
        self.steps += 1
        if hasattr(self, "h"):
            self._check()


