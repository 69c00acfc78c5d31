"""Redis goes away and comes back empty: /readyz says 503 meanwhile, no session or node
connection dies, and scheduling works again once the node's next heartbeat has put it back."""

from __future__ import annotations

import urllib.parse

import pytest
import redis
import trio

from scheduler import keys
from scheduler.embedded_redis import EmbeddedValkey

from .helpers import peer, session, speak, start_node
from .test_e2e import Daemon
from .test_gateways import http_get


async def readyz(daemon) -> int:
    port = getattr(daemon, "admin_port", None) or urllib.parse.urlsplit(getattr(daemon, "admin_url", "")).port
    return (await trio.to_thread.run_sync(http_get, port, "/readyz"))[0]


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.1)


async def test_redis_restart_without_data(tmp_path, start_daemon, nursery):
    valkey = EmbeddedValkey(tmp_path / "valkey", persist=False)
    url = valkey.start()
    try:
        daemon = await start_daemon(redis_url=url)
        await start_node(nursery, daemon, node_id="n1", delay_ms=20)
        async with session(daemon) as s:
            await speak(s)
            await s.send(type="finalize")
            first, _ = await s.recv_until("result")
            assert first["status"] == "SUCCESS"

            valkey.stop()
            await wait_for(lambda: readyz_is(daemon, 503))
            await trio.sleep(1.0)  # heartbeats and refreshes fail meanwhile; nothing may crash
            valkey.start()
            await wait_for(lambda: readyz_is(daemon, 200))

            await node_is_back(url, "n1")
            await speak(s)
            await s.send(type="finalize")
            second, _ = await s.recv_until("result")
            assert (second["utterance_index"], second["status"]) == (1, "SUCCESS")
        assert 'scheduler_redis_up 1.0' in daemon.metrics.render().decode()
    finally:
        valkey.stop()


async def readyz_is(daemon, status: int) -> bool:
    return await readyz(daemon) == status


async def node_is_back(url: str, node_id: str) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        await wait_for(lambda: trio.to_thread.run_sync(client.exists, keys.node_info(node_id)))
    finally:
        client.close()


@pytest.mark.slow
async def test_redis_restart_with_several_processes(tmp_path, nursery):
    """Two ``scheduler serve`` processes on one Valkey that restarts empty: both say 503 on
    /readyz meanwhile, neither the session (on A) nor the node (on B) is dropped, and the
    next utterance crosses the instances again (relay stream group and Pub/Sub recovered)."""
    valkey = EmbeddedValkey(tmp_path / "valkey", persist=False)
    url = valkey.start()
    daemons = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            daemons.append(Daemon(tmp_path / name, "--redis-url", url, "--instance-id", name,
                                  "--heartbeat-interval-ms", "500", "--node-ttl-ms", "2000"))
        a, b = daemons
        await start_node(nursery, b, node_id="nb", delay_ms=20)
        async with peer(a.ws_url + "/v1/session") as s:
            await s.send(type="session_init", src_lang="zh", tgt_langs=["en"])
            assert (await s.recv())["type"] == "session_ready"
            await speak(s)
            await s.send(type="finalize")
            first, _ = await s.recv_until("result")
            assert first["translations"]["en"]["node_id"] == "nb" and first["status"] == "SUCCESS"

            valkey.stop()
            for d in daemons:
                await wait_for(lambda d=d: readyz_is(d, 503))
            await trio.sleep(1.0)
            valkey.start()
            for d in daemons:
                await wait_for(lambda d=d: readyz_is(d, 200))
            await node_is_back(url, "nb")
            await speak(s)
            await s.send(type="finalize")
            second, _ = await s.recv_until("result", timeout=15)
            assert (second["utterance_index"], second["status"]) == (1, "SUCCESS"), second
            assert all(d.proc.poll() is None for d in daemons)
    finally:
        for d in daemons:
            d.stop()
        valkey.stop()
