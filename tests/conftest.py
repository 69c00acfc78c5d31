"""Shared fixtures: one real embedded Valkey per test run, flushed before each test that uses it,
and an in-process daemon (real sockets on loopback, real Valkey) started per test."""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import subprocess

import pytest
import trio
from hypothesis import HealthCheck, Phase, settings

from scheduler.ops.config import Settings
from scheduler.ops.embedded_redis import EmbeddedValkey, EmbeddedValkeyCluster
from scheduler.server import serve
from scheduler.store.redis_adapter import connect

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# just stress: 10,000 examples, run as two searches of STRESS_EXAMPLES=5000 (one per core)
settings.register_profile("stress", max_examples=int(os.environ.get("STRESS_EXAMPLES", 10_000)), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# just mutants: the CI examples without shrinking (a mutant only needs to fail, not to fail small)
settings.register_profile("mutants", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], print_blob=False)
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


@pytest.fixture(params=["single", "cluster"])
def single_and_cluster_url(request):
    """The shared Valkey, then the 3-master Valkey cluster, emptied: a module that runs every
    test on both says ``redis_url = single_and_cluster_url`` (with the adapter below)."""
    return request.getfixturevalue("flushed_cluster_url" if request.param == "cluster" else "flushed_single_url")


@pytest.fixture
async def adapter(redis_url):
    """The batching adapter on ``redis_url`` (layout 1)."""
    from scheduler.store.redis_adapter import RedisAdapter

    async with RedisAdapter(redis_url) as a:
        yield a


@pytest.fixture
def redis_client(redis_url):
    client = connect(redis_url, decode_responses=True)
    yield client
    client.close()


FAST = dict(pause_ms=200, heartbeat_interval_ms=500, node_ttl_ms=2000, drain_timeout_ms=3000,
            overload_lag_ms=0)  # (an in-process daemon shares its event loop with the test's clients and nodes:
# its lag is theirs too; the guard's own test sets it, and daemon processes keep the default)


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


def apt_install(*packages: str) -> None:
    """``apt-get install`` Debian's ``packages`` when we are root and have apt-get (as on CI);
    elsewhere nothing: the calling test checks what it needs and skips with the reason."""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], env=env, capture_output=True, timeout=900)


def debian_tool(binary: str, package: str) -> str:
    """The path of ``binary`` from Debian's ``package``: installed with apt-get when it is
    missing and we are root (as on CI); elsewhere the calling test is skipped with the reason."""
    path = shutil.which(binary)
    if path is None:
        apt_install(package)
        path = shutil.which(binary)
    if path is None:
        pytest.skip(f"needs Debian's {package} (apt-get install {package}); CI installs it as root")
    return path


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, for the browser tests."""
    return debian_tool("chromium", "chromium")


@pytest.fixture(scope="session")
def prometheus():
    """Debian's prometheus package: (prometheus, promtool), for the monitoring tests."""
    return debian_tool("prometheus", "prometheus"), debian_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """(cert.pem, key.pem, a client SSLContext trusting them) from a trustme CA, for 127.0.0.1."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        with open(d / "cert.pem", "ab") as f:
            f.write(extra.bytes())
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return str(d / "cert.pem"), str(d / "key.pem"), client
