"""EVALSHA throughput: raw redis-py vs the Trio batching adapter, measured in one run.

Baselines: one synchronous redis-py caller doing EVALSHA round trips, and the same in
pipelines of 64. Then the adapter with one Trio caller and with C concurrent ones. Besides
the rates, the CPU of one lone call: raw, and through the adapter (its thread hop included),
in all and on the Trio thread alone; a lone call is what a daemon at a few hundred sessions
mostly makes (docs/performance.md, "What one utterance cannot go below"). Prints one JSON object.
Usage: python bench/adapter_throughput.py [--calls N] [--concurrency C] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import json
import time

import redis
import trio
from _common import redis_url

from scheduler.store.redis_adapter import RedisAdapter

KEYS = ["{scheduler}:job:bench", "{scheduler}:node:runtime:bench"]


def raw_round_trips(url: str, calls: int) -> tuple[float, float]:
    """Round trips per second, and CPU microseconds per call (this process)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    sha = client.script_load(open_script())
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        client.evalsha(sha, 2, *KEYS, 0)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    client.close()
    return calls / elapsed, cpu / calls * 1e6


def raw_pipelined(url: str, calls: int, depth: int = 64) -> float:
    client = redis.Redis.from_url(url, decode_responses=True)
    sha = client.script_load(open_script())
    start = time.perf_counter()
    for _ in range(calls // depth):
        pipe = client.pipeline(transaction=False)
        for _ in range(depth):
            pipe.evalsha(sha, 2, *KEYS, 0)
        pipe.execute()
    elapsed = time.perf_counter() - start
    client.close()
    return (calls // depth * depth) / elapsed


def open_script() -> str:
    from scheduler.store.redis_adapter import load_script_sources

    return load_script_sources()["cancel_task"]


async def adapter(url: str, calls: int, concurrency: int, pool_size: int) -> dict:
    async with RedisAdapter(url, pool_size=pool_size) as a:
        await a.load_scripts()
        per_task = calls // concurrency

        async def worker():
            for _ in range(per_task):
                await a.script("cancel_task", KEYS, [0])

        start, cpu, trio_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed, cpu, trio_cpu = time.perf_counter() - start, time.process_time() - cpu, time.thread_time() - trio_cpu
        done = per_task * concurrency
        return {"ops_per_s": done / elapsed, "mean_batch": a.calls_total / max(1, a.batches_total),
                "cpu_us_per_call": cpu / done * 1e6, "trio_thread_cpu_us_per_call": trio_cpu / done * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--redis-url", default=None, help="default: an embedded valkey-server")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        raw, raw_cpu_us = raw_round_trips(url, args.calls)
        piped = raw_pipelined(url, args.calls)
        single = trio.run(adapter, url, args.calls // 4, 1, args.pool_size)
        many = trio.run(adapter, url, args.calls, args.concurrency, args.pool_size)
    print(json.dumps({
        "raw_evalsha_round_trips_per_s": round(raw),
        "raw_evalsha_pipeline64_per_s": round(piped),
        "adapter_1_caller_per_s": round(single["ops_per_s"]),
        f"adapter_{args.concurrency}_callers_per_s": round(many["ops_per_s"]),
        "adapter_mean_batch": round(many["mean_batch"], 1),
        "adapter_vs_raw_round_trips": round(many["ops_per_s"] / raw, 2),
        "raw_lone_call_cpu_us": round(raw_cpu_us, 1),
        "adapter_lone_call_cpu_us": round(single["cpu_us_per_call"], 1),
        "adapter_lone_call_trio_thread_cpu_us": round(single["trio_thread_cpu_us_per_call"], 1),
        "adapter_lone_call_cpu_vs_raw": round(single["cpu_us_per_call"] / raw_cpu_us, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
