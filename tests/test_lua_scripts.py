"""Each Lua script and its error paths, through the real adapter, against real Valkey: a single
server and a 3-master cluster (the ``redis_url`` fixture below runs every test on both)."""

import re
from pathlib import Path

import pytest
import trio

from scheduler.edge.heartbeats import HeartbeatWriter
from scheduler.placement.nodes import NodeConnection
from scheduler.protocol import Register
from scheduler.store import keys, lua
from scheduler.store.redis_adapter import (
    AlreadyCompleted,
    EmptyPool,
    JobIdTaken,
    JobkeyMismatch,
    NoAvailableNode,
    NodeMismatch,
    NoPoolForLangPair,
    StaleAttempt,
    StaleCandidates,
    UnknownJob,
    load_script_sources,
    now_ms,
)
from scheduler.store.scheduling import SchedulingClient, stored_answers


@pytest.fixture
def redis_url(single_and_cluster_url):
    """Every test here runs on one Valkey and on a 3-master Valkey cluster, both emptied."""
    return single_and_cluster_url


async def register(a, node_id, max_jobs=2, pairs=(("zh", "en"),), pools=None, owner="i1", conn_id="", at_ms=None):
    entries = [(pool, s, t) for pool in pools for s, t in pairs] if pools else [(f"{s}-{t}", s, t) for s, t in pairs]
    await a.script(*lua.register_node(node_id, entries, max_jobs, now_ms() if at_ms is None else at_ms, owner,
                                      conn_id=conn_id))


async def dispatch(a, job_key, turn_id="t1", turn_action="none", src="zh", tgt="en", session_id="s1", rand=0, turn_jobs=1):
    return await SchedulingClient(a, id_block=1).dispatch(job_key, session_id, 0, src, tgt, turn_id, turn_action, now_ms(), 30000,
                                                          6000, rand, turn_jobs)


async def job_key_of(a, job_id):
    return await a.command("HGET", keys.job(job_id), "job_key") or "unknown"


async def complete(a, job_id, node_id, attempt=1, status="finished"):
    return await a.script(*lua.complete(job_id, await job_key_of(a, job_id), node_id, attempt, status == "finished", now_ms()))


async def cancel(a, job_id, node_id):
    return await a.script(*lua.cancel(job_id, await job_key_of(a, job_id), node_id, now_ms()))


async def redispatch(a, job_id, old_node, attempt, turn_id="t1", src="zh", tgt="en", session_id="s1", rand=0):
    return await SchedulingClient(a).redispatch(job_id, old_node, attempt, session_id, turn_id, src, tgt, now_ms(), 30000, 6000,
                                                rand)


def lease(redis_client, job_id):
    return int(redis_client.hget(keys.job(job_id), "lease_deadline_ts"))


def slots(redis_client, node_id):
    return int(redis_client.hget(keys.nodes_runtime(), keys.runtime_field(node_id, "current_jobs")))


async def test_register_writes_info_pools_and_lang_index(adapter, redis_client):
    await register(adapter, "n1", max_jobs=3, pairs=(("zh", "en"), ("zh", "de")))
    info = redis_client.hgetall(keys.node_info("n1"))
    assert info["online"] == "1" and info["max_jobs"] == "3" and info["owner"] == "i1"
    assert redis_client.smembers(keys.pool_members("zh-en")) == {"n1"}
    assert redis_client.hkeys(keys.lang_pools("zh", "de")) == ["zh-de"]
    assert slots(redis_client, "n1") == 0


async def test_heartbeat_needs_registration(adapter, redis_client):
    assert await adapter.script(*lua.heartbeat("ghost", now_ms())) == [["UNKNOWN_NODE"]]
    assert not redis_client.exists(keys.node_info("ghost"))  # (nothing made for it)
    await register(adapter, "n1")
    reply = await adapter.script(*lua.heartbeat("n1", now_ms(), {"cpu": 0.5}))
    assert reply == [["OK", 0]]
    assert redis_client.hget(keys.node_info("n1"), "load_json") == '{"cpu": 0.5}'


async def test_heartbeats_of_several_nodes_in_one_call_answer_each(adapter, redis_client):
    """heartbeats.lua (the node gateway's batches): each node as heartbeat.lua would take it,
    one reply each; a node Redis lost or a stale connection spoils nothing for the others."""
    await register(adapter, "n1", conn_id="c1")
    await register(adapter, "n2", conn_id="c2")
    beats = [lua.Beat("n1", {"cpu": 0.1}, 0.1, conn_id="c1"), lua.Beat("n2", {"cpu": 0.9}, 0.9, True, conn_id="old"),
             lua.Beat("ghost"), lua.Beat("n2", {"cpu": 0.2}, 0.2, draining=True, conn_id="c2")]
    assert await SchedulingClient(adapter).heartbeats(beats) == ["OK", "STALE_CONN", "UNKNOWN_NODE", "OK"]
    fields = ("load_score", "saturated", "draining")
    assert redis_client.hmget(keys.node_info("n1"), *fields) == ["0.1", "0", "0"]
    assert redis_client.hmget(keys.node_info("n2"), *fields) == ["0.2", "0", "1"]  # (not the stale connection's 0.9)
    copy = lua.runtime_copy(redis_client.hget(keys.nodes_runtime(), "n2"))
    assert [copy[f] for f in fields] == ["0.2", "0", "1"]
    assert not redis_client.exists(keys.node_info("ghost"))


async def test_a_heartbeat_batch_that_fails_costs_that_batch_not_the_writer(adapter, caplog):
    """The heartbeat writer's error boundary (edge/heartbeats.py): a bug while writing one
    batch is logged at ERROR, and the next heartbeats are written as ever."""
    await register(adapter, "n1", conn_id="c1")
    conn = NodeConnection("n1", 2, conn_id="c1")
    bugs, settled = [RuntimeError("a bug")], []

    def beat(c):
        if bugs:
            raise bugs.pop()
        return lua.Beat(c.node_id, {"cpu": 0.2}, 0.2, conn_id=c.conn_id)

    async def settle(c, b, reply):
        settled.append(reply)

    writer = HeartbeatWriter(SchedulingClient(adapter), 0.01, beat, settle, lambda c: True)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.due(conn)
        with trio.fail_after(5):
            while not any(getattr(r, "event", None) == "heartbeat_batch_failed" for r in caplog.records):
                await trio.sleep(0.01)
        writer.due(conn)
        with trio.fail_after(5):
            while not settled:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert settled == ["OK"]


async def test_dispatch_errors(adapter, redis_client):
    with pytest.raises(NoPoolForLangPair):
        await dispatch(adapter, "s1:0:translate:en")
    redis_client.hset(keys.lang_pools("zh", "en"), "empty", "1")
    with pytest.raises(EmptyPool):
        await dispatch(adapter, "s1:0:translate:en")
    await register(adapter, "n1", max_jobs=1, pools=["empty"])
    assert (await dispatch(adapter, "k0"))[0] == "OK"
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k1")
    assert slots(redis_client, "n1") == 1


async def test_dispatch_is_idempotent_per_job_key(adapter, redis_client):
    await register(adapter, "n1", max_jobs=4)
    first = await dispatch(adapter, "s1:0:translate:en")
    again = await dispatch(adapter, "s1:0:translate:en")
    assert first[0] == "OK" and again == ["EXISTS", first[1]]
    assert slots(redis_client, "n1") == 1
    job = redis_client.hgetall(keys.job(first[1]))
    assert job["status"] == "dispatched" and job["job_key"] == "s1:0:translate:en" and job["attempt"] == "1"
    assert redis_client.ttl(keys.job(first[1])) > 0 and redis_client.ttl(keys.jobkey("s1:0:translate:en")) > 0
    assert redis_client.hget(keys.session("s1"), "next_utterance_index") == "1"


async def test_least_loaded_node_wins(adapter, redis_client):
    await register(adapter, "a", max_jobs=4)
    await register(adapter, "b", max_jobs=2)
    placed = [(await dispatch(adapter, f"k{i}", rand=i))[2] for i in range(6)]
    # loads go a:1/4 or b:1/2 ...; at every step the chosen node had the lowest ratio
    assert sorted(placed) == ["a"] * 4 + ["b"] * 2
    assert slots(redis_client, "a") == 4 and slots(redis_client, "b") == 2


async def test_offline_and_draining_nodes_are_skipped(adapter, redis_client):
    await register(adapter, "a", max_jobs=4)
    await register(adapter, "b", max_jobs=4)
    await adapter.script(*lua.node_state("a", "i1", online=False, draining=False))
    await adapter.script(*lua.node_state("b", "i1", online=True, draining=True))
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k0")
    assert await adapter.script(*lua.node_state("b", "other-instance", online=True, draining=False)) == ["NOT_OWNER", "i1"]
    await adapter.script(*lua.node_state("b", "i1", online=True, draining=False))
    assert (await dispatch(adapter, "k0"))[2] == "b"


async def test_the_close_of_a_replaced_connection_leaves_the_node_online(adapter):
    """A node that reconnected (to this instance too) is on a new conn_id: the old socket's
    close, handled late, names the old one and changes nothing."""
    await register(adapter, "a", max_jobs=4, conn_id="c1")
    await register(adapter, "a", max_jobs=4, conn_id="c2")  # reconnected
    assert await adapter.script(*lua.node_state("a", "i1", online=False, draining=False, conn_id="c1")) == ["STALE_CONN", "c2"]
    assert (await dispatch(adapter, "k0"))[2] == "a"
    assert await adapter.script(*lua.node_state("a", "i1", online=False, draining=False, conn_id="c2")) == ["OK"]
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k1")


async def test_a_heartbeat_of_a_closed_or_replaced_connection_changes_nothing(adapter, redis_client):
    """A heartbeat handled late, after its connection's close was written, leaves the node
    offline; one of a connection the node left leaves the new one's load alone. After another
    instance took the node's for dead (offline, no connection named), its heartbeat is taken."""
    client = SchedulingClient(adapter)
    await register(adapter, "a", max_jobs=4, conn_id="c1")
    assert await adapter.script(*lua.node_state("a", "i1", online=False, draining=False, conn_id="c1")) == ["OK"]
    assert await client.heartbeats([lua.Beat("a", {"late": 1}, conn_id="c1")]) == ["STALE_CONN"]
    assert redis_client.hget(keys.node_info("a"), "online") == "0"
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k0")
    await register(adapter, "a", max_jobs=4, conn_id="c2")  # back, on a new connection
    assert await client.heartbeats([lua.Beat("a", {"old": 1}, 0.9, saturated=True, conn_id="c1")]) == ["STALE_CONN"]
    assert redis_client.hget(keys.node_info("a"), "saturated") == "0"
    assert await adapter.script(*lua.node_state("a", "i1", online=False, draining=False)) == ["OK"]  # collected
    assert await client.heartbeats([lua.Beat("a", {"new": 1}, conn_id="c2")]) == ["OK"]
    assert (await dispatch(adapter, "k1"))[2] == "a"


async def test_stale_heartbeat_makes_node_ineligible(adapter, redis_client):
    await register(adapter, "a", max_jobs=4, at_ms=now_ms() - 60_000)  # silent since, its keys still there
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k0")
    assert (await adapter.script(*lua.heartbeat("a", now_ms(), None)))[0][0] == "OK"  # heard from again
    assert (await dispatch(adapter, "k0"))[2] == "a"


async def test_a_saturated_node_gets_no_new_job_even_of_its_turn(adapter, redis_client):
    """A node whose load score was above the threshold (the heartbeat's saturated flag) is
    skipped, its turn affinity too; with every node saturated a job waits as for a full pool;
    the next heartbeat below the threshold, or a new registration, makes it eligible again."""
    await register(adapter, "a", max_jobs=10)
    await register(adapter, "b", max_jobs=10)
    assert (await dispatch(adapter, "k0", turn_id="T", turn_action="keep", rand=0))[2] == "a"
    await adapter.script(*lua.heartbeat("a", now_ms(), None, 0.9, True))
    assert redis_client.hmget(keys.node_info("a"), "load_score", "saturated") == ["0.9", "1"]
    assert (await dispatch(adapter, "k1", turn_id="T", turn_action="keep"))[2] == "b"  # the turn moves on
    assert redis_client.hget(keys.turn("T"), "affinity_node_id") == "b"
    await adapter.script(*lua.heartbeat("b", now_ms(), None, 1.0, True))
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k2")
    await adapter.script(*lua.heartbeat("a", now_ms(), None, 0.5, False))
    assert (await dispatch(adapter, "k2"))[2] == "a"
    await register(adapter, "b", max_jobs=10)  # a new connection starts unjudged
    assert redis_client.hmget(keys.node_info("b"), "load_score", "saturated") == ["", "0"]


async def test_a_load_score_counts_as_load_when_it_is_above_the_busy_share(adapter, redis_client):
    await register(adapter, "a", max_jobs=4)
    await register(adapter, "b", max_jobs=4)
    await adapter.script(*lua.heartbeat("a", now_ms(), None, 0.6, False))  # busy engine, free slots
    placed = [(await dispatch(adapter, f"k{i}", rand=i))[2] for i in range(4)]
    assert placed == ["b", "b", "b", "a"]  # b at 0, 1/4, 2/4 is below a's 0.6; at 3/4 it is above
    await adapter.script(*lua.heartbeat("a", now_ms()))  # a heartbeat without a score: slots alone
    assert redis_client.hmget(keys.node_info("a"), "load_score", "saturated") == ["", "0"]


async def test_turn_affinity_keeps_node_then_ends(adapter, redis_client):
    await register(adapter, "a", max_jobs=10)
    await register(adapter, "b", max_jobs=10)
    first = await dispatch(adapter, "k0", turn_id="T", turn_action="keep", rand=1)
    node = first[2]
    assert redis_client.hget(keys.turn("T"), "affinity_node_id") == node
    # without affinity the other (less loaded) node would win; with it the turn stays put
    second = await dispatch(adapter, "k1", turn_id="T", turn_action="keep")
    assert second[2] == node
    third = await dispatch(adapter, "k2", turn_id="T", turn_action="end")
    assert third[2] == node
    assert not redis_client.exists(keys.turn("T"))


async def test_complete_checks_node_attempt_and_releases_once(adapter, redis_client):
    await register(adapter, "a", max_jobs=2)
    await register(adapter, "b", max_jobs=2)
    job_id, node = (await dispatch(adapter, "s1:0:translate:en"))[1:3]
    other = "b" if node == "a" else "a"
    with pytest.raises(NodeMismatch):
        await complete(adapter, job_id, other)
    with pytest.raises(StaleAttempt):
        await complete(adapter, job_id, node, attempt=2)
    with pytest.raises(UnknownJob):
        await complete(adapter, "999", node)
    assert await complete(adapter, job_id, node) == ["OK", "s1", "s1:0:translate:en", 0, "en"]
    assert slots(redis_client, node) == 0
    with pytest.raises(AlreadyCompleted):
        await complete(adapter, job_id, node)
    assert slots(redis_client, node) == 0


async def test_placements_name_the_node_connection(adapter, redis_client):
    """dispatch_task and redispatch_task return the chosen node's connection id (register_node),
    so the placing instance can tell when the connection that got a job is gone."""
    await register(adapter, "a", max_jobs=2, conn_id="ca1")
    reply = await dispatch(adapter, "s1:0:translate:en")
    assert reply[2:] == ["a", 1, "ca1"]
    await register(adapter, "b", max_jobs=2, conn_id="cb1")
    assert (await redispatch(adapter, reply[1], "a", attempt=1))[2:] == ["b", 2, "cb1"]
    await register(adapter, "b", max_jobs=2, conn_id="cb2")  # b reconnected: a new connection
    assert redis_client.hget(keys.node_info("b"), "conn_id") == "cb2"


async def test_a_new_connection_holds_no_jobs(adapter, redis_client):
    """A node that reconnects (new conn_id) lost the jobs of its old socket: their slots are
    free at once (their placers move them); the same connection registering again keeps them."""
    await register(adapter, "a", max_jobs=1, conn_id="c1")
    job_id = (await dispatch(adapter, "k0"))[1]
    await register(adapter, "a", max_jobs=1, conn_id="c1")  # Redis forgot the node: same socket
    assert slots(redis_client, "a") == 1
    await register(adapter, "a", max_jobs=1, conn_id="c2")  # a new socket
    assert slots(redis_client, "a") == 0 and not redis_client.smembers(keys.node_jobs("a"))
    with pytest.raises(NoAvailableNode):  # its placer moves it: no other node, it waits ...
        await redispatch(adapter, job_id, "a", attempt=1)
    assert slots(redis_client, "a") == 0  # ... and the slot it no longer held is not released twice


async def test_a_node_registered_again_leaves_the_pools_it_no_longer_serves(adapter, redis_client):
    """A node restarted with fewer language pairs gets no job of a pair it dropped (found by
    the dispatcher machine: a node re-registered for zh->de only was given zh->en jobs)."""
    client = SchedulingClient(adapter)
    both = Register(node_id="a", lang_pairs=[["zh", "en"], ["zh", "de"]], max_jobs=2)
    await client.register_node(both, "i1", "c1")
    assert redis_client.smembers(keys.pool_members("zh-en")) == {"a"}
    de_only = Register(node_id="a", lang_pairs=[["zh", "de"]], max_jobs=2)
    stale = lua.register_node("a", de_only.pool_pairs(), 2, now_ms(), "i1", conn_id="c2")  # the old pools not declared
    with pytest.raises(StaleCandidates):
        await adapter.script(*stale)
    assert redis_client.smembers(keys.pool_members("zh-en")) == {"a"}  # nothing changed
    await client.register_node(de_only, "i1", "c2")
    assert not redis_client.smembers(keys.pool_members("zh-en")) and redis_client.smembers(keys.pool_members("zh-de")) == {"a"}
    with pytest.raises(EmptyPool):
        await dispatch(adapter, "k0")
    await client.register_node(both, "i1", "c3")  # and joins again
    assert (await dispatch(adapter, "k1"))[2] == "a"


async def test_complete_keeps_the_answer_until_its_ttl(adapter, redis_client):
    """An accepted answer stays in Redis (for an owner that resumes the session, or one whose
    Pub/Sub message was lost); a refused one writes nothing."""
    await register(adapter, "a", max_jobs=2)
    job_id = (await dispatch(adapter, "s1:0:translate:en"))[1]
    call = lua.complete(job_id, "s1:0:translate:en", "a", 2, True, now_ms(), answer='{"x": 1}', answer_ttl_s=40)
    with pytest.raises(StaleAttempt):
        await adapter.script(*call)
    assert not redis_client.hexists(keys.job(job_id), "answer")
    call = lua.complete(job_id, "s1:0:translate:en", "a", 1, True, now_ms(), answer='{"x": 1}', answer_ttl_s=400)
    assert (await adapter.script(*call))[0] == "OK"
    assert redis_client.hget(keys.job(job_id), "answer") == '{"x": 1}'  # in the job, kept as long as the answer
    assert 390 < redis_client.ttl(keys.job(job_id)) <= 400 and 390 < redis_client.ttl(keys.jobkey("s1:0:translate:en")) <= 400
    assert await stored_answers(adapter, [("s1", ["s1:0:translate:en", "s1:1:translate:en"])]) == [['{"x": 1}', None]]
    short = (await dispatch(adapter, "s1:1:translate:en"))[1]  # an answer kept less than the done TTL: the done TTL
    await adapter.script(*lua.complete(short, "s1:1:translate:en", "a", 1, True, now_ms(), answer='{"y": 2}', answer_ttl_s=40))
    assert keys.DONE_TTL_S - 10 < redis_client.ttl(keys.job(short)) <= keys.DONE_TTL_S


async def test_reconnect_keeps_held_jobs_counted(adapter, redis_client):
    await register(adapter, "a", max_jobs=2)
    job_id = (await dispatch(adapter, "k0"))[1]
    redis_client.hset(keys.nodes_runtime(), keys.runtime_field("a", "current_jobs"), 7)  # drifted
    await register(adapter, "a", max_jobs=2)  # reconnect: slots = jobs it still holds
    assert slots(redis_client, "a") == 1
    await complete(adapter, job_id, "a")
    assert slots(redis_client, "a") == 0
    assert redis_client.scard(keys.node_jobs("a")) == 0 and redis_client.zcard(keys.leases()) == 0


async def test_a_release_never_brings_back_a_runtime_table_nor_counts_below_zero(adapter, redis_client):
    """The slot count is lowered by one HINCRBY: when the runtime table expired meanwhile, it
    stays gone (a table made by the HINCRBY would have no TTL); when the node's count was
    written anew at 0, it stays at 0 and the table keeps its TTL."""
    await register(adapter, "a", max_jobs=2)
    first, second = (await dispatch(adapter, "k0"))[1], (await dispatch(adapter, "k1"))[1]
    redis_client.delete(keys.nodes_runtime())  # expired
    await complete(adapter, first, "a")
    assert not redis_client.exists(keys.nodes_runtime())
    redis_client.hset(keys.nodes_runtime(), mapping={keys.runtime_field("a", "current_jobs"): 0, "b:online": 1})
    redis_client.expire(keys.nodes_runtime(), 100)
    await complete(adapter, second, "a")
    assert slots(redis_client, "a") == 0 and 0 < redis_client.ttl(keys.nodes_runtime()) <= 100
    assert redis_client.scard(keys.node_jobs("a")) == 0


async def test_a_dispatch_under_a_taken_job_id_leaves_its_job_key_free(adapter, redis_client):
    """dispatch_task claims the job key first (SET NX) and lets it go when it makes no job:
    under an id that is taken (a caller bug), and when no node is free."""
    await register(adapter, "n1", max_jobs=1)
    scheduling = SchedulingClient(adapter, id_block=1)
    (job_id,) = await scheduling.job_ids(1)
    call = lambda key: lambda c: lua.dispatch(key, job_id, "s1", 0, "zh", "en", "t1", "none", now_ms(), 30000, 6000, 0, c)  # noqa: E731
    assert (await scheduling.run_many("zh", "en", [call("k0")]))[0][0] == "OK"
    assert isinstance((await scheduling.run_many("zh", "en", [call("k1")]))[0], JobIdTaken)
    assert not redis_client.exists(keys.jobkey("k1"))
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k2")
    assert not redis_client.exists(keys.jobkey("k2")) and slots(redis_client, "n1") == 1


async def test_a_claim_renews_the_session_s_ttl_once_per_half_ttl(adapter, redis_client):
    """dispatch_task renews the session hash's TTL when its last renewal by a claim (ttl_at)
    is half a TTL old or more: one EXPIRE per half hour of a live session, not one per job."""
    await register(adapter, "n1", max_jobs=8)
    await dispatch(adapter, "s1:0:translate:en")
    assert redis_client.ttl(keys.session("s1")) > keys.KEY_TTL_S - 10
    redis_client.expire(keys.session("s1"), 2000)
    await dispatch(adapter, "s1:1:translate:en")  # renewed a moment ago: left as it is
    assert redis_client.ttl(keys.session("s1")) <= 2000
    renewed_at = int(redis_client.hget(keys.session("s1"), "ttl_at"))
    redis_client.hset(keys.session("s1"), "ttl_at", renewed_at - keys.KEY_TTL_S * 500)  # half a TTL ago
    await dispatch(adapter, "s1:2:translate:en")
    assert redis_client.ttl(keys.session("s1")) > keys.KEY_TTL_S - 10
    assert int(redis_client.hget(keys.session("s1"), "ttl_at")) >= renewed_at


async def test_a_repeated_dispatch_learns_what_its_lost_call_made(adapter, redis_client):
    """Redis timed out on a dispatch_task that went through: the repeat (same key, same job
    id) is told the placement, not taken for a duplicate; another id is a duplicate as ever."""
    await register(adapter, "n1", max_jobs=4, conn_id="c1")
    scheduling = SchedulingClient(adapter, id_block=1)
    (job_id,) = await scheduling.job_ids(1)
    call = lambda c, i=job_id: lua.dispatch("s1:0:translate:en", i, "s1", 0, "zh", "en", "t1", "none", now_ms(), 30000, 6000, 0, c)  # noqa: E731
    first = await scheduling.run_many("zh", "en", [call])
    again = await scheduling.run_many("zh", "en", [call])
    assert first == [["OK", job_id, "n1", 1, "c1"]] and again[0][:6] == ["EXISTS", job_id, "n1", 1, "dispatched", "c1"]
    assert again[0][6] == int(redis_client.hget(keys.job(job_id), "lease_deadline_ts"))
    (other,) = await scheduling.job_ids(1)
    assert await scheduling.run_many("zh", "en", [lambda c: call(c, other)]) == [["EXISTS", job_id]]
    assert slots(redis_client, "n1") == 1


async def test_a_repeated_complete_gets_the_lost_reply_a_second_answer_does_not(adapter, redis_client):
    await register(adapter, "a", max_jobs=2)
    job_id = (await dispatch(adapter, "s1:0:translate:en"))[1]
    key = await job_key_of(adapter, job_id)
    first = await adapter.script(*lua.complete(job_id, key, "a", 1, True, now_ms()))
    assert await adapter.script(*lua.complete(job_id, key, "a", 1, True, now_ms(), again=True)) == first
    with pytest.raises(AlreadyCompleted):  # the node sending it twice
        await adapter.script(*lua.complete(job_id, key, "a", 1, True, now_ms()))
    with pytest.raises(AlreadyCompleted):  # a repeat with another status is not the lost call
        await adapter.script(*lua.complete(job_id, key, "a", 1, False, now_ms(), again=True))
    assert slots(redis_client, "a") == 0


async def test_redispatch_moves_job_to_another_node_as_next_attempt(adapter, redis_client):
    await register(adapter, "a", max_jobs=2)
    await register(adapter, "b", max_jobs=2)
    job_id, first = (await dispatch(adapter, "s1:0:translate:en"))[1:3]
    other = "b" if first == "a" else "a"
    assert await redispatch(adapter, job_id, first, attempt=1) == ["OK", job_id, other, 2, ""]
    assert slots(redis_client, first) == 0 and slots(redis_client, other) == 1
    assert redis_client.smembers(keys.node_jobs(other)) == {job_id} and not redis_client.smembers(keys.node_jobs(first))
    # a second trigger for attempt 1 (e.g. lease expiry after the disconnect) changes nothing
    assert await redispatch(adapter, job_id, first, attempt=1) == ["NOOP", "dispatched", 2, other, "", lease(redis_client, job_id)]
    with pytest.raises(NodeMismatch):
        await complete(adapter, job_id, first, attempt=1)
    with pytest.raises(StaleAttempt):
        await complete(adapter, job_id, other, attempt=1)
    assert (await complete(adapter, job_id, other, attempt=2))[0] == "OK"
    assert slots(redis_client, other) == 0
    assert await redispatch(adapter, job_id, other, attempt=2) == ["NOOP", "finished", 2, other, "", lease(redis_client, job_id)]


async def test_redispatch_waits_when_no_other_node_and_can_be_retried(adapter, redis_client):
    await register(adapter, "a", max_jobs=1)
    job_id = (await dispatch(adapter, "k0"))[1]
    with pytest.raises(NoAvailableNode):
        await redispatch(adapter, job_id, "a", attempt=1)  # never back to the node it leaves
    assert slots(redis_client, "a") == 0  # released once
    assert redis_client.hget(keys.job(job_id), "status") == "waiting"
    await register(adapter, "b", max_jobs=1)
    assert await redispatch(adapter, job_id, "a", attempt=1) == ["OK", job_id, "b", 2, ""]
    assert slots(redis_client, "a") == 0 and slots(redis_client, "b") == 1
    assert await cancel(adapter, job_id, "b") == ["OK", "b", 2]
    assert slots(redis_client, "b") == 0


async def test_cancel_releases_once(adapter, redis_client):
    await register(adapter, "a", max_jobs=2)
    job_id = (await dispatch(adapter, "k0"))[1]
    assert await cancel(adapter, job_id, "a") == ["OK", "a", 1]
    assert await cancel(adapter, job_id, "a") == ["NOOP", "cancelled"]
    assert slots(redis_client, "a") == 0
    with pytest.raises(AlreadyCompleted):
        await complete(adapter, job_id, "a")


async def test_undeclared_candidates_are_refused_then_refreshed(adapter, redis_client):
    await register(adapter, "a", max_jobs=4)
    client = SchedulingClient(adapter)
    cached = await client.candidates("zh", "en")
    assert (cached.pools, cached.nodes, cached.members) == (("zh-en",), ("a",), (("a",),)) and cached.version
    await register(adapter, "b", max_jobs=4)  # joins after the read: not declared
    call = lua.dispatch("k0", "1", "s1", 0, "zh", "en", "t", "none", now_ms(), 30000, 6000, 0, cached)
    with pytest.raises(StaleCandidates):
        await adapter.script(*call)
    assert not redis_client.exists(keys.job("1")) and slots(redis_client, "a") == 0  # nothing changed
    # the client re-reads and retries: both nodes are candidates now, the empty one wins
    placed = [(await client.dispatch(f"k{i}", "s1", i, "zh", "en", "t", "none", now_ms(), 30000, 6000, 0))[2] for i in range(2)]
    assert sorted(placed) == ["a", "b"] and client.candidate_refreshes == 2


async def test_the_pool_tables_version_changes_with_them_and_never_comes_back(adapter, redis_client):
    """Node choice trusts a caller's candidates while the runtime table's '#pools' is the one
    they were read at: a registration that changes a pool's members or a pair's pools writes
    a new one; one that changes neither keeps it (no refresh for every reconnect); a table
    made again after it expired gets one never seen before."""
    def version():
        return redis_client.hget(keys.nodes_runtime(), "#pools")

    await register(adapter, "a", max_jobs=2, conn_id="c1")
    seen = [version()]
    await register(adapter, "a", max_jobs=3, conn_id="c2")  # reconnects, same pools
    assert version() == seen[-1]
    await register(adapter, "b", max_jobs=2)  # joins the pool
    seen.append(version())
    await register(adapter, "a", max_jobs=2, pairs=(("zh", "en"), ("zh", "de")))  # a pair more
    seen.append(version())
    await adapter.script(*lua.register_node("a", [("other", "zh", "de")], 2, now_ms(), "i1",  # leaves its pools: a new one
                                            old_pools=["zh-en", "zh-de"]))
    seen.append(version())
    assert len(set(seen)) == 4 and all(seen), seen
    stale = lua.read_candidates(redis_client, "zh", "en")
    redis_client.delete(keys.nodes_runtime())  # expired
    await register(adapter, "b", max_jobs=2)
    assert version() not in seen and version()
    call = lua.dispatch("k0", "1", "s1", 0, "zh", "en", "t", "none", now_ms(), 30000, 6000, 0, stale)
    with pytest.raises(StaleCandidates):
        await adapter.script(*call)


async def test_job_ids_come_in_blocks_and_are_never_reused(adapter, redis_client):
    await register(adapter, "a", max_jobs=8)
    first, second = SchedulingClient(adapter, id_block=3), SchedulingClient(adapter, id_block=3)
    before = now_ms() * 1000
    ids = [await c.next_job_id() for c in (first, second, first, second, first, second, first)]
    assert len(set(ids)) == 7 and before < int(ids[0]) and int(redis_client.get(keys.job_id_seq())) == int(ids[0]) + 8
    job_id = (await dispatch(adapter, "k0"))[1]
    call = lua.dispatch("k1", job_id, "s1", 1, "zh", "en", "t", "none", now_ms(), 30000, 6000, 0, lua.Candidates(("zh-en",), ("a",)))
    with pytest.raises(JobIdTaken):
        await adapter.script(*call)
    redis_client.flushall()  # Redis lost its data: the new sequence starts above every id taken before
    await trio.sleep(0.002)
    assert int(await SchedulingClient(adapter).next_job_id()) > max(int(i) for i in [*ids, job_id])


async def test_complete_and_cancel_refuse_a_foreign_job_key(adapter, redis_client):
    await register(adapter, "a", max_jobs=4)
    one = (await dispatch(adapter, "k0"))[1]
    two = (await dispatch(adapter, "k1"))[1]
    with pytest.raises(JobkeyMismatch):
        await adapter.script(*lua.complete(one, "k1", "a", 1, True, now_ms()))
    with pytest.raises(JobkeyMismatch):
        await adapter.script(*lua.cancel(one, "k1", "a", now_ms()))
    assert slots(redis_client, "a") == 2 and redis_client.ttl(keys.jobkey("k1")) > 1000
    assert redis_client.get(keys.jobkey("k1")) == two and redis_client.hget(keys.job(one), "status") == "dispatched"
    await complete(adapter, one, "a")  # its own key: cut to the done TTL, the audio emptied
    assert redis_client.get(keys.jobkey("k0")) == one and 0 < redis_client.ttl(keys.jobkey("k0")) <= keys.DONE_TTL_S
    assert not redis_client.hget(keys.job(one), "audio")


def test_every_lua_mutant_still_applies():
    """tests/mutants/lua_mutants.py: each mutant's text occurs exactly once in its script, so
    that `just mutants` runs them all; a change that moves a mutant's line moves the mutant."""
    from tests.mutants.lua_mutants import MUTANTS

    root = Path(__file__).resolve().parent.parent / "luascripts"
    stale = {m.name: (root / m.script).read_text().count(m.find) for m in MUTANTS}
    assert all(n == 1 for n in stale.values()), {name: n for name, n in stale.items() if n != 1}


def test_scripts_never_compute_a_key_name():
    """Redis Cluster: every key a script touches is one of its KEYS. So no script builds a key
    name: no ARGV prefix, and the key argument of every redis.call is a plain variable, a
    table field (declared candidates) or KEYS[...], never a concatenation or a call."""
    call = re.compile(r"redis\.call\('(\w+)',\s*([^,)]+)")
    for name, source in load_script_sources().items():
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("--"))
        assert "prefix" not in code, name
        for command, key in call.findall(code):
            assert re.fullmatch(r"[\w.]+(\[[\w +*()-]+\])?(\.\w+)?", key.strip()), (name, command, key)
            assert ".." not in key and "(" not in key, (name, command, key)


async def test_backend_is_what_the_parameter_says(adapter, request):
    """The cluster runs really go through RedisCluster, to all three masters' slots."""
    cluster = request.node.callspec.params["single_and_cluster_url"] == "cluster"
    assert adapter.cluster is cluster
    if cluster:
        # keys of other tags live on other masters and still work through the adapter
        for tag in ("a", "b", "c", "d"):
            await adapter.command("SET", f"{{{tag}}}probe", 1)
        assert await adapter.command("CLUSTER", "KEYSLOT", keys.TAG) >= 0


async def _place(a, job_key, near, slack, session_id="s1", rand=0):
    """dispatch_task placed by instance ``near`` with ``locality_slack``; returns the chosen node."""
    client = SchedulingClient(a, id_block=1)
    job_id = await client.next_job_id()
    reply = await client.run_many("zh", "en", [lambda c: lua.dispatch(
        job_key, job_id, session_id, 0, "zh", "en", f"t-{job_key}", "none", now_ms(), 30000, 6000, rand, c,
        placed_by=near, locality_slack=slack)])
    return reply[0][2]


async def test_nodes_of_the_placing_instance_come_first_within_the_slack(adapter, redis_client):
    await register(adapter, "here", max_jobs=4, owner="A")
    await register(adapter, "there", max_jobs=4, owner="B")
    # both empty: a tie, which the random draw would give to "there" (rand 1 of 2 sorted nodes)
    assert await _place(adapter, "s1:0:translate:en", "A", 0.0, rand=1) == "here"
    # "here" at 1/4, "there" at 0/4: 0.25 more load is within a slack of 0.3
    assert await _place(adapter, "s1:1:translate:en", "A", 0.3) == "here"
    # "here" at 2/4: 0.5 more is not within 0.1
    assert await _place(adapter, "s1:2:translate:en", "A", 0.1) == "there"
    # no instance named: the least loaded, as before
    assert await _place(adapter, "s1:3:translate:en", "", 1.0) == "there"


async def test_a_moved_job_prefers_the_moving_instance_s_nodes(adapter, redis_client):
    await register(adapter, "old", max_jobs=2, owner="A")
    await register(adapter, "here", max_jobs=4, owner="A")
    await register(adapter, "there", max_jobs=4, owner="B")
    await register(adapter, "there2", max_jobs=4, owner="B")
    job_id = (await dispatch(adapter, "s1:0:translate:en"))[1]
    old = redis_client.hget(keys.job(job_id), "node_id")
    reply = await adapter.script(*lua.redispatch(
        job_id, old, 1, "s1", "t1", "zh", "en", now_ms(), 30000, 6000, 0,
        await SchedulingClient(adapter).candidates("zh", "en"), near="A", locality_slack=0.5))
    assert reply[2] == ("here" if old != "here" else "old")


async def test_a_node_of_a_dead_instance_is_never_chosen(adapter, redis_client):
    await register(adapter, "gone", max_jobs=4, owner="dead")
    await register(adapter, "live", max_jobs=4, owner="alive")
    redis_client.zadd(keys.instances(), {"dead": now_ms() - 1, "alive": now_ms() + 60_000})
    placed = {(await dispatch(adapter, f"k{i}", rand=i))[2] for i in range(4)}
    assert placed == {"live"}  # "gone" would win every other tie
    redis_client.zadd(keys.instances(), {"alive": now_ms() - 1})
    with pytest.raises(NoAvailableNode):
        await dispatch(adapter, "k9")
    # an owner not listed at all counts as alive (its records are collected once it is gone)
    redis_client.zrem(keys.instances(), "dead", "alive")
    assert (await dispatch(adapter, "k10"))[2] in {"gone", "live"}
