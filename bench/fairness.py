"""Fair share: a real-time witness session beside sessions that flood the daemon.

One `scheduler serve` process (pinned to CPU 0; this harness and Valkey on the others), one
simulated node with 64 slots answering in `--service-ms` (10 ms), one language pair. The
witness streams `--utterances` utterances in real time: 300 ms of speech ended by `is_final`,
then 700 ms of silence. Each of `--flooders` other sessions sends 100 ms of speech and a
`finalize`, again and again, as fast as the daemon reads them (it reads their results too,
so that it is never closed as a slow client). Reported per phase: the witness's latency
(result received - its `is_final` sent: node service included) p50 / p99 / max and its
result statuses; the utterances the flooders got finalized and answered; the daemon's CPU.

Phases (one run, same box, same half hour): `alone` (the witness only), `flooded` (with the
flooders, the daemon's defaults: sessions in turn, `--max-jobs-per-session`,
`--max-realtime-factor`) and, with `--unbounded`, `flooded-unbounded` (the same flooders,
`--max-jobs-per-session 0 --max-realtime-factor 0`: lanes still take sessions in turn).

Usage: python bench/fairness.py [--utterances 40] [--flooders 3] [--unbounded] [--out bench/results/fairness.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import redis
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402
    DAEMON_CPUS,
    PAIR,
    RATE,
    Record,
    harness_off_the_daemon,
    ms,
    pct,
    proc_stats,
    sim_node,
    start_daemon,
)

from scheduler.session.audio import silence, tone  # noqa: E402

SPEECH = tone(100, RATE, amplitude=0.3)
QUIET = silence(100, RATE)
PHASES = {"alone": [], "flooded": [], "flooded-unbounded": ["--max-jobs-per-session", "0", "--max-realtime-factor", "0"]}


async def witness(url: str, utterances: int, out: dict[str, Any]) -> None:
    """Real time: 300 ms of speech ended by is_final, 700 ms of silence; latency per result."""
    sent: dict[int, float] = {}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    async with open_websocket_url(url + "/v1/session") as ws:
        await ws.send_message(json.dumps({"type": "session_init", "src_lang": PAIR[0], "tgt_langs": [PAIR[1]]}))
        assert json.loads(await ws.get_message())["type"] == "session_ready"

        async def receive() -> None:
            while len(latencies) < utterances:
                msg = json.loads(await ws.get_message())
                if msg["type"] == "result":
                    latencies.append(time.perf_counter() - sent[msg["utterance_index"]])
                    statuses[msg["status"]] = statuses.get(msg["status"], 0) + 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            t = trio.current_time()
            for index in range(utterances):
                for k in range(10):  # 3 frames of speech (the last one final), 7 of silence
                    t += 0.1
                    await trio.sleep_until(t)
                    if k < 3:
                        frame = json.dumps({"type": "audio_chunk", "data": _b64(SPEECH), "is_final": k == 2})
                        if k == 2:
                            sent[index] = time.perf_counter()
                        await ws.send_message(frame)
                    else:
                        await ws.send_message(QUIET)
            with trio.move_on_after(35):
                while len(latencies) < utterances:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    out.update(latency_ms={"p50": ms(pct(latencies, 50)), "p99": ms(pct(latencies, 99)),
                           "max": ms(max(latencies)) if latencies else None},
               results=len(latencies), status=statuses)


def _b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


async def flooder(url: str, stop: trio.Event, counts: dict[str, int]) -> None:
    """100 ms of speech and a finalize, as fast as the daemon reads them; its results read too."""
    try:
        async with open_websocket_url(url + "/v1/session") as ws:
            await ws.send_message(json.dumps({"type": "session_init", "src_lang": PAIR[0], "tgt_langs": [PAIR[1]]}))
            assert json.loads(await ws.get_message())["type"] == "session_ready"

            async def receive() -> None:
                while True:
                    kind = json.loads(await ws.get_message())["type"]
                    if kind in ("utterance_finalized", "result"):
                        counts[kind] = counts.get(kind, 0) + 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                finalize = json.dumps({"type": "finalize"})
                while not stop.is_set():
                    await ws.send_message(SPEECH)
                    await ws.send_message(finalize)
                nursery.cancel_scope.cancel()
    except ConnectionClosed:
        counts["closed"] = counts.get("closed", 0) + 1


async def phase(args: argparse.Namespace, name: str, redis_url: str) -> dict[str, Any]:
    redis.Redis.from_url(redis_url).flushall()
    daemon_args = argparse.Namespace(pause_ms=800, redis_pool_size=4, daemon_arg=[*args.daemon_arg, *PHASES[name]],
                                     out=str(Path(args.out).with_suffix(f".{name}.json")))
    daemon, url, _admin = start_daemon(daemon_args, redis_url, cpus=DAEMON_CPUS if args.pin else None)
    out: dict[str, Any] = {"phase": name}
    try:
        rec = Record()
        async with trio.open_nursery() as nodes:
            nodes.start_soon(sim_node, url, "n1", 64, args.service_ms, 0.0, 0.0, rec, random.Random(1))
            await trio.sleep(0.5)
            cpu0, t0 = proc_stats(daemon.pid)[0], time.perf_counter()
            stop, counts = trio.Event(), {}
            async with trio.open_nursery() as sessions:
                if name != "alone":
                    for _ in range(args.flooders):
                        sessions.start_soon(flooder, url, stop, counts)
                    await trio.sleep(1.0)  # the flood is on before the witness starts
                await witness(url, args.utterances, out)
                stop.set()
            out["daemon_cpu_pct_of_core"] = round((proc_stats(daemon.pid)[0] - cpu0) / (time.perf_counter() - t0) * 100, 1)
            out["flooders"] = counts
            nodes.cancel_scope.cancel()
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"args": vars(args), "phases": []}
    with harness_off_the_daemon(args.pin) as (redis_url, _cpus):
        for name in ["alone", "flooded", *(["flooded-unbounded"] if args.unbounded else [])]:
            print(f"{name} ...", file=sys.stderr)
            out["phases"].append(await phase(args, name, redis_url))
            print(json.dumps(out["phases"][-1]), file=sys.stderr)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=40, help="the witness's utterances, one a second (default 40)")
    p.add_argument("--flooders", type=int, default=3, help="flooding sessions (default 3)")
    p.add_argument("--service-ms", type=float, default=10.0, help="the node's answer time (default 10)")
    p.add_argument("--unbounded", action="store_true", help="add a flooded phase with the session bounds off")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the daemon to CPU 0")
    p.add_argument("--daemon-arg", action="append", default=[], metavar="ARG", help="extra flag for the daemon (repeatable)")
    p.add_argument("--out", default="bench/results/fairness.json")
    return p


def main() -> None:
    args = parser().parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data = trio.run(run, args)
    Path(args.out).write_text(json.dumps(data, indent=2))
    print(json.dumps(data["phases"], indent=2))


if __name__ == "__main__":
    main()
