"""A safe Redis or a loud refusal (docs/redis.md, "Memory policy"): an evicting
maxmemory-policy makes `serve` exit 2 unless --allow-evicting-redis; the embedded Valkey
never evicts. Real Valkey servers, real daemon processes."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import trio

from scheduler.ops.config import Settings
from scheduler.ops.embedded_redis import EmbeddedValkey
from scheduler.ops.redis_policy import UnsafeRedis, check_policy, memory_policies
from scheduler.server import serve
from scheduler.store import keys, layout

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def evicting_url():
    with EmbeddedValkey(extra_args=["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]) as url:
        yield url


def test_policies_are_read_from_info_of_a_server_or_a_cluster():
    assert memory_policies({"maxmemory_policy": "noeviction", "used_memory": 1}) == {"redis": "noeviction"}
    assert memory_policies({"a:1": {"maxmemory_policy": "noeviction"}, "b:2": {"maxmemory_policy": "volatile-ttl"}}) == {
        "a:1": "noeviction", "b:2": "volatile-ttl"}
    check_policy({"redis": "noeviction"}, "redis://h", allow=False)
    for policy in ("allkeys-lru", "volatile-lru", "volatile-ttl", "allkeys-random"):  # volatile-*: every key has a TTL
        with pytest.raises(UnsafeRedis, match=f"{policy}.*noeviction.*--allow-evicting-redis"):
            check_policy({"redis": policy}, "redis://:pw@h:6379", allow=False)
    with pytest.raises(UnsafeRedis) as info:
        check_policy({"redis": "allkeys-lru"}, "redis://:secret-pw@h:6379", allow=False)
    assert "secret-pw" not in str(info.value)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_exits_2_on_an_evicting_redis(evicting_url, workers):
    done = subprocess.run([sys.executable, "-m", "scheduler", "serve", "--redis-url", evicting_url, "--ws-port", "0",
                           "--admin-port", "0", "--workers", workers], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "maxmemory-policy allkeys-lru" in done.stderr and "--allow-evicting-redis" in done.stderr, done.stderr
    assert "worker_started" not in done.stdout + done.stderr  # the supervisor refuses before any worker


async def test_allowed_it_starts_and_warns(start_daemon, evicting_url, caplog):
    caplog.set_level(logging.WARNING)
    await start_daemon(redis_url=evicting_url, allow_evicting_redis=True)
    assert any(getattr(r, "event", None) == "redis_evicting_policy" for r in caplog.records)


async def test_the_embedded_valkey_never_evicts(nursery):
    settings = Settings(ws_port=0, admin_port=0, embedded_maxmemory_mb=200)
    running = await nursery.start(functools.partial(serve, settings, handle_signals=False))
    try:
        client = redis.Redis.from_url(running.redis_url, decode_responses=True)
        info = client.info("memory")
        client.close()
        assert info["maxmemory_policy"] == "noeviction" and info["maxmemory"] == 200 * 1024 * 1024
    finally:
        running.shutdown(immediate=True)


async def test_a_redis_that_refuses_info_is_used_with_a_warning(start_daemon, caplog, tmp_path):
    """Managed Redis may forbid INFO by ACL: the policy cannot be checked, the daemon says so."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EmbeddedValkey(port=port) as url:
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw-limited", "~*", "&*", "+@all", "-info")
        admin.close()
        caplog.set_level(logging.WARNING)
        running = await start_daemon(redis_url=f"redis://limited:pw-limited@127.0.0.1:{port}/0")
        assert any(getattr(r, "event", None) == "redis_policy_unknown" for r in caplog.records)
        running.shutdown(immediate=True)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_exits_2_on_a_redis_of_another_key_layout(redis_url, redis_client, workers):
    """store/layout.py: a Redis whose scheduling state has another key layout is refused, by a
    single daemon and by a supervisor before any worker; one of ours is recorded and kept."""
    redis_client.set(keys.layout(), "99")
    done = subprocess.run([sys.executable, "-m", "scheduler", "serve", "--redis-url", redis_url, "--ws-port", "0",
                           "--admin-port", "0", "--workers", workers], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert f"key layout 99, and this daemon uses layout {layout.LAYOUT}" in done.stderr, done.stderr
    assert "worker_started" not in done.stdout + done.stderr
    assert redis_client.get(keys.layout()) == "99"  # not overwritten


async def test_a_fresh_redis_gets_this_layout(start_daemon, redis_client):
    """Written at start-up, and by the health check once Redis lost its data."""
    assert redis_client.get(keys.layout()) is None
    await start_daemon()
    assert redis_client.get(keys.layout()) == layout.LAYOUT
    redis_client.flushall()
    with trio.fail_after(5):
        while redis_client.get(keys.layout()) != layout.LAYOUT:
            await trio.sleep(0.1)
