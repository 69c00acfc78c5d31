"""Layout 2's placement through the store (``SchedulingClient.place_many``, store/placing.py)
on the 3-master Valkey cluster and on one Valkey: the claim, the shard choice, a shard's
refusal moving the claim, a dead owner's claim burned, a duplicate, a repeat after a lost
reply, turn affinity across shards, and a move in its shard."""

import pytest

from scheduler.protocol import Register
from scheduler.store import keys, lua, placing
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import Fenced, NoAvailableNode, RedisAdapter, now_ms
from scheduler.store.scheduling import SchedulingClient

SPACE = KeySpace(3)


@pytest.fixture
def redis_url(single_and_cluster_url):
    return single_and_cluster_url


@pytest.fixture
async def client(redis_url):
    async with RedisAdapter(redis_url, space=SPACE) as a:
        yield SchedulingClient(a, id_block=8)


def node_in(shard: int, name: str = "n") -> str:
    """A node the test puts in ``shard`` (written to the node directory at registration)."""
    return f"{name}-s{shard}"


async def register(client: SchedulingClient, node_id: str, max_jobs: int = 1) -> None:
    shard = int(node_id.rpartition("-s")[2])
    await client._redis.command("HSET", keys.node_directory(), node_id, shard)
    await client.register_node(Register(node_id=node_id, lang_pairs=[["zh", "en"]], max_jobs=max_jobs), "i1", f"c-{node_id}")
    assert await client.heartbeats([lua.Beat(node_id, conn_id=f"c-{node_id}")]) == ["OK"]


def new_job(number: str, index: int, *, session: str = "s1", turn: str = "t1", action: str = "none",
            epoch: int | None = None) -> placing.NewJob:
    return placing.NewJob(f"{session}:{index}:translate:en", number, session, index, "zh", "en", turn, action, 1, epoch,
                          "", 16000, now_ms() + 10_000, index)


def ctx() -> placing.Context:
    return placing.Context(now_ms(), 30_000, 6_000, "i1", 0.0)


async def place(client: SchedulingClient, *items) -> list:
    return await client.place_many("zh", "en", list(items), ctx())


async def test_registration_asks_the_node_directory(client, redis_client):
    await client.register_node(Register(node_id="fresh", lang_pairs=[["zh", "en"]], max_jobs=1), "i1", "c-fresh")
    shard = int(redis_client.hget(keys.node_directory(), "fresh"))
    assert SPACE.node_shard("fresh") == shard
    assert redis_client.hget(keys.node_info("fresh", tag=SPACE.shard_tag(shard)), "online") == "1"


async def test_jobs_fill_every_shard_before_any_waits(client):
    nodes = {node_in(k) for k in range(3)}
    for node in nodes:
        await register(client, node)
    numbers = await client.job_ids(4)
    replies = await place(client, *(new_job(n, i) for i, n in enumerate(numbers)))
    placed = [r for r in replies if isinstance(r, list)]
    assert {r[2] for r in placed} == nodes, "a shard with no free slot is not a refusal while another has one"
    assert all(r[0] == "OK" and SPACE.job_shard(r[1]) == SPACE.node_shard(r[2]) for r in placed)
    assert isinstance(replies[3], NoAvailableNode), ("in order: the batch moves on together", replies)


async def test_a_refused_claim_is_taken_over_by_the_next_try_without_a_burn(client, redis_client):
    node = node_in(1)
    await register(client, node)
    first, second = await client.job_ids(2)
    assert (await place(client, new_job(first, 0)))[0][0] == "OK"
    assert isinstance((await place(client, new_job(second, 1)))[0], NoAvailableNode)
    claim_key = SPACE.jobkey_key("s1", "s1:1:translate:en")
    refused = redis_client.get(claim_key)
    assert placing.number_of(refused) == second
    job_id = (await place(client, new_job(first, 0)))[0]
    await client.complete(job_id[1], "s1:0:translate:en", node, 1, True, answer="{}", answer_ttl_s=60)
    (third,) = await client.job_ids(1)
    reply = (await place(client, new_job(third, 1)))[0]
    assert reply[0] == "OK" and redis_client.get(claim_key) == reply[1] == SPACE.job_id(1, int(third))
    assert not [k for k in redis_client.scan_iter("{scheduler:*}:job:[0-9]*") if redis_client.hget(k, "status") == "burned"]


async def test_a_dead_owners_claim_is_burned_and_its_late_dispatch_places_nothing(client, redis_client):
    node = node_in(2)
    await register(client, node, max_jobs=4)
    tag = SPACE.session_tag("s1")
    dead = SPACE.job_id(2, 5)  # claimed by an owner that died before its shard_dispatch
    redis_client.set(keys.jobkey("s1:0:translate:en", tag=tag), dead)
    (number,) = await client.job_ids(1)
    reply = (await place(client, new_job(number, 0)))[0]
    assert reply[0] == "OK" and reply[1] != dead
    assert redis_client.hget(keys.job(dead, tag=SPACE.shard_tag(2)), "status") == "burned"
    cand = await client.shard_candidates("zh", "en", 2)
    late = await client._redis.script(*lua.shard_dispatch("s1:0:translate:en", dead, "s1", 0, "zh", "en", "t1", now_ms(),
                                                          30_000, 6_000, 0, cand))
    assert late[0] == "EXISTS" and late[4] == "burned"
    assert redis_client.hget(keys.nodes_runtime(tag=SPACE.shard_tag(2)), keys.runtime_field(node, "current_jobs")) == "1"


async def test_a_job_key_placed_before_is_a_duplicate_and_a_lost_reply_is_recovered(client):
    await register(client, node_in(0), max_jobs=4)
    first, second = await client.job_ids(2)
    placed = (await place(client, new_job(first, 0)))[0]
    assert (await place(client, new_job(second, 0)))[0] == ["EXISTS", placed[1]], "another number: a duplicate"
    again = (await place(client, new_job(first, 0)))[0]  # the same number: a repeat after a lost reply
    assert again[:5] == ["EXISTS", placed[1], placed[2], 1, "dispatched"]


async def test_a_kept_turn_stays_on_its_node_across_shards(client):
    nodes = [node_in(k) for k in range(3)]
    for node in nodes:
        await register(client, node, max_jobs=8)
    numbers = await client.job_ids(6)
    first = (await place(client, new_job(numbers[0], 0, action="keep")))[0]
    for i, number in enumerate(numbers[1:5], start=1):
        action = "keep" if i < 4 else "end"
        assert (await place(client, new_job(number, i, action=action)))[0][2] == first[2]


async def test_a_stale_owner_is_fenced(client, redis_client):
    await register(client, node_in(0), max_jobs=4)
    redis_client.hset(SPACE.session_key("s1"), "epoch", 3)
    (number,) = await client.job_ids(1)
    assert isinstance((await place(client, new_job(number, 0, epoch=2)))[0], Fenced)


async def test_a_move_stays_in_its_shard_and_candidates_refresh(client, redis_client):
    a = node_in(1, "a")
    await register(client, a, max_jobs=2)
    (number,) = await client.job_ids(1)
    placed = (await place(client, new_job(number, 0)))[0]
    b = node_in(1, "b")  # registered after the candidates were read: STALE_CANDIDATES, then read again
    await register(client, b, max_jobs=2)
    move = placing.MoveJob(placed[1], a, 1, "s1", "t1", "zh", "en", 0)
    moved = (await place(client, move))[0]
    assert moved[:4] == ["OK", placed[1], b, 2]
    assert redis_client.hget(keys.job(placed[1], tag=SPACE.shard_tag(1)), "node_id") == b


async def test_a_lost_dispatch_is_cancelled_through_its_claim(client, redis_client):
    node = node_in(0)
    await register(client, node, max_jobs=2)
    (number,) = await client.job_ids(1)
    placed = (await place(client, new_job(number, 0)))[0]
    assert await client.cancel(number, "s1:0:translate:en", "") == ["OK", node, 1]
    assert redis_client.hget(keys.job(placed[1], tag=SPACE.shard_tag(0)), "status") == "cancelled"
    assert await client.cancel("999", "s1:1:translate:en", "") is None, "never claimed: nothing to cancel"


async def test_a_move_its_shard_cannot_take_moves_across_shards(client, redis_client):
    """The only node of shard 1 is lost; shard 2 serves the pair: the job leaves shard 1
    ("moved", with the id it became), its claim follows, and it runs in shard 2 at attempt 2."""
    a, b = node_in(1, "a"), node_in(2, "b")
    await register(client, a)
    (number,) = await client.job_ids(1)
    placed = (await place(client, new_job(number, 0)))[0]
    assert placed[1] == f"1.{number}"
    await register(client, b)
    client._serving_read.clear()  # (shard 2 serves the pair since: read again)
    move = placing.MoveJob(placed[1], a, 1, "s1", "t1", "zh", "en", 0)
    moved = (await place(client, move))[0]
    new = client.relocated(placed[1])
    assert new is not None and new.startswith("2."), new
    assert moved[:4] == ["OK", new, b, 2]
    old_hash = redis_client.hgetall(keys.job(placed[1], tag=SPACE.shard_tag(1)))
    assert (old_hash["status"], old_hash["moved_to"]) == ("moved", new)
    new_hash = redis_client.hgetall(keys.job(new, tag=SPACE.shard_tag(2)))
    assert (new_hash["status"], new_hash["attempt"], new_hash["moved_from"]) == ("dispatched", "2", placed[1])
    assert new_hash["job_key"] == "s1:0:translate:en" and new_hash["deadline_ms"] == old_hash["deadline_ms"]
    assert redis_client.get(SPACE.jobkey_key("s1", "s1:0:translate:en")) == new, "the claim follows the job"
    assert client.relocated(placed[1]) is None, "told once"
    # a release of the old id follows it to the job it became
    assert await client.cancel(placed[1], "s1:0:translate:en", a) == ["OK", b, 2]
    assert redis_client.hget(keys.job(new, tag=SPACE.shard_tag(2)), "status") == "cancelled"
    assert redis_client.hget(keys.nodes_runtime(tag=SPACE.shard_tag(2)), keys.runtime_field(b, "current_jobs")) == "0"


async def test_a_release_racing_a_move_across_shards_burns_the_job_it_becomes(client, redis_client):
    """The old job left its shard but the new one is not made yet: a release that follows
    ``moved_to`` burns the new id, and the move then creates nothing."""
    a, b = node_in(1, "a"), node_in(2, "b")
    await register(client, a)
    await register(client, b)
    (number,) = await client.job_ids(1)
    job = new_job(number, 0)
    old = f"1.{number}"
    await client._redis.script(*lua.session_claim(job.job_key, old, "s1", 0, "t1", "none", tag=SPACE.session_tag("s1")))
    cand = await client.shard_candidates("zh", "en", 1, True)
    await client._redis.script(*lua.shard_dispatch(job.job_key, old, "s1", 0, "zh", "en", "t1", now_ms(), 30_000, 6_000,
                                                   0, cand, deadline_ms=job.deadline_ms))
    await client._redis.command("HSET", keys.job(old, tag=SPACE.shard_tag(1)), "status", "waiting")
    new = f"2.{number}9"
    out = await client._redis.script(*lua.job_move_out(old, 1, new, now_ms(), tag=SPACE.shard_tag(1)))
    assert out[0] == "OK"
    again = await client._redis.script(*lua.job_move_out(old, 1, new, now_ms(), tag=SPACE.shard_tag(1)))
    assert again[0] == "OK" and dict(zip(again[1::2], again[2::2], strict=True)).get("job_key") == job.job_key, "a repeat replies again"
    assert (await client._redis.script(*lua.job_move_out(old, 1, "2.77", now_ms(), tag=SPACE.shard_tag(1))))[0] == "NOOP"
    assert await client.cancel(old, job.job_key, a) == ["NOOP", "burned"]
    assert redis_client.hget(keys.job(new, tag=SPACE.shard_tag(2)), "status") == "burned"
    fields = dict(zip(out[1::2], out[2::2], strict=True))
    claim = SPACE.jobkey_key("s1", job.job_key)
    assert await client._redis.script(*lua.claim_move(claim, old, new, 300)) == ["MOVED"]
    assert await client._redis.script(*lua.claim_move(claim, old, new, 300)) == ["MOVED"], "idempotent"
    assert await client._redis.script(*lua.claim_move(claim, old, "2.5", 300)) == ["EXISTS", new]
    got = await client._redis.script(*lua.job_move_in(new, job.job_key, old, fields, tag=SPACE.shard_tag(2)))
    assert got == ["EXISTS", "burned", 0], "burned first: the move creates nothing"
