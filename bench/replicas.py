"""What ``--redis-wait-replicas`` costs: dispatch_task + complete_task pairs through the
batching adapter, against a Sentinel group of real valkey-servers on loopback (a primary, two
replicas, three sentinels; the adapter follows the primary through the sentinels, as the
daemon does), with WAIT off, WAIT 1 and WAIT 2.

Both calls of a pair are durable writes, so with WAIT each of their batches waits for the
replicas. Two loads: one caller (the round trip a single utterance sees, p50/p99 per pair)
and C concurrent callers (throughput; WAIT is paid once per batch). The variants alternate
in rounds, so that drift of this noisy box hits all of them alike; the ratio against WAIT
off is printed. The benchmark runs in one process; the Valkey servers are children on the
same cores (loopback replication: the WAIT cost here is the replicas' CPU and one extra
loopback round trip, not a network's).

Usage: python bench/replicas.py [--pairs N] [--concurrency C] [--rounds R]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import trio
from scheduling import setup_nodes

from scheduler.ops.embedded_sentinel import EmbeddedSentinelGroup
from scheduler.store import lua
from scheduler.store.redis_adapter import RedisAdapter
from scheduler.store.scheduling import SchedulingClient

VARIANTS = (0, 1, 2)


async def pairs(url: str, wait: int, count: int, concurrency: int, tag: str) -> dict:
    counter = itertools.count()
    latencies: list[float] = []
    async with RedisAdapter(url, pool_size=2, wait_replicas=wait) as a:
        await a.load_scripts()
        scheduling = SchedulingClient(a)

        async def worker():
            while (k := next(counter)) < count:
                job_key = f"{tag}:{k}:translate:en"
                started = time.perf_counter()
                reply = await scheduling.dispatch(job_key, tag, k, "zh", "en", "t", "none", lua_now(), 30_000, 60_000, k)
                await a.script(*lua.complete(str(reply[1]), job_key, reply[2], 1, True, lua_now()))
                latencies.append(time.perf_counter() - started)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"pairs_per_s": count / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def lua_now() -> int:
    return int(time.time() * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    group = EmbeddedSentinelGroup()
    with group as url:
        setup_nodes(f"redis://127.0.0.1:{group.primary_port()}", 8, 10**6)[0].close()  # 8 nodes with room for every job
        for r in range(args.rounds):
            for wait in VARIANTS:
                for callers in (1, args.concurrency):
                    count = args.pairs // 10 if callers == 1 else args.pairs
                    result = trio.run(pairs, url, wait, count, callers, f"r{r}w{wait}c{callers}")
                    runs.setdefault(f"wait{wait}_callers{callers}", []).append(result)
    out = {}
    for name, results in runs.items():
        out[name] = {key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}
    for wait in VARIANTS[1:]:
        for callers in (1, args.concurrency):
            base, this = out[f"wait0_callers{callers}"], out[f"wait{wait}_callers{callers}"]
            out[f"wait{wait}_callers{callers}"]["throughput_vs_wait0"] = round(this["pairs_per_s"] / base["pairs_per_s"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
