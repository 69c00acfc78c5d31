"""The Redis outage clock (store/outage.py), with explicit times."""

from __future__ import annotations

import pytest

from scheduler.store.outage import OutageClock


def test_a_failed_batch_starts_an_outage_from_its_start_and_a_success_ends_it():
    clock, ended = OutageClock(), []
    clock.on_end.append(ended.append)
    clock.started("a", 10.0)
    clock.finished("a", 15.0, ok=False)  # a 5 s timeout
    assert clock.since(15.0) == 10.0 and clock.elapsed(16.0) == 6.0
    clock.started("b", 16.0)
    clock.finished("b", 16.2, ok=True)
    assert clock.since(17.0) is None and clock.elapsed(30.0) == clock.total == pytest.approx(6.2) and ended == [pytest.approx(6.2)]


def test_a_batch_in_flight_past_the_stall_bound_counts_from_its_start_before_it_fails():
    clock = OutageClock(stall_s=1.0)
    clock.started("a", 10.0)
    assert clock.since(10.9) is None and clock.elapsed(10.9) == 0.0  # slow, not yet a stall
    assert clock.since(11.5) == 10.0 and clock.elapsed(12.0) == 2.0  # a stall, counted from its start
    clock.finished("a", 13.0, ok=True)  # it went through in the end: the stall was an outage all the same
    assert clock.since(13.0) is None and clock.total == 3.0


def test_an_outage_lasts_while_any_batch_is_stalled_and_quick_batches_do_not_count():
    clock = OutageClock(stall_s=1.0)
    clock.started("quick", 0.0)
    clock.finished("quick", 0.5, ok=True)
    assert clock.total == 0.0 and clock.episodes == 0
    clock.started("a", 1.0)
    clock.started("b", 1.2)
    clock.finished("a", 2.5, ok=False)
    clock.finished("b", 3.0, ok=True)  # b took 1.8 s: the outage goes on until it is back
    assert clock.since(3.0) is None and clock.total == 2.0 and clock.episodes == 1
