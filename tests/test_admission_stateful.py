"""Admission control under any order of admissions and releases (session/admission.py):
Hypothesis drives new sessions, resumes, sessions ending (a slot released, maybe twice)
and sessions that fail to open; a model says what must be admitted.

and the event loop's lag samples (the overload guard: a model keeps the smoothed lag).

Checked after every step: the count is the number of live slots; a new session is admitted
exactly while fewer than ``limit - reserve`` are held and the guard is not engaged, a resume
exactly while fewer than ``limit`` (the guard lets resumes in); nothing is held past the
limit; ``full()`` and ``refusing()`` say why a new one would be refused; the guard engages
when the smoothed lag passes its threshold and releases only below half of it; refusals are
counted by kind; ``admission_full`` / ``admission_open`` alternate, one per change of
``full()``, and ``overload_guard_engaged`` / ``_released`` alternate, one per change of the
guard.
"""

from __future__ import annotations

import logging

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from scheduler.ops.metrics import Metrics
from scheduler.protocol import SERVER_FULL, ProtocolError
from scheduler.session.admission import ENGAGE_AFTER, LAG_SMOOTHING, AdmissionControl, Slot, reserve_for


class AdmissionMachine(RuleBasedStateMachine):
    @initialize(limit=st.sampled_from([0, 1, 2, 3, 5, 40]), lag_limit=st.sampled_from([0.0, 0.05, 0.2]))
    def start(self, limit, lag_limit):
        self.metrics = Metrics()
        self.control = AdmissionControl(limit, self.metrics, lag_limit_s=lag_limit)
        self.limit, self.reserve, self.lag_limit = limit, reserve_for(limit), lag_limit
        self.lag, self.overloaded, self.above = 0.0, False, 0
        self.slots: list[Slot] = []
        self.refused = {"full": 0, "full_resume": 0, "overload": 0}
        self.was_full = False
        self.events: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: self.events.append(getattr(record, "event", ""))
        logging.getLogger("scheduler.admission").addHandler(handler)
        logging.getLogger("scheduler.admission").setLevel(logging.INFO)
        self.handler = handler

    def teardown(self):
        logging.getLogger("scheduler.admission").removeHandler(self.handler)

    def _take(self, resume: bool) -> None:
        bound = self.limit if resume else self.limit - self.reserve
        room = self.limit == 0 or len(self.slots) < bound
        should = room and (resume or not self.overloaded)
        try:
            slot = self.control.take(resume=resume)
        except ProtocolError as err:
            assert not should, f"refused with {len(self.slots)} held of {self.limit} (resume={resume})"
            assert err.code == SERVER_FULL and err.fatal and err.close_code == 1013 and 1000 <= err.retry_after_ms <= 3000
            self.refused["overload" if room else "full_resume" if resume else "full"] += 1
            return
        assert should, f"admitted with {len(self.slots)} held of {self.limit} (resume={resume})"
        self.slots.append(slot)

    @rule()
    def new_session(self):
        self._take(False)

    @rule()
    def resume(self):
        self._take(True)

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.03, 0.12, 0.5, 2.0]), times=st.integers(1, 30))
    def loop_lag(self, seconds, times):
        """The event loop wakes the lag watcher this late, ``times`` samples in a row."""
        for _ in range(times):
            self.control.lag(seconds)
            self.lag += (seconds - self.lag) * LAG_SMOOTHING
            self.above = self.above + 1 if self.lag_limit and self.lag > self.lag_limit else 0
            if self.lag_limit and not self.overloaded and self.above >= ENGAGE_AFTER:
                self.overloaded = True
            elif self.overloaded and self.lag < self.lag_limit / 2:
                self.overloaded = False
            assert self.control.overloaded is self.overloaded, (self.lag, self.lag_limit)

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), twice=st.booleans())
    def session_ends(self, data, twice):
        """A session ends (closed, idle, disconnected, or it failed to open): its slot goes
        back; the gateway's ``with slot`` may release one hold() already released."""
        slot = self.slots.pop(data.draw(st.integers(0, len(self.slots) - 1)))
        slot.release()
        if twice:
            with slot:
                pass

    @invariant()
    def books(self):
        if not hasattr(self, "control"):
            return
        assert self.control.held == len(self.slots)
        assert self.limit == 0 or self.control.held <= self.limit
        full = self.limit > 0 and len(self.slots) >= self.limit - self.reserve
        assert self.control.full() is full
        assert self.control.refusing() == ("full" if full else "overloaded" if self.overloaded else None)
        assert abs(self.metrics.event_loop_lag_seconds._value.get() - self.lag) < 1e-9
        for reason, count in self.refused.items():
            assert self.metrics.sessions_refused_total.labels(reason)._value.get() == count
        if full != self.was_full:
            self.was_full = full
            last = [e for e in self.events if e.startswith("admission_")]
            assert last and last[-1] == ("admission_full" if full else "admission_open"), self.events
        admission = [e for e in self.events if e.startswith("admission_")]
        assert admission == ["admission_full", "admission_open"] * (len(admission) // 2) + ["admission_full"] * (len(admission) % 2)
        guard = [e for e in self.events if e.startswith("overload_guard_")]
        assert len(guard) % 2 == self.overloaded, guard
        assert guard == ["overload_guard_engaged", "overload_guard_released"] * (len(guard) // 2) + \
            ["overload_guard_engaged"] * (len(guard) % 2), guard


@pytest.mark.parametrize("examples", [200])
def test_admission_state_machine(examples):
    run_state_machine_as_test(AdmissionMachine, settings=settings(settings(), max_examples=min(settings().max_examples, examples),
                                                                  stateful_step_count=40))
