"""The load harness (bench/load.py, `just bench`) still runs end to end: a small run against a
real daemon process, real Valkey and simulated nodes, with every reported number present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import load  # noqa: E402

pytestmark = pytest.mark.slow


async def test_small_load_run_reports_every_number(tmp_path):
    args = load.parser().parse_args(["--sessions", "6", "--nodes", "2", "--duration", "4", "--service-ms", "50",
                                     "--failure-rate", "0.3", "--skip-baselines", "--out", str(tmp_path / "load.json")])
    data = await load.run(args)
    idle, active = data["idle"], data["active"]
    assert idle["sessions_held"] == 6 and idle["rss_per_idle_session_kib"] > 0
    assert active["results"] > 0 and active["node_jobs"] > 0
    assert set(active["finalize_reasons"]) <= {"is_final", "pause", "close", "timeout", "max_duration"}
    assert active["result_status"].get("SUCCESS", 0) > 0
    assert active["finalize_to_dispatch_ms"]["n"] > 0 and active["daemon_overhead_ms"]["p99"] is not None
    assert active["redis_evalsha_per_result"] >= 2  # dispatch + complete at least
    assert not active["errors"]
    assert data["timeline"] and len(data["_samples"]["overhead"]) == active["finalize_to_dispatch_ms"]["n"]
