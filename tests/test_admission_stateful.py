"""Admission control under any order of admissions and releases (session/admission.py):
Hypothesis drives new sessions, resumes, sessions ending (a slot released, maybe twice)
and sessions that fail to open; a model says what must be admitted.

Checked after every step: the count is the number of live slots; a new session is admitted
exactly while fewer than ``limit - reserve`` are held, a resume exactly while fewer than
``limit``; nothing is held past the limit; ``full()`` says whether a new one would be
refused; refusals are counted by kind; ``admission_full`` / ``admission_open`` alternate,
one per change of ``full()``.
"""

from __future__ import annotations

import logging

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from scheduler.ops.metrics import Metrics
from scheduler.protocol import SERVER_FULL, ProtocolError
from scheduler.session.admission import AdmissionControl, Slot, reserve_for


class AdmissionMachine(RuleBasedStateMachine):
    @initialize(limit=st.sampled_from([0, 1, 2, 3, 5, 40]))
    def start(self, limit):
        self.metrics = Metrics()
        self.control = AdmissionControl(limit, self.metrics)
        self.limit, self.reserve = limit, reserve_for(limit)
        self.slots: list[Slot] = []
        self.refused = {"full": 0, "full_resume": 0}
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
        should = self.limit == 0 or len(self.slots) < bound
        try:
            slot = self.control.take(resume=resume)
        except ProtocolError as err:
            assert not should, f"refused with {len(self.slots)} held of {self.limit} (resume={resume})"
            assert err.code == SERVER_FULL and err.fatal and err.close_code == 1013 and 1000 <= err.retry_after_ms <= 3000
            self.refused["full_resume" if resume else "full"] += 1
            return
        assert should, f"admitted with {len(self.slots)} held of {self.limit} (resume={resume})"
        self.slots.append(slot)

    @rule()
    def new_session(self):
        self._take(False)

    @rule()
    def resume(self):
        self._take(True)

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
        for reason, count in self.refused.items():
            assert self.metrics.sessions_refused_total.labels(reason)._value.get() == count
        if full != self.was_full:
            self.was_full = full
            assert self.events and self.events[-1] == ("admission_full" if full else "admission_open"), self.events
        expected = ["admission_full", "admission_open"] * len(self.events)
        assert self.events == expected[:len(self.events)], self.events


@pytest.mark.parametrize("examples", [200])
def test_admission_state_machine(examples):
    run_state_machine_as_test(AdmissionMachine, settings=settings(settings(), max_examples=min(settings().max_examples, examples),
                                                                  stateful_step_count=40))
