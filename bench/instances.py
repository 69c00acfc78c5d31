"""Several instances: throughput and result latency with 1, 2 and 4 `scheduler serve`
processes on one Valkey, in one run, as a ratio to one instance (issue 6, docs/scaling.md).

For each instance count N: a fresh Valkey (a valkey-server child), N daemon processes,
`--nodes` simulated nodes and `--sessions` clients spread round-robin over the instances
(so most jobs and answers cross instances through the relay, as behind a load balancer).
Each client runs a closed loop, as fast as the system answers: one utterance (`--speech-ms`
of speech in one `audio_chunk` with `is_final`), up to `--window` utterances in flight, for
`--duration` seconds. Nodes answer after `--service-ms`. Measured: results/s, result latency
(is_final sent -> result received) p50/p99, the CPU of the daemons, Valkey and this
harness (% of one core), and the share of jobs that crossed instances.

This box has 2 cores shared by the daemons, Valkey and this harness: what limits the ratio
is printed with the numbers (docs/scaling.md).

Usage: python bench/instances.py [--counts 1,2,4] [--sessions 60] [--duration 10]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import PAIR, RATE, Record, free_port, ms, pct, proc_stats, sim_node  # noqa: E402

from scheduler.ops.embedded_redis import EmbeddedValkey  # noqa: E402
from scheduler.session.audio import tone  # noqa: E402


def start_instances(n: int, redis_url: str, out_dir: Path, extra: list[str] = ()) -> list[tuple[subprocess.Popen, str]]:
    started = []
    for i in range(n):
        ws_port, admin_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "scheduler", "serve", "--ws-port", str(ws_port), "--admin-port", str(admin_port),
               "--redis-url", redis_url, "--instance-id", f"bench-{i}", "--log-level", "warning",
               "--idle-timeout-ms", "600000", *extra]
        with open(out_dir / f"instances-{n}-{i}.daemon.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        started.append((proc, f"ws://127.0.0.1:{ws_port}", admin_port))
    ready = []
    for proc, url, admin_port in started:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("an instance did not become ready in 30 s")
            time.sleep(0.1)
        ready.append((proc, url))
    return ready


async def closed_loop_client(url: str, args: argparse.Namespace, frame: str, rec: Record, stop_at: float,
                             latencies: list[float]) -> None:
    async with open_websocket_url(url + "/v1/session") as ws:
        await ws.send_message(json.dumps({"type": "session_init", "src_lang": PAIR[0], "tgt_langs": [PAIR[1]],
                                          "sample_rate": RATE}))
        ready = json.loads(await ws.get_message())
        if ready.get("type") != "session_ready":
            rec.error(ready.get("code", "?"))
            return
        rec.ready += 1
        sent: dict[int, float] = {}
        room = trio.Semaphore(args.window)
        sending_done = trio.Event()

        async def send() -> None:
            index = 0
            while trio.current_time() < stop_at:
                await room.acquire()
                sent[index] = time.perf_counter()
                await ws.send_message(frame)
                index += 1
            sending_done.set()
            await ws.send_message(json.dumps({"type": "close_session"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with contextlib.suppress(ConnectionClosed):
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg["type"] == "result":
                        now = time.perf_counter()
                        latencies.append(now - sent.pop(msg["utterance_index"]))
                        if not sending_done.is_set():
                            rec.result_times.append(now)
                        room.release()
                    elif msg["type"] == "session_closed":
                        break
            nursery.cancel_scope.cancel()


async def one_count(n: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    valkey = EmbeddedValkey()
    redis_url = valkey.start()
    instances = start_instances(n, redis_url, out_dir, args.daemon_arg)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    rec, latencies = Record(), []
    rng = random.Random(args.seed)
    pcm = tone(args.speech_ms, RATE, amplitude=0.3)
    frame = json.dumps({"type": "audio_chunk", "data": base64.b64encode(pcm).decode(), "is_final": True})
    urls = [url for _, url in instances]
    pids = [proc.pid for proc, _ in instances]
    try:
        async with trio.open_nursery() as nodes:
            for i in range(args.nodes):
                nodes.start_soon(sim_node, urls[i % n], f"sim-{i}", args.max_jobs, args.service_ms, 0.2, 0.0, rec,
                                 random.Random(rng.random()))
            await trio.sleep(1.0)
            cpu0 = [proc_stats(p)[0] for p in pids]
            vcpu0 = proc_stats(valkey.pid)[0]
            self0 = time.process_time()
            relayed0 = int(r.info("commandstats").get("cmdstat_xadd", {}).get("calls", 0))
            t0 = time.perf_counter()
            stop_at = trio.current_time() + args.duration
            async with trio.open_nursery() as clients:
                for s in range(args.sessions):
                    clients.start_soon(closed_loop_client, urls[s % n], args, frame, rec, stop_at, latencies)
                await trio.sleep_until(stop_at)
                active_s = time.perf_counter() - t0
                cpu = sum(proc_stats(p)[0] - c for p, c in zip(pids, cpu0, strict=True))
                vcpu = proc_stats(valkey.pid)[0] - vcpu0
                harness = time.process_time() - self0
                relayed = int(r.info("commandstats").get("cmdstat_xadd", {}).get("calls", 0)) - relayed0
                clients.cancel_scope.deadline = trio.current_time() + 15  # the last answers
            nodes.cancel_scope.cancel()
    finally:
        for proc, _ in instances:
            proc.terminate()
        for proc, _ in instances:
            proc.wait(timeout=20)
        r.close()
        valkey.stop()
    results = len(rec.result_times)
    return {
        "instances": n,
        "sessions": rec.ready,
        "results_per_s": round(results / active_s, 1),
        "result_latency_ms": {"p50": ms(pct(latencies, 50)), "p99": ms(pct(latencies, 99))},
        "daemons_cpu_pct_of_core": round(cpu / active_s * 100, 1),
        "results_per_daemon_cpu_s": round(results / max(cpu, 1e-9), 1),
        "valkey_cpu_pct_of_core": round(vcpu / active_s * 100, 1),
        "harness_cpu_pct_of_core": round(harness / active_s * 100, 1),
        "jobs_relayed_share": round(relayed / max(1, results), 3),
        "errors": dict(rec.errors),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(c) for c in args.counts.split(",")):
        print(f"{n} instance(s) ...", file=sys.stderr)
        rows.append(await one_count(n, args, out_dir))
        print(json.dumps(rows[-1]), file=sys.stderr)
    base = rows[0]["results_per_s"] or 1
    for row in rows:
        row["throughput_ratio_to_first"] = round(row["results_per_s"] / base, 2)
    return {"args": vars(args), "host": {"cpus": os.cpu_count()}, "runs": rows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1,2,4", help="instance counts to run, first one is the base (default 1,2,4)")
    p.add_argument("--sessions", type=int, default=60, help="client sessions (default 60)")
    p.add_argument("--window", type=int, default=4, help="utterances in flight per session (default 4)")
    p.add_argument("--speech-ms", type=int, default=300, help="speech per utterance (default 300)")
    p.add_argument("--nodes", type=int, default=8, help="simulated nodes (default 8)")
    p.add_argument("--max-jobs", type=int, default=200, help="max_jobs per node (default 200)")
    p.add_argument("--service-ms", type=float, default=20.0, help="median node service time (default 20)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per instance count (default 10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every daemon, repeatable (--daemon-arg=--locality-slack=0)")
    p.add_argument("--out", default="bench/results/instances.json")
    return p


def main() -> None:
    args = parser().parse_args()
    data = trio.run(run, args)
    Path(args.out).write_text(json.dumps(data, indent=2))
    print(json.dumps(data["runs"], indent=2))


if __name__ == "__main__":
    main()
