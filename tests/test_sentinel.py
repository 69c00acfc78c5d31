"""Redis Sentinel failover while sessions stream (real valkey-server binaries: one primary,
two replicas, three sentinels, down-after 2 s).

The daemon connects with ``redis+sentinel://``. The primary is killed with SIGKILL while
``SESSIONS`` clients stream; the sentinels promote a replica and the daemon follows it.
Sessions must go on within 15 s with no connection closed. What asynchronous replication
loses (writes the primary acknowledged but never sent on) is counted: utterances whose
result is not ``SUCCESS``. With ``redis_wait_replicas = 1`` every write that matters waited
for a replica before the daemon went on, so the count must be 0.
"""

from __future__ import annotations

import logging

import pytest
import redis
import trio

from scheduler.ops.embedded_redis import EmbeddedValkey, _free_port_pairs
from scheduler.ops.embedded_sentinel import EmbeddedSentinelGroup
from scheduler.server import REPLICAS_SHORT
from scheduler.store.redis_adapter import RedisUnavailable

from .held_link import HeldLink
from .helpers import start_node
from .test_redis_faults import SESSIONS, Streams, new_session_refused
from .test_redis_restart import readyz, readyz_is, wait_for

RECOVERY_S = 15
LAG_S = 1.5


@pytest.fixture
def sentinel_group():
    # failover-timeout 60 s: the sentinels leave replicas that follow the primary through a
    # HeldLink alone that long (they "fix" a replica whose primary address looks wrong)
    group = EmbeddedSentinelGroup(replicas=2, sentinels=3, down_after_ms=2000, failover_timeout_ms=60000)
    group.start()
    links = [HeldLink(group.primary_port()) for _ in group.servers[1:]]
    for link, replica in zip(links, group.servers[1:], strict=True):
        with redis.Redis(host="127.0.0.1", port=replica.port) as c:
            c.execute_command("REPLICAOF", "127.0.0.1", link.port)
    group._wait_formed(20)
    yield group, links
    for link in links:
        link.close()
    group.stop()


class Recovery:
    """From the kill: when ``/readyz`` was 200 again, and when the first utterance finalized
    after the kill got its SUCCESS result."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.killed_at = 0.0
        self.ready_after: float | None = None
        self.first_result_after: float | None = None

    async def watch(self, daemon) -> None:
        self.killed_at = trio.current_time()
        seen = {n: set(r) for n, r in self.streams.results.items()}
        while self.ready_after is None or self.first_result_after is None:
            if self.ready_after is None and await readyz(daemon) == 200 and trio.current_time() - self.killed_at > 2:
                self.ready_after = trio.current_time() - self.killed_at
            if self.first_result_after is None and any(
                    status == "SUCCESS" and i not in seen[n] and i > max(seen[n] | {-1}) + 3
                    for n, r in self.streams.results.items() for i, status in r.items()):
                self.first_result_after = trio.current_time() - self.killed_at
            await trio.sleep(0.1)


async def fail_over(group, links, daemon) -> tuple[Streams, Recovery]:
    """Stream 3 s; then the replicas fall behind (held links) for ``LAG_S``; then the primary
    is killed. Jobs dispatched meanwhile are answered after the kill (the node takes 3 s)."""
    streams = Streams()
    recovery = Recovery(streams)
    async with trio.open_nursery() as clients:
        for n in range(SESSIONS):
            clients.start_soon(streams.run, daemon, n)
        await trio.sleep(3)
        for link in links:
            link.hold()
        await trio.sleep(LAG_S)
        await trio.to_thread.run_sync(group.kill_primary)
        with trio.move_on_after(RECOVERY_S + 10):
            await recovery.watch(daemon)
        await trio.sleep(2)
        streams.stop.set()
    return streams, recovery


def count(caplog, name: str) -> int:
    return sum(1 for r in caplog.records if getattr(r, "event", None) == name)


@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_sessions_go_on_after_a_sentinel_failover(sentinel_group, start_daemon, nursery, caplog, wait_replicas):
    group, links = sentinel_group
    caplog.set_level(logging.INFO)
    # lease 8 s: a job the failover forgot is placed again at its lease (its answer is refused:
    # UNKNOWN_JOB), and a 15 s lease + the node's 3 s + a wait behind the session's 16 jobs in
    # flight left no margin to the 20 s result deadline on a busy box
    daemon = await start_daemon(redis_url=group.url, result_deadline_ms=20000, redis_wait_replicas=wait_replicas,
                                job_lease_ms=8000)
    await start_node(nursery, daemon, node_id="n1", delay_ms=3000, max_jobs=64)
    streams, recovery = await fail_over(group, links, daemon)
    statuses = streams.statuses()
    lost = sum(n for status, n in statuses.items() if status != "SUCCESS")
    dropped, redone = count(caplog, "answer_dropped"), count(caplog, "job_moving")
    print(f"sentinel failover, wait_replicas={wait_replicas}: results {statuses}, utterances lost {lost}, "
          f"answers dropped (their job lost by the failover) {dropped}, jobs placed again {redone}, "
          f"ready again after {recovery.ready_after:.1f} s, first new result after {recovery.first_result_after:.1f} s")
    assert recovery.first_result_after is not None and recovery.first_result_after < RECOVERY_S
    assert not streams.closed and not streams.errors
    assert lost == 0, statuses  # what Redis forgot, the instance that placed it places again
    if wait_replicas:
        assert dropped == 0 and redone == 0  # nothing acknowledged was lost: no work done twice
    else:
        assert dropped > 0  # the lag bit: jobs dispatched meanwhile were unknown to the promoted replica


async def test_too_few_replicas_make_redis_unfit_until_one_is_back(tmp_path, start_daemon, nursery, caplog):
    """``redis_wait_replicas = 1``, and the primary's one replica goes away: durable writes
    count as not done (``replicas``), ``/readyz`` is 503 and a new session is refused
    ``UNAVAILABLE``; once a replica follows again, all is well."""
    caplog.set_level(logging.INFO)
    port = _free_port_pairs(1)[0]
    replica_args = ["--replicaof", "127.0.0.1", str(port)]
    with EmbeddedValkey(tmp_path / "primary", persist=False, port=port) as url:
        replica = EmbeddedValkey(tmp_path / "replica", persist=False, extra_args=replica_args)
        replica.start()
        await wait_for(lambda: following(replica), timeout=10)
        daemon = await start_daemon(redis_url=url, redis_wait_replicas=1, redis_wait_timeout_ms=100)
        await start_node(nursery, daemon, node_id="n1")
        await wait_for(lambda: readyz_is(daemon, 200), timeout=5)
        replica.stop()
        with pytest.raises(RedisUnavailable) as refused:
            await daemon.redis.command("XADD", "s", "*", "f", "v")  # a durable write (a job handed on)
        assert refused.value.reply == "replicas" and refused.value.ambiguous
        assert await daemon.redis.command("XLEN", "s") == 1  # done on the primary, not known to survive
        assert await daemon.redis.command("SET", "k", "v") is True  # not durable: no WAIT
        await wait_for(lambda: readyz_is(daemon, 503), timeout=5)
        assert daemon.redis_problem == REPLICAS_SHORT
        code, _ = await new_session_refused(daemon)
        assert code == ("UNAVAILABLE", 1013)
        with EmbeddedValkey(tmp_path / "replica", persist=False, extra_args=replica_args):
            await wait_for(lambda: readyz_is(daemon, 200), timeout=10)
            assert await daemon.redis.command("XADD", "s", "*", "f", "w")
        metrics = daemon.metrics.render().decode()
        assert 'scheduler_redis_errors_total{reply="replicas"}' in metrics and "scheduler_redis_replicas 1.0" in metrics


async def following(replica: EmbeddedValkey) -> bool:
    """Whether ``replica`` is in sync with its primary."""
    with redis.Redis.from_url(replica.url, decode_responses=True) as c:
        return c.info("replication").get("master_link_status") == "up"
