"""Redis goes away and comes back empty: /readyz says 503 meanwhile, no session or node
connection dies, and scheduling works again once the node's next heartbeat has put it back."""

from __future__ import annotations

import redis
import trio

from scheduler import keys
from scheduler.embedded_redis import EmbeddedValkey

from .helpers import session, speak, start_node
from .test_gateways import http_get


async def readyz(daemon) -> int:
    return (await trio.to_thread.run_sync(http_get, daemon.admin_port, "/readyz"))[0]


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

            client = redis.Redis.from_url(url, decode_responses=True)
            try:
                await wait_for(lambda: trio.to_thread.run_sync(client.exists, keys.node_info("n1")))
            finally:
                client.close()
            await speak(s)
            await s.send(type="finalize")
            second, _ = await s.recv_until("result")
            assert (second["utterance_index"], second["status"]) == (1, "SUCCESS")
        assert 'scheduler_redis_up 1.0' in daemon.metrics.render().decode()
    finally:
        valkey.stop()


async def readyz_is(daemon, status: int) -> bool:
    return await readyz(daemon) == status
