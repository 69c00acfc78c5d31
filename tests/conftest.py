"""Shared fixtures: one real embedded Valkey per test run, flushed before each test that uses it,
and an in-process daemon (real sockets on loopback, real Valkey) started per test."""

from __future__ import annotations

import functools
import os

import pytest
import trio
from hypothesis import HealthCheck, settings

from scheduler.ops.config import Settings
from scheduler.ops.embedded_redis import EmbeddedValkey, EmbeddedValkeyCluster
from scheduler.placement.redis_adapter import connect
from scheduler.server import serve

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# just stress: 10,000 examples, run as two searches of STRESS_EXAMPLES=5000 (one per core)
settings.register_profile("stress", max_examples=int(os.environ.get("STRESS_EXAMPLES", 10_000)), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def valkey_url():
    """A real valkey-server (the same binary the daemon embeds), for the whole test run."""
    server = EmbeddedValkey()
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def valkey_cluster_url():
    """A real 3-master Valkey cluster (same binary), started the first time a test asks for it."""
    cluster = EmbeddedValkeyCluster(masters=3)
    url = cluster.start()
    try:
        yield url
    finally:
        cluster.stop()


def _flushed(url: str) -> str:
    client = connect(url)
    client.flushall()  # RedisCluster: on every primary
    client.close()
    return url


@pytest.fixture
def flushed_single_url(valkey_url):
    return _flushed(valkey_url)


@pytest.fixture
def flushed_cluster_url(valkey_cluster_url):
    return _flushed(valkey_cluster_url)


@pytest.fixture
def redis_url(flushed_single_url):
    """The shared Valkey, emptied for this test. (Script tests override this to run on both
    a single server and the cluster.)"""
    return flushed_single_url


@pytest.fixture
def redis_client(redis_url):
    client = connect(redis_url, decode_responses=True)
    yield client
    client.close()


FAST = dict(pause_ms=200, heartbeat_interval_ms=500, node_ttl_ms=2000, drain_timeout_ms=3000)


@pytest.fixture
async def start_daemon(redis_url, nursery):
    """``running = await start_daemon(**settings)``: a daemon on free ports, stopped after the test."""
    started = []

    async def start(**overrides):
        values = {"ws_port": 0, "admin_port": 0, "redis_url": redis_url, **FAST, **overrides}
        running = await nursery.start(functools.partial(serve, Settings(**values), handle_signals=False))
        started.append(running)
        return running

    yield start
    for running in started:
        running.shutdown(immediate=True)
    await trio.sleep(0)


@pytest.fixture
async def daemon(start_daemon):
    return await start_daemon()
