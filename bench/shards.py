"""Scheduling shards, by simulation: the real Lua scripts on K independent Valkey processes.

No daemon and no WebSocket: this process drives the scripts directly at the job and journal
rate of ``--sessions`` real-time sessions, split over K shards (one valkey-server each,
sessions spread by index, ``--nodes-per-shard`` nodes registered in every shard). Per
utterance, as the daemon does it (docs/performance.md): one ``dispatch_task`` carrying the
audio (base64 of ``--utterance-s`` seconds of 16 kHz PCM) and the finalized utterance's
journal entry (docs/redis.md, "The utterance's journal entry, written by its job's
creation"); after ``--service-ms``, one ``complete_task`` storing the answer and a journal
write of the result. Every node heartbeats once a second. Each shard's due calls go
in one pipeline per tick (``--tick-ms``; with ``--modes same-batch`` the tick is K times
longer, so that a shard's pipelines are as large as the one server's at K = 1: what a
server pays per batch, not per command, then stays out of the comparison).

Measured per K, over ``--duration`` seconds after ``--warmup``: results, Valkey CPU
(``INFO cpu``, user + sys of every server) per result and per session, also net of the
servers' idle CPU (measured for ``--idle`` seconds before the load: each server's own
housekeeping, which a real primary pays whatever it carries), each shard's share
of the commands and of the CPU (``INFO commandstats``, reset at the window's start),
EVALSHA and commands per result, and this driver's own CPU and lag. This box's speed drifts
by 10-20 % within minutes, so every (mode, K) runs ``--rounds`` times, interleaved, and the
run of median CPU per result is reported with every round's figure.

Keeping the driver out of the way: with two or more CPUs the servers are pinned to CPU 0 and
the driver to the others (``sched_setaffinity``), and the driver only packs pipelines.

Usage: python bench/shards.py [--sessions 2000] [--shards 1,2,4] [--duration 10] [--rounds 3]
Prints one JSON object and writes it to --out (default bench/results/shards.json).
"""

from __future__ import annotations

import argparse
import base64
import heapq
import itertools
import json
import os
import random
import time
from pathlib import Path

import redis
from _common import spread

from scheduler.ops.embedded_redis import EmbeddedValkey
from scheduler.store import lua
from scheduler.store.redis_adapter import load_script_sources

PAIR = [("pool", "zh", "en")]
META = json.dumps({"src_lang": "zh", "tgt_langs": ["en"], "sample_rate": 16000})
RESULT = json.dumps({"type": "result", "utterance_index": 0, "status": "SUCCESS", "tgt_lang": "en",
                     "source_text": "x" * 60, "translation": "y" * 80, "turn_id": "t"})


def now_ms() -> int:
    return int(time.time() * 1000)


def pin(pid: int, cpus: set[int]) -> None:
    if hasattr(os, "sched_setaffinity") and cpus:
        os.sched_setaffinity(pid, cpus)


class Shard:
    """One valkey-server with its nodes; the calls due on it are queued and sent in one pipeline."""

    def __init__(self, k: int, nodes: int, server_cpus: set[int]) -> None:
        self.k = k
        self.server = EmbeddedValkey()
        self.server.start()
        pin(self.server.pid, server_cpus)
        self.client = redis.Redis.from_url(self.server.url, decode_responses=True)
        self.scripts = {name: self.client.register_script(src) for name, src in load_script_sources().items()}
        self.nodes = [f"n{k}.{i}" for i in range(nodes)]
        for node in self.nodes:
            self.call(self.client, lua.register_node(node, PAIR, 1000, now_ms(), "bench"))
        self.candidates = lua.read_candidates(self.client, "zh", "en")
        self.ids = itertools.count(1)
        self.queue: list[tuple[str, lua.Call, object]] = []  # (kind, call, context)

    def call(self, client, call: lua.Call):
        name, keys_, args = call
        return self.scripts[name](keys=keys_, args=args, client=client)

    def flush(self) -> list[tuple[str, object, object]]:
        """Send the queued calls in one pipeline; returns (kind, context, reply) for each."""
        if not self.queue:
            return []
        queue, self.queue = self.queue, []
        pipe = self.client.pipeline(transaction=False)
        for _, call, _ in queue:
            self.call(pipe, call)
        replies = pipe.execute(raise_on_error=False)
        return [(kind, ctx, reply) for (kind, _, ctx), reply in zip(queue, replies, strict=True)]

    def counters(self) -> dict:
        cpu = self.client.info("cpu")
        stats = self.client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()}
        own = sum(calls.get(c, 0) for c in ("info", "config|resetstat", "config"))
        return {"cpu_s": cpu["used_cpu_user"] + cpu["used_cpu_sys"],
                "commands": sum(calls.values()) - own, "evalsha": calls.get("evalsha", 0)}

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class Driver:
    """The sessions' schedule: utterances, answers and heartbeats as timed events."""

    def __init__(self, shards: list[Shard], args: argparse.Namespace) -> None:
        self.shards, self.args = shards, args
        self.rng = random.Random(args.seed)
        self.audio = base64.b64encode(os.urandom(int(args.utterance_s * 16000 * 2))).decode()
        self.events: list[tuple[float, int, str, int, object]] = []
        self.seq = itertools.count()
        self.next_index = [0] * args.sessions
        self.results = self.failures = self.calls = self.pipelines = 0
        start = time.monotonic()
        period = 1.0 / args.rate
        for s in range(args.sessions):
            self.at(start + self.rng.uniform(0, period), "utterance", s % len(shards), s)
        for shard in shards:
            for i, node in enumerate(shard.nodes):
                self.at(start + i / len(shard.nodes), "heartbeat", shard.k, node)

    def at(self, t: float, kind: str, k: int, data: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, k, data))

    def tick(self, now: float) -> float:
        """Queue every due event on its shard, send each shard's pipeline; returns the lag (s)."""
        lag = 0.0
        while self.events and self.events[0][0] <= now:
            t, _, kind, k, data = heapq.heappop(self.events)
            lag = max(lag, now - t)
            getattr(self, f"_{kind}")(now, self.shards[k], data)
        for shard in self.shards:
            if shard.queue:
                self.calls += len(shard.queue)
                self.pipelines += 1
            for kind, ctx, reply in shard.flush():
                self._reply(now, shard, kind, ctx, reply)
        return lag

    def _utterance(self, now: float, shard: Shard, s: int) -> None:
        index, self.next_index[s] = self.next_index[s], self.next_index[s] + 1
        sid, job_id = f"s{s}", f"{shard.k}.{next(shard.ids)}"
        shard.queue.append(("dispatch", lua.dispatch(
            f"{sid}:{index}:en", job_id, sid, index, "zh", "en", f"{sid}.t{index}", "end", now_ms(), 30000, 10000,
            self.rng.randrange(1 << 30), shard.candidates, epoch=1, placed_by="bench", audio_b64=self.audio,
            deadline_ms=now_ms() + 10000, journal_entry='{"reason":"pause","turn_id":"t","deadline_ms":0}'), (sid, index)))
        self.at(now + self.rng.uniform(0.5, 1.5) / self.args.rate, "utterance", shard.k, s)

    def _answer(self, now: float, shard: Shard, job: tuple) -> None:
        sid, index, job_id, node = job
        shard.queue.append(("complete", lua.complete(
            job_id, f"{sid}:{index}:en", node, 1, True, now_ms(), answer=RESULT, answer_ttl_s=70), None))
        shard.queue.append(("journal", lua.session_journal(sid, 1, META, 256, [("r", index, RESULT)]), None))

    def _heartbeat(self, now: float, shard: Shard, node: str) -> None:
        shard.queue.append(("heartbeat", lua.heartbeat(node, now_ms(), {"gpu": 0.5}), None))
        self.at(now + 1.0, "heartbeat", shard.k, node)

    def _reply(self, now: float, shard: Shard, kind: str, ctx: object, reply: object) -> None:
        if isinstance(reply, Exception):
            self.failures += 1
        elif kind == "dispatch":
            sid, index = ctx
            service = self.rng.lognormvariate(0, 0.5) * self.args.service_ms / 1000
            self.at(now + service, "answer", shard.k, (sid, index, str(reply[1]), str(reply[2])))
        elif kind == "complete":
            self.results += 1


def window(shards: list[Shard], driver: Driver, args: argparse.Namespace, tick_s: float) -> dict:
    """Warm up, then measure ``args.duration`` seconds, sending every ``tick_s``."""
    def run_until(end: float, lags: list[float]) -> None:
        while (now := time.monotonic()) < end:
            lags.append(driver.tick(now))
            time.sleep(max(0.0, tick_s - (time.monotonic() - now)))

    run_until(time.monotonic() + args.warmup, [])
    for shard in shards:
        shard.client.config_resetstat()
    before = [shard.counters() for shard in shards]
    results0, cpu0, t0 = driver.results, time.process_time(), time.monotonic()
    calls0, pipelines0 = driver.calls, driver.pipelines
    lags: list[float] = []
    run_until(t0 + args.duration, lags)
    elapsed = time.monotonic() - t0
    after = [shard.counters() for shard in shards]
    per_shard = [{key: a[key] - b[key] for key in a} for a, b in zip(after, before, strict=True)]
    return {"elapsed": elapsed, "results": driver.results - results0, "per_shard": per_shard,
            "calls": driver.calls - calls0, "pipelines": driver.pipelines - pipelines0,
            "driver_cpu": (time.process_time() - cpu0) / elapsed,
            "driver_lag_p99_ms": round(1000 * sorted(lags)[int(0.99 * (len(lags) - 1))], 1) if lags else 0.0}


def run_k(k: int, mode: str, args: argparse.Namespace, server_cpus: set[int]) -> dict:
    """``mode`` "same-tick": every shard's pipeline goes every ``--tick-ms``, so each carries 1/K
    of the calls; "same-batch": every ``--tick-ms`` x K, so each carries as many as at K = 1."""
    shards = [Shard(i, args.nodes_per_shard, server_cpus) for i in range(k)]
    try:
        idle0 = [shard.counters()["cpu_s"] for shard in shards]
        time.sleep(args.idle)
        idle = sum(shard.counters()["cpu_s"] - c for shard, c in zip(shards, idle0, strict=True)) / args.idle
        driver = Driver(shards, args)
        w = window(shards, driver, args, args.tick_ms / 1000 * (k if mode == "same-batch" else 1))
    finally:
        for shard in shards:
            shard.close()
    cpu = sum(s["cpu_s"] for s in w["per_shard"])
    results = max(1, w["results"])
    return {
        "shards": k, "mode": mode, "sessions": args.sessions,
        "mean_pipeline": round(w["calls"] / max(1, w["pipelines"]), 1), "results": w["results"],
        "results_per_s": round(w["results"] / w["elapsed"], 1),
        "valkey_cpu_pct": round(100 * cpu / w["elapsed"], 2),
        "valkey_cpu_us_per_result": round(1e6 * cpu / results, 1),
        "valkey_cpu_pct_per_1000_sessions": round(100 * cpu / w["elapsed"] * 1000 / args.sessions, 2),
        "valkey_idle_cpu_pct": round(100 * idle, 2),
        "valkey_cpu_us_per_result_net_of_idle": round(1e6 * (cpu - idle * w["elapsed"]) / results, 1),
        "commands_per_result": round(sum(s["commands"] for s in w["per_shard"]) / results, 1),
        "evalsha_per_result": round(sum(s["evalsha"] for s in w["per_shard"]) / results, 2),
        "shard_commands": [s["commands"] for s in w["per_shard"]],
        "shard_cpu_pct": [round(100 * s["cpu_s"] / w["elapsed"], 2) for s in w["per_shard"]],
        "shard_commands_spread": spread([s["commands"] for s in w["per_shard"]]) or 0.0,
        "shard_cpu_spread": spread([s["cpu_s"] for s in w["per_shard"]]) or 0.0,
        "driver_cpu_pct": round(100 * w["driver_cpu"], 1), "driver_lag_p99_ms": w["driver_lag_p99_ms"],
        "failed_calls": driver.failures,
    }


def median_run(same: tuple[dict, ...]) -> dict:
    """One (mode, K) over the rounds: the run of median Valkey CPU per result, with every round's figure."""
    ranked = sorted(same, key=lambda r: r["valkey_cpu_us_per_result"])
    run = dict(ranked[len(ranked) // 2])
    run["rounds_cpu_us_per_result"] = [r["valkey_cpu_us_per_result"] for r in same]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000, help="real-time sessions in all (default 2000)")
    parser.add_argument("--shards", default="1,2,4", help="the K to run, comma-separated (default 1,2,4)")
    parser.add_argument("--nodes-per-shard", type=int, default=8, help="nodes registered in each shard (default 8)")
    parser.add_argument("--rate", type=float, default=0.37,
                        help="utterances per session per second (default 0.37, as `just bench` measures)")
    parser.add_argument("--utterance-s", type=float, default=1.8, help="audio per utterance, seconds (default 1.8)")
    parser.add_argument("--service-ms", type=float, default=300.0, help="median node service time (default 300)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring (default 3)")
    parser.add_argument("--idle", type=float, default=3.0,
                        help="seconds the servers' idle CPU is measured before the load (default 3)")
    parser.add_argument("--tick-ms", type=float, default=20.0, help="how often due calls are sent (default 20)")
    parser.add_argument("--modes", default="same-tick,same-batch",
                        help="same-tick: every shard's pipeline every --tick-ms (1/K of the calls each); "
                             "same-batch: every --tick-ms x K (as many calls per pipeline as at K = 1); "
                             "default both")
    parser.add_argument("--rounds", type=int, default=3,
                        help="every (mode, K) this many times, interleaved; the median run is reported (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/shards.json")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpus, driver_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else (set(), set())
    pin(0, driver_cpus)
    rounds = [[run_k(int(k), mode, args, server_cpus) for mode in args.modes.split(",") for k in args.shards.split(",")]
              for _ in range(args.rounds)]
    runs = [median_run(same) for same in zip(*rounds, strict=True)]
    for run in runs:
        first = next(r for r in runs if r["mode"] == run["mode"])
        for key in ("valkey_cpu_us_per_result", "valkey_cpu_us_per_result_net_of_idle"):
            run[key.replace("valkey_", "") + "_vs_first"] = round(run[key] / first[key], 3) if first[key] else None
    out = {"pinned": {"servers": sorted(server_cpus), "driver": sorted(driver_cpus)}, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
