"""Layout 2's scripts (docs/redis.md, "Scheduling shards"), through the real adapter, on one
Valkey and on the 3-master Valkey cluster: the session's claim in the session's slot, the
job's placement in its node's shard, answers and cancels in that shard, and a resuming
owner's burn of a claim whose job never came. On the cluster each call would fail
``CROSSSLOT`` if a script touched two slots; ``test_every_call_touches_one_slot`` checks it
for any number of shards without a server.
"""

import pytest
from redis.crc import key_slot

from scheduler.store import keys, lua
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import Fenced, JobIdTaken, NoAvailableNode, now_ms

SPACE = KeySpace(3)


@pytest.fixture
def redis_url(single_and_cluster_url):
    """Every test here runs on one Valkey and on a 3-master Valkey cluster, both emptied."""
    return single_and_cluster_url


def node_in(shard: int, name: str = "n") -> str:
    """A node in ``shard`` (as the node directory would have said: the daemon learns it)."""
    SPACE.learn(f"{name}-s{shard}", shard)
    return f"{name}-s{shard}"


async def register(a, node_id: str, max_jobs: int = 2, pool: str = "zh-en") -> str:
    tag = SPACE.node_tag(node_id)
    await a.script(*lua.register_node(node_id, [(pool, "zh", "en")], max_jobs, now_ms(), "i1", tag=tag))
    await a.script(*lua.heartbeat(node_id, now_ms(), tag=tag))
    return tag


async def candidates(a, shard: int) -> lua.Candidates:
    tag = SPACE.shard_tag(shard)
    version = await a.command(*lua.pools_version_read(tag))
    pools = list(await a.command("HKEYS", keys.lang_pools("zh", "en", tag=tag)))
    return lua.candidates_from(version, pools, [await a.command("SMEMBERS", keys.pool_members(p, tag=tag)) for p in pools], tag)


async def claim(a, job_key: str, job_id: str, *, index: int = 0, session: str = "s1", **kw):
    return await a.script(*lua.session_claim(job_key, job_id, session, index, "t1", kw.pop("turn_action", ""),
                                             tag=SPACE.session_tag(session), **kw))


async def place(a, job_key: str, job_id: str, *, index: int = 0, session: str = "s1", hints=("", "")):
    return await a.script(*lua.shard_dispatch(job_key, job_id, session, index, "zh", "en", "t1", now_ms(), 30000, 6000, 0,
                                              await candidates(a, SPACE.job_shard(job_id)), preferred=hints[0],
                                              affinity=hints[1], placed_by="i1"))


def test_one_shard_is_layout_1_byte_for_byte():
    one = KeySpace(1)
    assert one.shard_tag(0) == one.node_tag("n1") == one.session_tag("s1") == one.job_tag("17") == keys.TAG
    assert one.job_id(0, 17) == "17"
    assert lua.dispatch("k", "17", "s1", 0, "zh", "en", "t1", "keep", 1, 2, 3, 4, lua.Candidates(("p",), ("n1",))) \
        == lua.dispatch("k", "17", "s1", 0, "zh", "en", "t1", "keep", 1, 2, 3, 4,
                        lua.Candidates(("p",), ("n1",), one.node_tag("n1")))
    assert lua.complete("17", "k", "n1", 1, True, 5) == lua.complete("17", "k", "n1", 1, True, 5, tag=one.job_tag("17"))


@pytest.mark.parametrize("count", [2, 3, 12])
def test_every_call_touches_one_slot(count):
    space = KeySpace(count)
    for shard in range(count):
        job_id, tag, node = space.job_id(shard, 7), space.shard_tag(shard), f"node-{shard}"
        cand = lua.Candidates(("p1", "p2"), (node, "other"), tag)
        calls = [lua.shard_dispatch("k", job_id, "s1", 0, "zh", "en", "t1", 1, 2, 3, 4, cand),
                 lua.complete(job_id, "k", node, 1, True, 5, tag=tag, claim=False),
                 lua.cancel(job_id, "k", node, 5, tag=tag, claim=False),
                 lua.job_burn("k", job_id, 5, tag=tag),
                 lua.register_node(node, [("p1", "zh", "en")], 2, 5, "i1", old_pools=["p3"], tag=tag),
                 lua.heartbeat(node, 5, tag=tag), lua.node_state(node, "i1", online=True, draining=False, tag=tag),
                 lua.session_claim("k", job_id, "s1", 0, "t1", "keep", tag=space.session_tag("s1"))]
        for name, call_keys, _ in calls:
            assert len({key_slot(k.encode()) for k in call_keys}) == 1, name
        assert space.job_shard(job_id) == shard
    assert len({key_slot(space.shard_tag(k).encode()) for k in range(count)}) == count
    assert space.session_tag("s1") != space.session_tag("s2")


async def test_the_node_directory_spreads_nodes_and_keeps_them(adapter):
    order = [0, 2, 1]  # (the daemon orders shards round robin over the primaries)
    given = [await adapter.script(*lua.node_shard(f"d{i}", order)) for i in range(6)]
    assert given == [0, 2, 1, 0, 2, 1], "the emptiest shard, ties in the caller's order"
    assert await adapter.script(*lua.node_shard("d1", order)) == 2, "a node keeps its shard"
    assert await adapter.script(*lua.node_shard("d9", order, known=1)) == 1, "a shard it was known in (directory lost)"


def test_new_sessions_spread_over_the_slot_ranges():
    space = KeySpace(3)
    ids = [space.new_session_id() for _ in range(30)]
    ranges = [key_slot(space.session_tag(i).encode()) * 3 // 16384 for i in ids]
    assert ranges == [0, 1, 2] * 10 and len(set(ids)) == 30 and all(len(i) == 32 for i in ids)
    assert len(KeySpace(1).new_session_id()) == 32


def test_job_ids_of_a_peer_are_checked():
    for bad in ["7", "3.7", "-1.7", "a.7", "1.", ".7", "1.7.1", "².7"]:
        with pytest.raises(ValueError):
            SPACE.job_shard(bad)
    assert SPACE.job_shard("2.99") == 2


async def test_claim_then_place_in_the_nodes_shard(adapter, redis_client):
    node = node_in(1)
    tag = await register(adapter, node)
    job_id = SPACE.job_id(1, 100)
    assert await claim(adapter, "s1:0:translate:en", job_id) == ["CLAIMED", job_id, "", ""]
    reply = await place(adapter, "s1:0:translate:en", job_id)
    assert reply[:4] == ["OK", job_id, node, 1] and reply[5:] == [1, 2], "one of two slots left"
    assert redis_client.hget(keys.job(job_id, tag=tag), "status") == "dispatched"
    assert redis_client.zscore(keys.leases(tag=tag), job_id) is not None
    assert redis_client.hget(keys.nodes_runtime(tag=tag), keys.runtime_field(node, "current_jobs")) == "1"
    session = keys.session("s1", tag=SPACE.session_tag("s1"))
    assert redis_client.hget(session, "next_utterance_index") == "1"
    assert not redis_client.exists(keys.job(job_id)), "nothing under layout 1's tag"

    done = await adapter.script(*lua.complete(job_id, "s1:0:translate:en", node, 1, True, now_ms(), answer='{"a": 1}',
                                              answer_ttl_s=60, tag=tag, claim=False))
    assert done == ["OK", "s1", "s1:0:translate:en", 0, "en"]
    assert redis_client.hget(keys.job(job_id, tag=tag), "answer") == '{"a": 1}'
    assert redis_client.hget(keys.nodes_runtime(tag=tag), keys.runtime_field(node, "current_jobs")) == "0"
    claim_key = keys.jobkey("s1:0:translate:en", tag=SPACE.session_tag("s1"))
    assert redis_client.get(claim_key) == job_id, "the claim stays until its own TTL"


async def test_claims_are_idempotent_and_compare_and_set(adapter, redis_client):
    first, second = SPACE.job_id(0, 1), SPACE.job_id(2, 2)
    turn = keys.turn("t1", tag=SPACE.session_tag("s1"))
    redis_client.hset(turn, "affinity_node_id", "nX")  # a turn kept going before
    assert (await claim(adapter, "k0", first, turn_action="end", turn_jobs=2))[0] == "CLAIMED"
    assert await claim(adapter, "k0", first, turn_action="end", turn_jobs=2) == ["CLAIMED", first, "", "nX"]
    assert await claim(adapter, "k0", second) == ["EXISTS", first]
    assert await claim(adapter, "k0", second, replaces="9.9") == ["EXISTS", first]
    assert (await claim(adapter, "k0", second, turn_action="end", turn_jobs=2, replaces=first))[0] == "CLAIMED"
    assert redis_client.hget(turn, "ended_jobs") == "1", "a repeat and a replace count no end again"
    assert redis_client.get(keys.jobkey("k0", tag=SPACE.session_tag("s1"))) == second
    assert (await claim(adapter, "k1", SPACE.job_id(0, 3), turn_action="end", turn_jobs=2))[0] == "CLAIMED"
    assert not redis_client.exists(turn), "the second end of two deletes the turn"


async def test_claim_keeps_the_turns_affinity_and_the_preferred_pool(adapter, redis_client):
    redis_client.hset(keys.session("s1", tag=SPACE.session_tag("s1")), "preferred_pool", "fast")
    assert await claim(adapter, "k0", "0.1", turn_action="keep") == ["CLAIMED", "0.1", "fast", ""]
    assert await claim(adapter, "k1", "0.2", turn_action="keep", affinity="nA") == ["CLAIMED", "0.2", "fast", "nA"]
    assert await claim(adapter, "k2", "0.3", turn_action="end") == ["CLAIMED", "0.3", "fast", "nA"]


async def test_a_stale_owner_is_fenced_at_the_claim(adapter, redis_client):
    redis_client.hset(keys.session("s1", tag=SPACE.session_tag("s1")), "epoch", "2")
    with pytest.raises(Fenced):
        await claim(adapter, "k0", "0.1", epoch=1)
    assert not redis_client.exists(keys.jobkey("k0", tag=SPACE.session_tag("s1")))
    assert (await claim(adapter, "k0", "0.1", epoch=2))[0] == "CLAIMED"


async def test_a_full_shard_refuses_and_the_claim_moves(adapter, redis_client):
    full, free = node_in(0), node_in(2)
    await register(adapter, full, max_jobs=1)
    await register(adapter, free, max_jobs=1)
    assert (await claim(adapter, "k0", "0.1"))[0] == "CLAIMED"
    assert (await place(adapter, "k0", "0.1"))[2] == full
    assert (await claim(adapter, "k1", "0.2", index=1))[0] == "CLAIMED"
    with pytest.raises(NoAvailableNode):
        await place(adapter, "k1", "0.2", index=1)
    assert not redis_client.exists(keys.job("0.2", tag=SPACE.shard_tag(0))), "a refusal changes nothing"
    assert (await claim(adapter, "k1", "2.3", index=1, replaces="0.2"))[0] == "CLAIMED"
    assert (await place(adapter, "k1", "2.3", index=1))[2] == free


async def test_placement_is_idempotent_on_the_job_id(adapter, redis_client):
    node = node_in(1)
    await register(adapter, node, max_jobs=4)
    first = await place(adapter, "k0", "1.5")
    again = await place(adapter, "k0", "1.5")
    assert again[:5] == ["EXISTS", "1.5", node, 1, "dispatched"] and again[5] == first[4]
    assert redis_client.hget(keys.nodes_runtime(tag=SPACE.shard_tag(1)), keys.runtime_field(node, "current_jobs")) == "1"
    with pytest.raises(JobIdTaken):
        await place(adapter, "another key", "1.5")


async def test_a_claim_whose_job_never_came_is_burned(adapter, redis_client):
    """The old owner claimed, then its shard_dispatch was late (or never came). The new owner
    burns the id in its shard; the late dispatch then places nothing, and the job key is
    claimed again under a new id. A job that did land is taken over as it is."""
    node = node_in(1)
    tag = await register(adapter, node, max_jobs=4)
    assert (await claim(adapter, "k0", "1.7", epoch=1))[0] == "CLAIMED"
    assert await adapter.script(*lua.job_burn("k0", "1.7", now_ms(), tag=tag)) == ["BURNED"]
    late = await place(adapter, "k0", "1.7")
    assert late[0] == "EXISTS" and late[4] == "burned"
    assert redis_client.hget(keys.nodes_runtime(tag=tag), keys.runtime_field(node, "current_jobs")) == "0"
    assert (await claim(adapter, "k0", "1.8", replaces="1.7"))[0] == "CLAIMED"
    assert (await place(adapter, "k0", "1.8"))[0] == "OK"
    landed = await adapter.script(*lua.job_burn("k0", "1.8", now_ms(), tag=tag))
    assert landed[:5] == ["EXISTS", "1.8", node, 1, "dispatched"]


async def test_cancel_in_the_jobs_shard(adapter, redis_client):
    node = node_in(2)
    tag = await register(adapter, node)
    await place(adapter, "k0", "2.1")
    assert await adapter.script(*lua.cancel("2.1", "k0", node, now_ms(), tag=tag, claim=False)) == ["OK", node, 1]
    assert redis_client.hget(keys.job("2.1", tag=tag), "status") == "cancelled"
    assert redis_client.hget(keys.nodes_runtime(tag=tag), keys.runtime_field(node, "current_jobs")) == "0"
