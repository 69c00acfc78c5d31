"""The load harness (bench/load.py, `just bench`) still runs end to end: a small run against a
real daemon process, real Valkey and simulated nodes, with every reported number present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import adapter_throughput  # noqa: E402
import codec  # noqa: E402
import fairness  # noqa: E402
import load  # noqa: E402
import overload  # noqa: E402

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
    assert active["journal_ahead_wait_ms"]["n"] > 0  # utterance_finalized held back for its job's word (metric read)
    assert not active["errors"]
    assert data["timeline"] and len(data["_samples"]["overhead"]) == active["finalize_to_dispatch_ms"]["n"]
    # the clients are bench/loadgen.py, a process of its own: its CPU and schedule are reported
    generator = active["generator"]
    assert generator["cpu_pct_of_core"] > 0 and generator["send_lag_ms"]["p99"] is not None
    assert data["valid"] is (not generator["behind"])
    assert active["frames_in"] > 0 and data["ratios"]["daemon_frames_per_cpu_s"] > 0


async def test_echo_baseline_counts_frames_per_cpu_second_of_the_bare_server(tmp_path):
    """The baseline of ``ratios.daemon_frames_per_cpu_s_vs_echo``: the generator feeds a bare
    trio-websocket server process the run's schedule and every frame is answered."""
    args = load.parser().parse_args(["--sessions", "10", "--out", str(tmp_path / "load.json")])
    echo = await load.echo_baseline(args, None, 2.0)
    assert echo["echo_connections"] == 10
    assert 30 <= echo["echo_frames_per_s"] <= 50, echo  # 10 connections x 5 frames/s, starting within the first second
    assert echo["echo_frames_per_cpu_s"] > echo["echo_frames_per_s"], echo  # the server idles most of the time
    assert echo["echo_answered"] > 0.9, echo


async def test_the_codec_experiment_s_own_server_answers_every_frame(tmp_path):
    """bench/codec.py's server that parses frames itself speaks enough WebSocket for the
    generator: the upgrade is accepted and every frame of the schedule is answered."""
    args = load.parser().parse_args(["--sessions", "10", "--out", str(tmp_path / "load.json")])
    echo = await load.echo_baseline(args, None, 2.0, codec.OWN_SERVER)
    assert echo["echo_connections"] == 10 and not echo["echo_generator_behind"], echo
    assert 30 <= echo["echo_frames_per_s"] <= 50, echo
    assert echo["echo_answered"] > 0.9, echo  # (those sent in the last moment may be answered after the count)


async def test_load_run_on_a_cluster_reports_each_master(tmp_path):
    """`just bench --redis-cluster 3 --daemon-arg=--redis-shards=12`, small: commands and CPU per
    master. Layout 1 put every scheduling key on one slot, one master doing 99.9 % of the
    commands (docs/scaling.md); with scheduling shards each master carries a share already
    with a handful of sessions (4 nodes: sim-0 ... sim-3 are in shards 2, 0, 2, 1 of 3)."""
    args = load.parser().parse_args(["--sessions", "8", "--nodes", "4", "--duration", "3", "--service-ms", "50",
                                     "--redis-cluster", "3", "--daemon-arg=--redis-shards=3",
                                     "--out", str(tmp_path / "load.json")])
    active = (await load.run(args))["active"]
    assert active["results"] > 0 and not active["errors"]
    per = active["redis_per_server"]
    assert len(per["commands"]) == len(per["cpu_pct_of_core"]) == 3
    assert min(per["commands"]) > 0.1 * sum(per["commands"]), per  # every master a share (layout 1: 0.1 %)


async def test_small_overload_ab_refuses_the_excess_only_with_admission(tmp_path):
    """bench/overload.py (`just bench-overload`): 8 clients for 3 places (2 new, 1 resume
    reserve), both modes; the harness gives its CPU pinning back afterwards."""
    import os

    before = os.sched_getaffinity(0)
    args = overload.parser().parse_args(["--offered", "8", "--max-sessions", "3", "--ramp", "0.5", "--hold", "3",
                                         "--session-s", "100", "--nodes", "1", "--service-ms", "50",
                                         "--out", str(tmp_path / "overload.json")])
    data = await overload.run(args)
    assert os.sched_getaffinity(0) == before
    by_mode = {p["mode"]: p for p in data["phases"]}
    admission, open_ = by_mode["admission"], by_mode["open"]
    assert admission["admitted"] == 2 and admission["refused"].get("full", 0) >= 6  # each of the 6 others asked
    assert open_["admitted"] == 8 and not open_["refused"]
    for phase in (admission, open_):
        assert phase["utterances"] > 0 and phase["daemon_overhead_ms"]["p99"] is not None and not phase["errors"]
        assert set(phase["result_status"]) == {"SUCCESS"} and phase["timeline"]


async def test_flooding_sessions_cost_a_real_time_witness_nothing(tmp_path):
    """Fair share against real processes (bench/fairness.py: a daemon process, a node with 64
    slots answering in 10 ms): three sessions send 100 ms of speech and a finalize as fast as
    the daemon reads them, beside a witness streaming 300 ms utterances in real time; every
    witness result is SUCCESS and none takes a second."""
    args = fairness.parser().parse_args(["--utterances", "12", "--no-pin", "--out", str(tmp_path / "fairness.json")])
    with load.harness_off_the_daemon(pin=False) as (redis_url, _):
        flooded = await fairness.phase(args, "flooded", redis_url)
    assert flooded["status"] == {"SUCCESS": 12}, flooded
    assert flooded["latency_ms"]["max"] < 1000, flooded
    assert flooded["flooders"].get("result", 0) > 12 * 3 and not flooded["flooders"].get("closed"), flooded  # (they did flood)


def test_shard_simulation_gives_each_shard_its_share(tmp_path):
    """`just bench-shards` end to end, small: the real scripts on 1 and 3 valkey-servers; every
    call succeeds and each of the 3 carries a third of the commands."""
    import json
    import subprocess

    out = tmp_path / "shards.json"
    subprocess.run([sys.executable, str(Path(load.__file__).parent / "shards.py"), "--sessions", "60", "--rate", "2",
                    "--shards", "1,3", "--modes", "same-tick", "--rounds", "1", "--duration", "4", "--warmup", "1",
                    "--idle", "0.2", "--out", str(out)], check=True, capture_output=True, timeout=120)
    one, three = json.loads(out.read_text())["runs"]
    for run in (one, three):
        assert run["results"] > 100 and run["failed_calls"] == 0
        assert 3 <= run["evalsha_per_result"] < 4  # dispatch (with the utterance's journal entry), complete, the
        # result's journal write, heartbeats
    assert len(three["shard_commands"]) == 3 and three["shard_commands_spread"] < 0.25
    # (K = 3 heartbeats three times the nodes for the same results: a 2 s window of ~230
    # results once swung that to 10.0 % on a busy box; 4 s and ~470 results keep it within 3 %)
    assert abs(three["commands_per_result"] / one["commands_per_result"] - 1) < 0.1, (one, three)


def test_tree_stats_adds_up_a_process_and_its_children():
    """`--workers`: the daemon's CPU and RSS are the supervisor's and its workers'."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import time

        time.sleep(0.3)
        _, own_rss = load.proc_stats(os.getpid())
        _, child_rss = load.proc_stats(child.pid)
        _, tree_rss = load.tree_stats(os.getpid())
        assert tree_rss >= own_rss + child_rss > own_rss
    finally:
        child.kill()
        child.wait()


async def test_the_adapter_bench_reports_what_a_lone_call_costs(valkey_url):
    """``just bench-adapter``'s lone-call figures (docs/performance.md, "What one utterance
    cannot go below"): a lone call through the adapter costs CPU on both sides of its thread
    hop, more than a raw redis-py call."""
    lone = await adapter_throughput.adapter(valkey_url, 300, 1, 2)
    _, raw_cpu_us = await trio.to_thread.run_sync(adapter_throughput.raw_round_trips, valkey_url, 300)
    assert lone["mean_batch"] == 1.0 and lone["ops_per_s"] > 0, lone
    assert 0 < lone["trio_thread_cpu_us_per_call"] < lone["cpu_us_per_call"], lone
    assert raw_cpu_us > 0
