"""Ownership records: liveness per instance (a TTL the instance keeps refreshing), session and
node owner keys valid while their instance lives, collected when it dies; against real
Valkey, in-process and as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
import trio

from scheduler.cluster.ownership import Ownership
from scheduler.jobs import job_key_for
from scheduler.store import keys, liveness, lua
from scheduler.store.redis_adapter import RedisAdapter, now_ms

from .helpers import SPEECH_100MS, peer, session
from .test_e2e import Daemon


@pytest.fixture(params=["single", "cluster"])
def redis_url(request):
    return request.getfixturevalue("flushed_cluster_url" if request.param == "cluster" else "flushed_single_url")


async def test_owner_records_are_valid_while_their_instance_lives(redis_url, redis_client):
    async with RedisAdapter(redis_url) as a:
        i1, i2 = Ownership(a, "i1", 600), Ownership(a, "i2", 600)
        await i1.refresh()
        await i2.refresh()
        assert await i1.claim_session("s1") == ""
        assert await i2.session_owner("s1") == "i1"
        # the client resumed on i2: i2 takes the record over, and hears who held it
        assert await i2.claim_session("s1") == "i1"
        await i1.release_session("s1")  # not i1's to drop any more
        assert redis_client.get(keys.session_owner("s1")) == "i2" and redis_client.pttl(keys.session_owner("s1")) == -1
        await i2.claim_node("n1")
        # i2 stops refreshing (killed): its records are void once its liveness lapses
        await trio.sleep(0.7)
        assert await i1.session_owner("s1") is None and await i1.node_owner("n1") is None
        assert "i2" not in await i1.alive_instances()
        # and any live instance collects them: owner keys gone, its list entry too
        await i1.refresh()
        assert await i1.collect_dead() == 1
        assert not redis_client.exists(keys.session_owner("s1"), keys.node_owner("n1"), keys.owned("i2"))
        assert await i1.alive_instances() == {"i1": pytest.approx(0.6, abs=0.2)}


async def test_an_instance_never_collects_itself(redis_url, redis_client):
    """A stall longer than the TTL lets this instance's liveness lapse; if its collect tick
    comes before its refresh tick, it must not drop its own records or mark its nodes offline."""
    async with RedisAdapter(redis_url) as a:
        me, other = Ownership(a, "me", 200), Ownership(a, "other", 200)
        await me.refresh()
        await other.refresh()
        await me.claim_session("s1")
        await me.claim_node("n1")
        await other.claim_session("s2")
        await trio.sleep(0.4)  # both lapsed
        assert await me.collect_dead() == 1  # the other one only
        assert redis_client.get(keys.session_owner("s1")) == "me" and redis_client.get(keys.node_owner("n1")) == "me"
        assert redis_client.smembers(keys.owned("me")) and not redis_client.exists(keys.owned("other"), keys.session_owner("s2"))
        await me.refresh()
        assert await other.session_owner("s1") == "me"  # valid again


async def test_nobody_is_collected_during_or_just_after_a_redis_outage(redis_url, redis_client):
    """Every liveness lapses in an outage longer than the TTL (their refreshes failed): while
    Redis is out and for one TTL after, collection waits, so each instance can refresh first."""
    async with RedisAdapter(redis_url) as a:
        me, other = Ownership(a, "me", 200), Ownership(a, "other", 200)
        await me.refresh()
        await other.refresh()
        await other.claim_node("n1")
        await trio.sleep(0.4)  # both lapsed
        now = trio.current_time()
        a.outage.started("stuck", now - 2.0)  # a call in flight for 2 s: Redis is out
        assert await me.collect_dead() == 0
        a.outage.finished("stuck", now, ok=True)  # back now
        assert await me.collect_dead() == 0 and redis_client.get(keys.node_owner("n1")) == "other"
        await trio.sleep(0.25)  # one TTL after: the other one did not refresh, it is dead
        assert await me.collect_dead() == 1 and not redis_client.exists(keys.node_owner("n1"))


async def test_daemon_refreshes_only_its_liveness_and_drops_its_records(start_daemon, redis_client):
    daemon = await start_daemon(owner_ttl_ms=600)
    me = daemon.settings.instance_id
    info = json.loads(redis_client.get(keys.instance(me)))
    assert info["ws_url"] == daemon.ws_url or info["ws_url"] == ""  # set once the listener is up
    async with peer(daemon.ws_url + "/v1/node") as node:
        await node.register("n1")
        async with session(daemon) as s:
            sid = s.ready["session_id"]
            await trio.sleep(1.5)  # well past the TTL: the refresh keeps the instance alive
            assert 0 < redis_client.pttl(keys.instance(me)) <= 600
            for key in (keys.session_owner(sid), keys.node_owner("n1")):  # written once, no TTL
                assert redis_client.get(key) == me and redis_client.pttl(key) == -1, key
            assert me in await daemon.ownership.alive_instances()
            assert json.loads(redis_client.get(keys.instance(me)))["ws_url"] == daemon.ws_url
        await gone(redis_client, keys.session_owner(sid))  # session ended: released
    await gone(redis_client, keys.node_owner("n1"))  # node left: released
    assert not redis_client.smembers(keys.owned(me))


async def gone(redis_client, key, within=0.5):
    with trio.fail_after(within):
        while redis_client.exists(key):
            await trio.sleep(0.02)


async def test_a_takeover_is_not_fought(start_daemon, redis_client):
    daemon = await start_daemon(owner_ttl_ms=600)
    async with peer(daemon.ws_url + "/v1/node") as node, session(await _with_pool(daemon, node)) as s:
        sid = s.ready["session_id"]
        redis_client.set(keys.session_owner(sid), "other-instance", px=5000)  # resumed elsewhere
        await trio.sleep(0.5)
        assert redis_client.get(keys.session_owner(sid)) == "other-instance"
    await trio.sleep(0.2)
    assert redis_client.get(keys.session_owner(sid)) == "other-instance"  # not released by us either


async def _with_pool(daemon, node):
    await node.register("n1")
    return daemon


@pytest.mark.slow
def test_a_killed_instance_is_void_at_once_and_collected(tmp_path, redis_url, redis_client):
    daemon = Daemon(tmp_path, "--redis-url", redis_url, "--owner-ttl-ms", "1000", "--instance-id", "doomed")

    async def connect_and_kill():
        async with peer(daemon.ws_url + "/v1/node") as node, peer(daemon.ws_url + "/v1/session") as client:
            await node.register("n9")
            await client.send(type="session_init", src_lang="zh", tgt_langs=["en"])
            ready = await client.recv()
            await client.send_raw(SPEECH_100MS)
            assert redis_client.get(keys.session_owner(ready["session_id"])) == "doomed"
            assert redis_client.get(keys.node_owner("n9")) == "doomed"
            os.kill(daemon.proc.pid, signal.SIGKILL)  # no cleanup at all
            return ready["session_id"]

    async def survivor_sees_it():
        async with RedisAdapter(redis_url) as a:
            other = Ownership(a, "survivor", 1000)
            await other.refresh()
            start = time.monotonic()
            while await other.session_owner(sid) is not None or await other.node_owner("n9") is not None:
                assert time.monotonic() - start < 3
                await trio.sleep(0.05)
            assert time.monotonic() - start <= 1.8  # owner_ttl_ms after the last refresh (+ polling slack)
            assert await other.collect_dead() == 1
            assert await other.collect_dead() == 0  # collected once: it stays listed, dead (a tombstone)
            assert not await other.is_alive("doomed")
            await other.refresh()  # (its own 1 s TTL may have run out while it waited above)
            assert await liveness.alive(a, ["doomed", "survivor", "never-seen"], unsure=False) == {"survivor", "never-seen"}
            assert await liveness.alive(a, ["doomed"], unsure=True) == {"doomed"}  # Redis just came back: unsure
        assert not redis_client.exists(keys.session_owner(sid), keys.node_owner("n9"), keys.instance("doomed"))
        assert redis_client.zscore(keys.instances(), "doomed") < 0
        assert redis_client.hget(keys.node_info("n9"), "online") == "0"  # never chosen again

    try:
        sid = trio.run(connect_and_kill)
        trio.run(survivor_sees_it)
    finally:
        daemon.proc.kill()
        daemon.proc.wait()
        daemon.log.close()


@pytest.mark.slow
async def test_jobs_of_a_killed_instance_are_released_by_another(tmp_path, redis_url, redis_client, start_daemon):
    """Instance A (a real process) dies holding a session whose job runs on node n1. n1
    reconnects to instance B: a new connection holds no jobs, so its slot is free at once
    (it does not wait for the sweep). B sees the lease expired and A gone: it cancels the
    job (status cancelled, lease dropped, the slot not released twice) and tells n1."""
    a = Daemon(tmp_path, "--redis-url", redis_url, "--owner-ttl-ms", "1000", "--job-lease-ms", "1000", "--instance-id", "a")
    try:
        async with peer(a.ws_url + "/v1/node") as node, peer(a.ws_url + "/v1/session") as client:
            await node.register("n1", max_jobs=1)
            await client.send(type="session_init", src_lang="zh", tgt_langs=["en"])
            assert (await client.recv())["type"] == "session_ready"
            await client.send_raw(SPEECH_100MS)
            await client.send(type="finalize")
            job = await node.recv()
            assert job["type"] == "job_assign"
            os.kill(a.proc.pid, signal.SIGKILL)
    finally:
        a.proc.wait()
        a.log.close()
    b = await start_daemon(redis_url=redis_url, owner_ttl_ms=1000, instance_id="b", heartbeat_interval_ms=2000, node_ttl_ms=20_000)
    async with peer(b.ws_url + "/v1/node") as node:
        await node.register("n1", max_jobs=1)
        assert redis_client.hget(keys.nodes_runtime(), keys.runtime_field("n1", "current_jobs")) == "0"  # A's job died with the old socket
        assert redis_client.hget(keys.job(job["job_id"]), "status") == "dispatched"
        with trio.fail_after(10):
            cancel = await node.recv(timeout=10)
        assert (cancel["type"], cancel["job_id"], cancel["attempt"]) == ("job_cancel", job["job_id"], 1)
        assert redis_client.hget(keys.nodes_runtime(), keys.runtime_field("n1", "current_jobs")) == "0"
        assert redis_client.hget(keys.job(job["job_id"]), "status") == "cancelled"
        assert redis_client.zscore(keys.leases(), job["job_id"]) is None


async def first_job(s, node):
    """The client finalizes one utterance of speech: the job_assign its node gets."""
    await s.send_raw(SPEECH_100MS)
    await s.send(type="finalize")
    with trio.fail_after(5):
        job = await node.recv()
    assert job["type"] == "job_assign"
    return job


@contextlib.asynccontextmanager
async def answered_across(a, b, text):
    """A session on daemon ``a``, its one utterance answered by node "far" on daemon ``b``:
    yields (session peer, the job_assign the node got, the result the client got)."""
    async with peer(b.ws_url + "/v1/node") as node:
        await node.register("far", max_jobs=2)
        async with session(a) as s:
            job = await first_job(s, node)
            await node.send(type="job_result", job_id=job["job_id"], attempt=1, status="ok", source_text="s", text=text)
            result, _ = await s.recv_until("result")
            yield s, job, result


async def test_job_and_answer_cross_instances(start_daemon, redis_url):
    """Session on instance A, node on instance B, one Redis: the job goes to B over B's
    stream, the node's answer comes back to A over Pub/Sub, the client gets it."""
    a = await start_daemon(redis_url=redis_url, instance_id="a")
    b = await start_daemon(redis_url=redis_url, instance_id="b")
    async with answered_across(a, b, "over there") as (s, job, result):
        assert job["session_id"] == s.ready["session_id"] and job["attempt"] == 1
        assert result["status"] == "SUCCESS" and result["translations"]["en"]["text"] == "over there"
        assert result["translations"]["en"]["node_id"] == "far"
        with trio.fail_after(5):  # (on a busy box the remote watch may bring the answer first; the Pub/Sub
            while 'scheduler_relay_messages_total{kind="outcome_received"} 1.0' not in a.metrics.render().decode():
                await trio.sleep(0.01)  # message still comes while the session is open)
    sent_a = a.metrics.render().decode()
    sent_b = b.metrics.render().decode()
    assert 'scheduler_relay_messages_total{kind="job_sent"} 1.0' in sent_a
    assert 'scheduler_relay_messages_total{kind="job_received"} 1.0' in sent_b
    assert 'scheduler_relay_messages_total{kind="outcome_sent"} 1.0' in sent_b
    assert 'scheduler_relay_messages_total{kind="outcome_received"} 1.0' in sent_a


async def test_a_job_cancel_crosses_instances(start_daemon, redis_url, redis_client):
    """Session on A, its job on node "far" held by B: when the client's socket closes, the
    job is cancelled and the node hears ``job_cancel`` over B's stream (found by the
    dispatcher machine: only nodes connected to A were told, so "far" kept working on the
    job while Redis gave its slot to the next one)."""
    a = await start_daemon(redis_url=redis_url, instance_id="a")
    b = await start_daemon(redis_url=redis_url, instance_id="b")
    async with peer(b.ws_url + "/v1/node") as node:
        await node.register("far", max_jobs=1)
        async with session(a) as s:
            job = await first_job(s, node)
        with trio.fail_after(5):
            cancel = await node.recv(timeout=5)
        assert (cancel["type"], cancel["job_id"], cancel["attempt"]) == ("job_cancel", job["job_id"], 1)
        assert redis_client.hget(keys.nodes_runtime(), keys.runtime_field("far", "current_jobs")) == "0"
    with trio.fail_after(5):  # (a counts its send once the XADD's reply is back: b may deliver before that)
        while 'scheduler_relay_messages_total{kind="cancel_sent"} 1.0' not in a.metrics.render().decode():
            await trio.sleep(0.01)
    assert 'scheduler_relay_messages_total{kind="cancel_received"} 1.0' in b.metrics.render().decode()


async def test_a_dead_readers_pending_job_is_reclaimed_and_delivered(start_daemon, redis_url, redis_client, monkeypatch):
    """An entry of b's job stream was taken by a reader that died before acknowledging it:
    b reclaims it (XAUTOCLAIM) once it has been idle long enough and hands it to the node."""
    from scheduler.cluster import relay
    from scheduler.protocol import JobAssign, encode

    monkeypatch.setattr(relay, "RECLAIM_IDLE_MS", 1500)
    monkeypatch.setattr(relay, "RECLAIM_EVERY_S", 0.2)
    stream = keys.job_stream("b")
    redis_client.xgroup_create(stream, relay.GROUP, id="0", mkstream=True)
    assign = JobAssign(job_id="77", attempt=1, job_key="s:0:translate:en", session_id="s", utterance_index=0,
                       job_type="translate:en", src_lang="zh", tgt_lang="en", turn_id="s:t1", sample_rate=16000,
                       audio="", deadline_ms=0)
    redis_client.xadd(stream, {"node_id": "nb", "msg": encode(assign)})
    assert redis_client.xreadgroup(relay.GROUP, "ghost", {stream: ">"})  # ... and the ghost dies
    b = await start_daemon(redis_url=redis_url, instance_id="b")
    async with peer(b.ws_url + "/v1/node") as node:
        await node.register("nb")
        with trio.fail_after(5):
            got = await node.recv()
        assert (got["type"], got["job_id"]) == ("job_assign", "77")
        with trio.fail_after(2):
            while redis_client.xpending(stream, relay.GROUP)["pending"]:
                await trio.sleep(0.05)


async def test_a_lost_answer_message_is_taken_from_redis(start_daemon, redis_url, redis_client, monkeypatch):
    """complete_task keeps the answer in Redis before it is published: when the Pub/Sub message
    never arrives, the session's owner finds it there and the client still gets its result, once."""
    a = await start_daemon(redis_url=redis_url, instance_id="a")
    b = await start_daemon(redis_url=redis_url, instance_id="b")
    monkeypatch.setattr(keys, "answer_channel", lambda owner: "scheduler:answers:nobody-listens")
    async with answered_across(a, b, "kept") as (s, _, result):
        assert result["status"] == "SUCCESS" and result["translations"]["en"]["text"] == "kept"
        with trio.move_on_after(1.5):  # and only once, though the answer stays findable for a moment
            extra = await s.recv_until("result")
            raise AssertionError(f"second result {extra}")
        job_id = redis_client.get(keys.jobkey(job_key_for(s.ready["session_id"], 0, "en")))
        kept = redis_client.hget(keys.job(job_id), "answer")
        assert kept is not None and '"kept"' in kept  # kept until past the result deadline (a resume may want it)
    assert 'scheduler_relay_messages_total{kind="outcome_polled"} 1.0' in a.metrics.render().decode()
    assert 'scheduler_relay_messages_total{kind="outcome_received"}' not in a.metrics.render().decode()


def test_one_liveness_rule():
    """store/liveness.py: listed with a lapse ahead, or not listed (Redis lost its data): alive;
    lapsed or a tombstone: dead, unless Redis was out within a TTL (unsure)."""
    now = 1_000_000
    assert liveness.is_alive(now + 1, now, unsure=False) and liveness.is_alive(None, now, unsure=False)
    assert not liveness.is_alive(now - 1, now, unsure=False)
    assert not liveness.is_alive(liveness.tombstone(now - 5), now, unsure=False)
    assert liveness.is_alive(now - 1, now, unsure=True) and liveness.is_alive(liveness.tombstone(now), now, unsure=True)
    low, high = liveness.expired_tombstones(now + liveness.TOMBSTONE_MS)
    assert float(low.lstrip("(")) == liveness.tombstone(now) and high == "(0"  # older than that one goes


async def test_a_clean_stop_leaves_the_instance_dead_not_unlisted(redis_url, redis_client):
    """Unlisted counts as alive (Redis lost its data): a stopped instance is listed dead, so that
    jobs it left behind are orphans the others' sweep releases."""
    async with RedisAdapter(redis_url) as a:
        async with trio.open_nursery() as nursery:
            await nursery.start(Ownership(a, "leaving", 600).run)
            assert await liveness.alive(a, ["leaving"], unsure=False) == {"leaving"}
            nursery.cancel_scope.cancel()
        assert redis_client.zscore(keys.instances(), "leaving") < 0 and not redis_client.exists(keys.instance("leaving"))
        assert await liveness.alive(a, ["leaving"], unsure=False) == set()
        await Ownership(a, "leaving", 600).refresh()  # started again under the same id: alive again
        assert await liveness.alive(a, ["leaving"], unsure=False) == {"leaving"}


async def test_a_collected_instance_that_was_only_stalled_takes_its_records_back(redis_url, redis_client):
    """i2 stalls past its TTL and i1 collects it (owner records dropped, its node offline),
    though i2 still holds the sockets. At its next refresh i2 sees its record was gone and takes
    back what nobody else took meanwhile: s1 and its node, not s9 (resumed on i1 meanwhile)."""
    lapses = []
    async with RedisAdapter(redis_url) as a:
        i1 = Ownership(a, "i1", 600)
        i2 = Ownership(a, "i2", 600, held=lambda: (["s1", "s9"], [("n1", True, "c1")]), on_lapse=lambda: lapses.append(1))
        await i1.refresh()
        await i2.refresh()
        await a.script(*lua.register_node("n1", [("zh-en", "zh", "en")], 2, now_ms(), "i2", conn_id="c1"))
        for s in ("s1", "s9"):
            await i2.claim_session(s)
        await i2.claim_node("n1")
        await i2.refresh()
        assert not lapses  # an ordinary refresh
        await trio.sleep(0.7)  # i2 stalls
        await i1.refresh()
        assert await i1.collect_dead() == 1
        assert redis_client.hget(keys.node_info("n1"), "online") == "0" and not redis_client.exists(keys.session_owner("s1"))
        await i1.claim_session("s9")  # its client resumed on i1
        await i2.refresh()  # i2 wakes up
        assert lapses == [1]
        assert redis_client.get(keys.session_owner("s1")) == "i2" and redis_client.get(keys.node_owner("n1")) == "i2"
        assert redis_client.get(keys.session_owner("s9")) == "i1"  # not taken back
        assert redis_client.hmget(keys.node_info("n1"), "online", "draining") == ["1", "1"]
        assert redis_client.smembers(keys.owned("i2")) == {keys.session_owner("s1"), keys.node_owner("n1")}
        assert await i1.is_alive("i2")


async def test_a_process_started_again_under_the_same_id_drops_what_the_last_one_left(redis_url, redis_client):
    """A worker killed and started again keeps its instance id: the nodes its last process
    held (their sockets died with it) must not stay online under an id that is alive again."""
    async with RedisAdapter(redis_url) as a:
        before = Ownership(a, "w0", 600)
        await before.refresh()
        await a.script(*lua.register_node("n1", [("zh-en", "zh", "en")], 2, now_ms(), "w0", conn_id="c1"))
        await before.claim_node("n1")
        await before.claim_session("s1")  # ... and then the process is killed: nothing cleaned up
        async with trio.open_nursery() as nursery:
            await nursery.start(Ownership(a, "w0", 600).run)  # the same id, a new process
            assert redis_client.hget(keys.node_info("n1"), "online") == "0"
            assert not redis_client.exists(keys.node_owner("n1"), keys.session_owner("s1"), keys.owned("w0"))
            assert await liveness.alive(a, ["w0"], unsure=False) == {"w0"}
            nursery.cancel_scope.cancel()
