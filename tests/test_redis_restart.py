"""Redis goes away and comes back empty: /readyz says 503 meanwhile, no session or node
connection dies, and scheduling works again once the node's next heartbeat has put it back."""

from __future__ import annotations

import contextlib
import urllib.parse

import pytest
import redis
import trio

from scheduler.jobs import job_key_for
from scheduler.ops.embedded_redis import EmbeddedValkey
from scheduler.store import keys

from .helpers import peer, session, speak, start_node, token_of
from .test_e2e import Daemon, log_events
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


async def test_sessions_stay_resumable_after_redis_loses_its_data(tmp_path, start_daemon, nursery, monkeypatch):
    """Redis restarts empty while an utterance is owed its result (its job on the node, or not
    yet placed): the session's journal is written again (finalized count, the owed utterance),
    so a resume still finds it and numbers on; the job is placed again once the node is
    registered again (NO_POOL_FOR_LANG_PAIR meanwhile is waited out, not a failure) and answered."""
    valkey = EmbeddedValkey(tmp_path / "valkey", persist=False)
    url = valkey.start()
    try:
        daemon = await start_daemon(redis_url=url, result_deadline_ms=8000)
        await start_node(nursery, daemon, node_id="n1", delay_ms=2500)
        async with session(daemon) as s:
            sid = s.ready["session_id"]
            await speak(s)
            await s.send(type="finalize")
            await s.recv_until("utterance_finalized")
            valkey.stop()
            await wait_for(lambda: readyz_is(daemon, 503))
            valkey.start()
            await wait_for(lambda: readyz_is(daemon, 200))
            client = redis.Redis.from_url(url, decode_responses=True)
            try:
                await wait_for(lambda: trio.to_thread.run_sync(client.hexists, keys.session(sid), "u:0"))
                assert client.hget(keys.session(sid), "finalized") == "1"
                # the job Redis lost is placed again (before the resume below raises the epoch)
                await wait_for(lambda: trio.to_thread.run_sync(client.exists, keys.jobkey(job_key_for(sid, 0, "en"))))
            finally:
                client.close()
            async with peer(daemon.ws_url + "/v1/session") as r:  # takes the session over (its jobs stay)
                await r.send(type="session_init", src_lang="zh", tgt_langs=["en"], session_id=sid,
                                  resume_token=token_of(sid), resume_from=0)
                ready = await r.recv()
                assert (ready["type"], ready["resumed"], ready["next_utterance_index"]) == ("session_ready", True, 1), ready
                result, _ = await r.recv_until("result", timeout=10)
                assert (result["utterance_index"], result["status"]) == (0, "SUCCESS"), result
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


@contextlib.contextmanager
def two_daemons(tmp_path, *flags: str):
    """A private Valkey (so it can be stopped) and two ``scheduler serve`` processes "a" and
    "b" on it; yields (valkey, url, a, b) and stops all three afterwards."""
    valkey = EmbeddedValkey(tmp_path / "valkey", persist=False)
    url = valkey.start()
    daemons = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            daemons.append(Daemon(tmp_path / name, "--redis-url", url, "--instance-id", name, "--heartbeat-interval-ms", "500",
                                  "--node-ttl-ms", "2000", *flags))
        yield valkey, url, daemons[0], daemons[1]
    finally:
        for d in daemons:
            d.stop()
        valkey.stop()


@pytest.mark.slow
async def test_redis_restart_with_several_processes(tmp_path, nursery):
    """Two ``scheduler serve`` processes on one Valkey that restarts empty: both say 503 on
    /readyz meanwhile, neither the session (on A) nor the node (on B) is dropped, and the
    next utterance crosses the instances again (relay stream group and Pub/Sub recovered)."""
    with two_daemons(tmp_path) as (valkey, url, a, b):
        daemons = [a, b]
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


@pytest.mark.slow
async def test_redis_killed_with_cross_instance_jobs_in_flight(tmp_path, nursery):
    """Redis is killed while jobs placed by A (the sessions' instance) run on B's slow node and
    answers are crossing, and stays away past the leases and result deadlines (so A's lanes
    give up and release jobs, its leases expire, its releases fail): no daemon exits, no
    connection is dropped, every session gets one result per utterance, in order, and once
    Redis is back (empty) every new utterance is answered."""
    with two_daemons(tmp_path, "--result-deadline-ms", "2500", "--job-lease-ms", "1000") as (valkey, url, a, b):
        daemons = [a, b]
        await start_node(nursery, b, node_id="nb", delay_ms=700, max_jobs=2)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(peer(a.ws_url + "/v1/session")) for _ in range(3)]
            for s in clients:
                await s.send(type="session_init", src_lang="zh", tgt_langs=["en"])
                assert (await s.recv())["type"] == "session_ready"
            for _ in range(2):  # 6 jobs for 2 slots: answers crossing, jobs in flight and queued
                for s in clients:
                    await speak(s)
                    await s.send(type="finalize")
            await trio.sleep(0.3)
            valkey.stop()
            await trio.sleep(4.0)  # past every lease and result deadline
            assert all(d.proc.poll() is None for d in daemons), [d.log_path.read_text()[-3000:] for d in daemons]
            valkey.start()
            for d in daemons:
                await wait_for(lambda d=d: readyz_is(d, 200))
            await node_is_back(url, "nb")
            for s in clients:
                got = [r["utterance_index"] for r in await results(s, 2)]
                assert got == [0, 1]
                await speak(s)
                await s.send(type="finalize")
            for s in clients:
                (third,) = await results(s, 1, timeout=15)
                assert (third["utterance_index"], third["status"]) == (2, "SUCCESS"), third
        await trio.sleep(1.5)  # the lease / release retries that follow must not end a daemon either
        assert all(d.proc.poll() is None for d in daemons), [d.log_path.read_text()[-3000:] for d in daemons]


async def results(s, count: int, timeout: float = 10.0) -> list[dict]:
    got = []
    while len(got) < count:
        msg, _ = await s.recv_until("result", timeout=timeout)
        got.append(msg)
    return got


async def test_job_ids_are_never_reused_after_redis_lost_its_data(start_daemon, redis_client):
    """After Redis lost its data the job id sequence starts again, from the wall clock (ms x
    1,000): above every id handed out before. So an older instance still taking ids from its
    block and a new instance taking fresh ones never collide (no JOB_ID_TAKEN), and no job of
    the new data set gets the id of a job a node may still hold from the old one."""
    a = await start_daemon(instance_id="a")
    async with peer(a.ws_url + "/v1/node") as node:
        await node.register("n1", max_jobs=8)
        async with session(a) as sa:
            await speak(sa)
            await sa.send(type="finalize")
            first = int((await node.recv())["job_id"])  # a took the block first..first+255
            redis_client.flushall()
            await node.send(type="heartbeat")  # UNKNOWN_NODE: registered again
            await wait_for(lambda: trio.to_thread.run_sync(redis_client.exists, keys.node_info("n1")))
            await speak(sa)
            await sa.send(type="finalize")
            c = await start_daemon(instance_id="c")
            async with session(c) as sc:
                for _ in range(2):
                    await speak(sc)
                    await sc.send(type="finalize")
                    await sc.recv_until("utterance_finalized")
                assigned: dict[str, str] = {}  # job id -> job key, of every job_assign the node gets
                with trio.move_on_after(4):
                    while len({k for k in assigned.values() if k.startswith(sc.ready["session_id"])}) < 2:
                        msg = await node.recv(timeout=5)
                        if msg["type"] == "job_assign":
                            assert msg["job_id"] not in assigned, msg
                            assigned[msg["job_id"]] = msg["job_key"]
    of_c = [int(j) for j, k in assigned.items() if k.startswith(sc.ready["session_id"])]
    assert len(of_c) == 2 and min(of_c) > first + 255, (first, assigned)  # c's sequence starts above a's whole block
    assert "JOB_ID_TAKEN" not in c.metrics.render().decode()


@pytest.mark.slow
async def test_daemon_started_while_redis_is_away_waits_for_it(tmp_path):
    """A daemon (re)started while Redis restarts does not exit: it waits (``redis_waiting``)
    and comes up once Redis answers."""
    valkey = EmbeddedValkey(tmp_path / "valkey", persist=False)
    url = f"unix://{tmp_path / 'valkey' / 'valkey.sock'}"
    (tmp_path / "d").mkdir()
    try:
        async with trio.open_nursery() as nursery:
            started: list[Daemon] = []
            nursery.start_soon(lambda: trio.to_thread.run_sync(lambda: started.append(Daemon(tmp_path / "d", "--redis-url", url))))
            with trio.fail_after(30):  # (not a fixed sleep: start-up alone can take 2-3 s without cached bytecode)
                while not (tmp_path / "d" / "daemon.log").exists() or "redis_waiting" not in log_events(tmp_path / "d" / "daemon.log"):
                    await trio.sleep(0.1)
            valkey.start()
        daemon = started[0]
        assert daemon.proc.poll() is None
        assert "redis_waiting" in log_events(daemon.log_path)
        assert await readyz(daemon) == 200
        assert daemon.stop() == 0
    finally:
        valkey.stop()
