"""Overload, with and without admission control: one daemon process offered about twice what it
carries, clients arriving over time, in one period (A/B, alternating, same box, same half hour).

Per phase a fresh `scheduler serve` process on the same Valkey (flushed), pinned to CPU 0;
this harness (clients, simulated nodes) and Valkey stay off it, on the other CPUs, so the
load generator's own CPU does not take the daemon's. `--offered` real-time clients (the
client library, as in bench/load.py) arrive at uniformly random times over `--ramp` seconds;
each, once admitted, talks for 0.5-1.5 x `--session-s` seconds (at most until the phase ends,
`--ramp` + `--hold` seconds after it began) and leaves. Modes:

- `admission`: `--max-sessions M` (and the overload guard at its default): past M, a new
  session gets SERVER_FULL and the client waits its retry_after_ms and tries again (with
  jitter), as the client library does, until the phase ends;
- `open`: no limit, no guard (`--max-sessions 0 --overload-lag-ms 0`): every client is
  admitted at once, whatever it costs the others.

Reported per phase: sessions offered, admitted (and how long admission took), refusals by
reason (the daemon's own counter), the daemon overhead per utterance (bench/load.py: result
received - finalize - node service - order wait) p50/p99 for the admitted sessions, result
statuses, the daemon's CPU (% of a core) and its event-loop lag.

Usage: python bench/overload.py [--offered 200] [--max-sessions 100] [--ramp 20] [--hold 40] [--rounds 1]
Writes JSON to --out (default bench/results/overload.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402
    DAEMON_CPUS,
    PAIR,
    RATE,
    Record,
    harness_off_the_daemon,
    latencies,
    loop_lag_ms,
    ms,
    pct,
    proc_stats,
    sim_node,
    start_daemon,
    traffic_arguments,
)

from scheduler.client import SessionFailed, connect  # noqa: E402
from scheduler.protocol import Busy, Error, Result, UtteranceFinalized  # noqa: E402
from scheduler.session.audio import silence, tone  # noqa: E402

MODES = {"admission": lambda a: ["--max-sessions", str(a.max_sessions)],
         "open": lambda a: ["--max-sessions", "0", "--overload-lag-ms", "0"]}

class Audio:
    def __init__(self, chunk_ms: int) -> None:
        self.speech = tone(chunk_ms, RATE, amplitude=0.3)
        self.silence = silence(chunk_ms, RATE)


async def client(url: str, n: int, args: argparse.Namespace, audio: Audio, rec: Record, start_active: trio.Event,
                 stop_at: list[float], rng: random.Random, reconnects: int = 0,
                 on_ready: Callable[[], None] = lambda: None) -> None:
    """One real-time client, on the client library (scheduler.client; by default no resume:
    a broken session counts as an error; with ``reconnects`` a refused one waits the daemon's
    retry_after_ms and tries again, that many times)."""
    chunk = args.chunk_ms / 1000
    try:
        asked = trio.current_time()
        async with connect(url, src_lang=PAIR[0], tgt_langs=[PAIR[1]], sample_rate=RATE, reconnects=reconnects) as session:
            sid = session.session_id
            rec.ready += 1
            rec.admit_wait.append(trio.current_time() - asked)
            on_ready()

            async def receive() -> None:
                async for msg in session:
                    now = time.perf_counter()
                    if isinstance(msg, UtteranceFinalized):
                        rec.final.setdefault((sid, msg.utterance_index), (now, msg.reason))
                    elif isinstance(msg, Result):
                        rec.result[(sid, msg.utterance_index)] = (now, msg.status)
                        rec.result_times.append(now)
                    elif isinstance(msg, Busy):
                        rec.busy += 1
                    elif isinstance(msg, Error):
                        rec.error(msg.code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await _talk(session, sid, args, audio, rec, start_active, stop_at, rng, chunk)
                # close: the daemon delivers the outstanding results, then session_closed ends
                # receive(); give up after a generous bound
                await session.close()
                nursery.cancel_scope.deadline = trio.current_time() + args.service_ms / 1000 * 20 + 10
    except SessionFailed as exc:
        rec.error(exc.error.code if exc.error else "CONNECTION_LOST")


async def _talk(session, sid: str, args: argparse.Namespace, audio: Audio, rec: Record, start_active: trio.Event,
                stop_at: list[float], rng: random.Random, chunk: float) -> None:
    """Utterances of 0.6-3 s of speech until ``stop_at``, each ended by is_final or a pause."""
    index = 0  # next utterance index this client will finalize
    await start_active.wait()
    await trio.sleep(rng.random() * 1.0)  # spread the phase of the frames
    t = trio.current_time()
    while t < stop_at[0]:
        speech = int(rng.uniform(0.6, 3.0) / chunk)
        final = rng.random() < args.final_prob
        for k in range(speech):
            t += chunk
            await trio.sleep_until(t)
            rec.send_lag.append(trio.current_time() - t)
            if final and k == speech - 1:
                rec.final[(sid, index)] = (time.perf_counter(), "is_final")
            await session.send_audio(audio.speech, is_final=final and k == speech - 1)
        index += 1
        gap = rng.uniform(0.2, 1.0) if final else (args.pause_ms / 1000 + rng.uniform(0.3, 1.0))
        for _ in range(max(1, int(gap / chunk))):
            t += chunk
            await trio.sleep_until(t)
            await session.send_audio(audio.silence)


def refusals(admin_port: int) -> dict[str, int]:
    """The daemon's scheduler_sessions_refused_total by reason."""
    out: dict[str, int] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("scheduler_sessions_refused_total{"):
                    reason = line.split('reason="', 1)[1].split('"', 1)[0]
                    out[reason] = int(float(line.rsplit(" ", 1)[1]))
    except OSError:
        pass
    return out


async def phase(args: argparse.Namespace, mode: str, redis_url: str) -> dict[str, Any]:
    redis.Redis.from_url(redis_url).flushall()
    phase_args = argparse.Namespace(**{**vars(args), "daemon_arg": [*args.daemon_arg, *MODES[mode](args)],
                                       "out": str(Path(args.out).with_suffix(f".{mode}.json"))})
    daemon, url, admin_port = start_daemon(phase_args, redis_url, cpus=DAEMON_CPUS)
    rec, rng, timeline = Record(), random.Random(args.seed), []
    try:
        audio = Audio(args.chunk_ms)
        start = trio.Event()
        start.set()
        async with trio.open_nursery() as nodes:
            for i in range(args.nodes):
                nodes.start_soon(sim_node, url, f"sim-{i}", args.max_jobs, args.service_ms, args.service_sigma, 0.0, rec,
                                 random.Random(rng.random()))
            await trio.sleep(1.0)
            cpu0, _ = proc_stats(daemon.pid)
            t0 = trio.current_time()
            stop_at = [t0 + args.ramp + args.hold]
            async with trio.open_nursery() as clients:

                async def arrive(n: int, arrival: random.Random) -> None:
                    """Arrive, and keep asking until admitted or the phase ends (then it gives up)."""
                    await trio.sleep(arrival.uniform(0, args.ramp))
                    stop = [stop_at[0]]  # its own end: --session-s (0.5-1.5 x) after it is admitted, at most the phase's
                    length = arrival.uniform(0.5, 1.5) * args.session_s

                    def admitted() -> None:
                        asking.deadline = float("inf")
                        stop[0] = min(stop_at[0], trio.current_time() + length)

                    with trio.CancelScope(deadline=stop_at[0]) as asking:
                        await client(url, n, phase_args, audio, rec, start, stop, arrival, reconnects=10**6, on_ready=admitted)

                for n in range(args.offered):
                    clients.start_soon(arrive, n, random.Random(rng.random()))
                last, last_t = cpu0, t0
                while trio.current_time() < stop_at[0]:
                    await trio.sleep(1.0)
                    cpu, now = proc_stats(daemon.pid)[0], trio.current_time()
                    timeline.append({"t": round(now - t0, 1), "daemon_cpu_pct": round((cpu - last) / (now - last_t) * 100, 1),
                                     "admitted": rec.ready, "loop_lag_ms": await trio.to_thread.run_sync(loop_lag_ms, admin_port)})
                    last, last_t = cpu, now
                cpu1, t1 = proc_stats(daemon.pid)[0], trio.current_time()
                refused = await trio.to_thread.run_sync(refusals, admin_port)
                clients.cancel_scope.deadline = trio.current_time() + args.service_ms / 1000 * 20 + 10  # the last answers
            nodes.cancel_scope.cancel()
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
    _, _, overhead, _ = latencies(rec)
    statuses: dict[str, int] = {}
    for _, status in rec.result.values():
        statuses[status] = statuses.get(status, 0) + 1
    lags = sorted(x["loop_lag_ms"] for x in timeline if x["loop_lag_ms"] is not None)
    return {
        "mode": mode, "offered": args.offered, "admitted": rec.ready,
        "max_sessions": args.max_sessions if mode == "admission" else 0,
        "admit_wait_s": {"p50": round(pct(rec.admit_wait, 50) or 0, 2), "p99": round(pct(rec.admit_wait, 99) or 0, 2)},
        "refused": refused,
        "utterances": len(overhead),
        "daemon_overhead_ms": {"p50": ms(pct(overhead, 50)), "p99": ms(pct(overhead, 99))},
        "result_status": statuses,
        "daemon_cpu_pct_of_core": round((cpu1 - cpu0) / (t1 - t0) * 100, 1),
        "loop_lag_ms": {"p50": lags[len(lags) // 2] if lags else None, "max": lags[-1] if lags else None},
        "harness_send_lag_ms": {"p50": ms(pct(rec.send_lag, 50)), "p99": ms(pct(rec.send_lag, 99))},
        "errors": dict(rec.errors),
        "timeline": timeline,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out: dict[str, Any] = {"args": vars(args), "phases": []}
    with harness_off_the_daemon() as (redis_url, harness_cpus):
        out["host"] = {"cpus": os.cpu_count(), "daemon_cpus": sorted(DAEMON_CPUS), "harness_cpus": harness_cpus}
        for r in range(args.rounds):
            for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
                print(f"round {r + 1}: {mode} ...", file=sys.stderr)
                result = await phase(args, mode, redis_url)
                print(json.dumps({k: v for k, v in result.items() if k != "timeline"}), file=sys.stderr)
                out["phases"].append(result)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offered", type=int, default=200, help="clients arriving per phase (default 200)")
    p.add_argument("--max-sessions", type=int, default=100, help="the admission phase's --max-sessions (default 100)")
    p.add_argument("--ramp", type=float, default=20.0, help="clients arrive over this many seconds (default 20)")
    p.add_argument("--hold", type=float, default=40.0, help="then the phase goes on this long (default 40)")
    p.add_argument("--session-s", type=float, default=30.0,
                   help="an admitted client talks 0.5-1.5 times this long, then leaves (default 30)")
    p.add_argument("--rounds", type=int, default=1, help="A/B rounds, the order alternating (default 1)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["admission", "open"],
                   help="the phases of a round, in order (default admission,open; the next round reverses it)")
    traffic_arguments(p, nodes=4)
    p.add_argument("--out", default="bench/results/overload.json")
    return p


def main() -> None:
    args = parser().parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = trio.run(run, args)
    data["wall_s"] = round(time.time() - started)
    Path(args.out).write_text(json.dumps(data, indent=2))
    print(json.dumps([{k: v for k, v in ph.items() if k != "timeline"} for ph in data["phases"]], indent=2))


if __name__ == "__main__":
    main()
