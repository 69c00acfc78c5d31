"""The garbage collector's tuning and watch (scheduler/ops/gcwatch.py): every collection is
timed into ``scheduler_gc_pause_seconds{generation}``, a long one is logged, and the watch
leaves ``gc.callbacks`` as it found it."""

from __future__ import annotations

import gc
import logging

import trio

from scheduler.ops import gcwatch
from scheduler.ops.metrics import Metrics


def _count(metrics: Metrics, generation: str) -> float:
    return metrics.registry.get_sample_value("scheduler_gc_pause_seconds_count", {"generation": generation}) or 0.0


async def test_each_collection_is_timed_and_a_long_one_logged(autojump_clock, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="scheduler.gc")
    metrics = Metrics()
    callbacks = list(gc.callbacks)
    async with trio.open_nursery() as nursery:
        await nursery.start(gcwatch.GcWatch(metrics).run)
        assert len(gc.callbacks) == len(callbacks) + 1
        monkeypatch.setattr(gcwatch, "LONG_PAUSE_S", 10.0)
        gc.collect()  # a full collection, short of 10 s
        await trio.sleep(gcwatch.FLUSH_S + 0.1)
        assert _count(metrics, "2") >= 1
        assert not [r for r in caplog.records if getattr(r, "event", None) == "gc_pause_long"]
        monkeypatch.setattr(gcwatch, "LONG_PAUSE_S", 0.0)
        gc.collect(0)
        gc.collect(0)
        await trio.sleep(gcwatch.FLUSH_S)
        assert _count(metrics, "0") >= 2
        lines = [r for r in caplog.records if getattr(r, "event", None) == "gc_pause_long"]
        assert len(lines) == 1 and lines[0].fields["count"] >= 2  # one line per flush, however many
        nursery.cancel_scope.cancel()
    assert gc.callbacks == callbacks


def test_tune_sets_the_thresholds():
    before = gc.get_threshold()
    try:
        gcwatch.tune()
        assert gc.get_threshold() == gcwatch.THRESHOLDS == (5000, 20, 10)
    finally:
        gc.set_threshold(*before)
