"""Soak: 10,000 jobs dispatched and completed leave nothing behind once their done-TTL passes."""

from __future__ import annotations

import time

import pytest
import redis

from scheduler.store import keys, lua
from scheduler.store.redis_adapter import load_script_sources


def call(scripts, c):
    name, keys_, args = c
    return scripts[name](keys=keys_, args=args)


@pytest.mark.slow
def test_memory_flat_after_ten_thousand_jobs(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    scripts = {name: r.register_script(src) for name, src in load_script_sources().items()}
    now = int(time.time() * 1000)
    for i in range(8):
        call(scripts, lua.register_node(f"n{i}", [("zh-en", "zh", "en")], 64, now, "soak"))
    candidates = lua.read_candidates(r, "zh", "en")
    # warm up once so that lazily created keys (leases) exist in the baseline
    reply = call(scripts, lua.dispatch("warm:0:translate:en", "0", "warm", 0, "zh", "en", "t", "none", now, 30_000, 60_000, 0,
                                       candidates))
    call(scripts, lua.complete(str(reply[1]), "warm:0:translate:en", reply[2], 1, True, now, done_ttl_s=1))
    time.sleep(1.2)
    r.execute_command("SCAN", 0, "COUNT", 10_000)
    baseline_keys, baseline_mem = r.dbsize(), r.info("memory")["used_memory"]

    for k in range(10_000):
        now = int(time.time() * 1000)
        job_key = f"s{k % 50}:{k}:translate:en"
        reply = call(scripts, lua.dispatch(job_key, str(k + 1), f"s{k % 50}", k, "zh", "en", f"t{k}", "none", now, 30_000, 60_000,
                                           k, candidates))
        assert reply[0] == "OK"  # every job is really created
        call(scripts, lua.complete(str(reply[1]), job_key, reply[2], 1, True, now, done_ttl_s=1))

    deadline = time.monotonic() + 15
    while r.dbsize() > baseline_keys + 50 and time.monotonic() < deadline:  # session hashes (TTL 1 h) remain
        r.execute_command("SCAN", 0, "COUNT", 100_000)  # touching keys expires them lazily
        time.sleep(0.2)
    assert r.dbsize() <= baseline_keys + 50, (baseline_keys, r.dbsize())
    assert r.zcard(keys.leases()) == 0
    grown = r.info("memory")["used_memory"] - baseline_mem
    assert grown < 512 * 1024, f"memory grew by {grown} bytes after 10,000 jobs"
    r.close()
