"""Scheduling core: load balance and dispatch+complete throughput, against a real Valkey.

1. Balance: 8 equal nodes (max_jobs 4), 1,000 jobs, up to 24 in flight, the oldest or a
   random in-flight job completing whenever the window is full. Reports jobs per node and
   the stddev as a fraction of the mean (target < 10 %).
2. Throughput: dispatch_task + complete_task pairs per second, (a) raw: one synchronous
   redis-py caller doing the two EVALSHA round trips, (b) through the Trio batching
   adapter with C concurrent callers; both in this run, and their ratio (target >= 50 %).

Usage: python bench/scheduling.py [--jobs N] [--pairs N] [--concurrency C] [--redis-url URL]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time

import redis
import trio
from _common import redis_url

from scheduler.store import lua
from scheduler.store.redis_adapter import RedisAdapter, load_script_sources
from scheduler.store.scheduling import SchedulingClient

PAIR = [("zh-en", "zh", "en")]


def now_ms() -> int:
    return int(time.time() * 1000)


def run_sync(client: redis.Redis, scripts: dict, call: lua.Call):
    name, keys_, args = call
    return scripts[name](keys=keys_, args=args)


def setup_nodes(url: str, n: int, max_jobs: int) -> tuple[redis.Redis, dict]:
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushall()
    scripts = {name: client.register_script(src) for name, src in load_script_sources().items()}
    for i in range(n):
        run_sync(client, scripts, lua.register_node(f"n{i}", PAIR, max_jobs, now_ms(), "bench"))
    return client, scripts


def balance(url: str, jobs: int, nodes: int = 8, max_jobs: int = 4, window: int = 24, seed: int = 1) -> dict:
    client, scripts = setup_nodes(url, nodes, max_jobs)
    candidates = lua.read_candidates(client, "zh", "en")
    rng = random.Random(seed)
    in_flight: list[tuple[str, str, str]] = []
    per_node = {f"n{i}": 0 for i in range(nodes)}
    for k in range(jobs):
        if len(in_flight) >= window:
            job_id, job_key, node = in_flight.pop(rng.randrange(len(in_flight)))
            run_sync(client, scripts, lua.complete(job_id, job_key, node, 1, True, now_ms()))
        job_key = f"s:{k}:translate:en"
        reply = run_sync(client, scripts, lua.dispatch(job_key, str(k), "s", k, "zh", "en", f"t{k}", "none",
                                                       now_ms(), 30_000, 60_000, rng.getrandbits(30), candidates))
        job_id, node = str(reply[1]), reply[2]
        per_node[node] += 1
        in_flight.append((job_id, job_key, node))
    client.close()
    counts = list(per_node.values())
    mean = statistics.mean(counts)
    return {"jobs_per_node": counts, "stddev_over_mean": round(statistics.pstdev(counts) / mean, 4)}


def raw_pairs(url: str, pairs: int) -> float:
    client, scripts = setup_nodes(url, 8, 10_000)
    candidates = lua.read_candidates(client, "zh", "en")
    start = time.perf_counter()
    for k in range(pairs):
        job_key = f"r:{k}:translate:en"
        reply = run_sync(client, scripts, lua.dispatch(job_key, f"r{k}", "r", k, "zh", "en", "t", "none",
                                                       now_ms(), 30_000, 60_000, k, candidates))
        run_sync(client, scripts, lua.complete(str(reply[1]), job_key, reply[2], 1, True, now_ms()))
    elapsed = time.perf_counter() - start
    client.close()
    return pairs / elapsed


async def adapter_pairs(url: str, pairs: int, concurrency: int, pool_size: int) -> dict:
    setup_nodes(url, 8, 10_000)[0].close()
    counter = itertools.count()
    async with RedisAdapter(url, pool_size=pool_size) as a:
        await a.load_scripts()
        scheduling = SchedulingClient(a)

        async def worker():
            while (k := next(counter)) < pairs:
                job_key = f"a:{k}:translate:en"
                reply = await scheduling.dispatch(job_key, "a", k, "zh", "en", "t", "none", now_ms(), 30_000, 60_000, k)
                await a.script(*lua.complete(str(reply[1]), job_key, reply[2], 1, True, now_ms()))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - start
        return {"pairs_per_s": pairs / elapsed, "mean_batch": a.calls_total / max(1, a.batches_total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--redis-url", default=None, help="default: an embedded valkey-server")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        bal = balance(url, args.jobs)
        raw = raw_pairs(url, args.pairs)
        adapted = trio.run(adapter_pairs, url, args.pairs, args.concurrency, args.pool_size)
    print(json.dumps({
        "balance_jobs": args.jobs,
        "balance_jobs_per_node": bal["jobs_per_node"],
        "balance_stddev_over_mean": bal["stddev_over_mean"],
        "raw_dispatch_complete_pairs_per_s": round(raw),
        f"adapter_{args.concurrency}_callers_pairs_per_s": round(adapted["pairs_per_s"]),
        "adapter_mean_batch": round(adapted["mean_batch"], 1),
        "adapter_vs_raw": round(adapted["pairs_per_s"] / raw, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
