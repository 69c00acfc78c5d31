import pytest
import trio

from scheduler.store import lua
from scheduler.store.redis_adapter import BadRequest, RedisAdapter, RedisUnavailable, load_script_sources


def test_every_script_binds_keys_and_argv_and_documents_its_contract():
    sources = load_script_sources()
    assert {"register_node", "heartbeats", "dispatch_task", "complete_task", "cancel_task", "node_state"} <= set(sources)
    for name, src in sources.items():
        assert src.startswith(f"-- {name}:"), name
        assert "Reply:" in src, name
        code = [line for line in src.splitlines() if line.strip() and not line.lstrip().startswith("--")]
        assert code[0].startswith("local ") and code[0].endswith("= KEYS[1]"), name


async def test_concurrent_calls_are_batched(redis_url):
    async with RedisAdapter(redis_url, pool_size=2) as a:
        results = {}

        async def call(i):
            results[i] = await a.command("ECHO", str(i))

        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(call, i)
        assert results == {i: str(i) for i in range(500)}
        assert a.calls_total == 500
        assert a.batches_total < 100  # many calls per pipeline


async def test_one_bad_call_does_not_fail_its_batch(redis_url):
    async with RedisAdapter(redis_url) as a:
        await a.command("SET", "s", "x")
        outcomes = {}

        async def good():
            outcomes["good"] = await a.command("GET", "s")

        async def bad():
            try:
                await a.command("INCR", "s")
            except Exception as exc:  # noqa: BLE001
                outcomes["bad"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bad)
            nursery.start_soon(good)
        assert outcomes["good"] == "x"
        assert "not an integer" in str(outcomes["bad"])


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
async def test_a_poisoned_call_fails_alone_between_good_ones(cluster, flushed_single_url, flushed_cluster_url):
    """A value redis-py cannot encode (a lone surrogate, None, a bool) used to fail the whole
    pipeline while it was packed: every call batched beside it failed too (a dispatcher lane
    with them). Now it is refused alone and its neighbours, in the same pipeline, succeed."""
    url = flushed_cluster_url if cluster else flushed_single_url
    async with RedisAdapter(url, pool_size=1) as a:
        poison = [("SET", "{t}:bad", "\ud800"), ("SET", "{t}:none", None), ("SET", "{t}:bool", True)]
        good = [("SET", f"{{t}}:good{i}", f"v{i}") for i in range(4)]
        replies = await a.commands_many([good[0], poison[0], good[1], poison[1], good[2], poison[2], good[3]])
        assert [isinstance(r, BadRequest) for r in replies] == [False, True, False, True, False, True, False]
        assert [replies[i] for i in (0, 2, 4, 6)] == [True] * 4
        # and as separate callers that the batcher puts into one pipeline
        outcomes = {}

        async def call(name, *args):
            try:
                outcomes[name] = await a.command(*args)
            except BadRequest as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(call, f"good{i}", "ECHO", f"e{i}")
                nursery.start_soon(call, f"bad{i}", "ECHO", "x\udfff")
        assert all(outcomes[f"good{i}"] == f"e{i}" for i in range(10))
        assert all(isinstance(outcomes[f"bad{i}"], BadRequest) for i in range(10))
        assert a.batches_total < 21  # (they did share pipelines)


async def test_scripts_reload_after_script_flush(redis_url):
    async with RedisAdapter(redis_url) as a:
        await a.load_scripts()
        await a.command("SCRIPT", "FLUSH")
        reply = await a.script(*lua.cancel("1", "k", "n", 0))
        assert reply == ["NOOP", ""]


async def test_unreachable_redis_raises_typed_error(tmp_path):
    async with RedisAdapter(f"unix://{tmp_path}/nothing.sock", socket_timeout=0.5) as a:
        with pytest.raises(RedisUnavailable):
            await a.ping()


async def test_shielded_cleanup_gets_replies_when_everything_is_cancelled(redis_url):
    """Cancelling the daemon (adapter and its users alike) must not strand a shielded cleanup call."""
    got = []

    async def user(adapter):
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                got.append(await adapter.command("ECHO", "cleanup"))

    with trio.fail_after(5):  # liveness: before the fix this waited forever
        with trio.CancelScope() as everything:
            async with RedisAdapter(redis_url) as a:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(user, a)
                    await trio.sleep(0.05)
                    everything.cancel()
    assert got == ["cleanup"]


async def test_scripts_in_a_cluster_pipeline_cost_no_getkeys(valkey_cluster_url):
    """redis-py's cluster pipeline would ask ``COMMAND GETKEYS`` of one node before every
    EVALSHA (it cannot tell a movable-keys command's routing): one extra round trip per script
    call, on one primary. The adapter routes scripts by their declared keys instead."""
    from scheduler.store.redis_adapter import connect

    cluster = connect(valkey_cluster_url, decode_responses=True)
    nodes = [node.redis_connection for node in cluster.get_primaries()]

    def getkeys() -> int:
        return sum(int(n.info("commandstats").get("cmdstat_command|getkeys", {}).get("calls", 0)) for n in nodes)

    async with RedisAdapter(valkey_cluster_url) as adapter:
        before = getkeys()
        replies = await adapter.script_many([lua.heartbeat(f"gk{i}", 1, tag=f"{{scheduler:{i}}}") for i in range(12)])
        assert getkeys() == before, "a GETKEYS per script call"
    assert replies == [[["UNKNOWN_NODE"]]] * 12  # (they ran, on their slots)
    cluster.close()
