"""Redis stalls and fills up while sessions stream (a real Valkey of its own, real sockets).

A stall is ``SIGSTOP`` of the Valkey process for 3, 8 or 20 s, then ``SIGCONT``: what a
fork on a big heap, a slow script or a network blackhole looks like. Calls sent meanwhile
time out (the adapter's 5 s socket timeout) and run when Redis resumes: every outcome is
ambiguous. A full Redis is ``maxmemory`` set below its use for 15 s under ``noeviction``:
every write is refused ``OOM``.

Either way: no answer a node delivered is lost, no node is closed for a silence that was
the daemon's own wait, no session connection is closed, and every translation ends
``SUCCESS`` (the stalls and the full episode are shorter than the result deadline).
"""

from __future__ import annotations

import logging
import os
import signal

import pytest
import redis
import trio

from scheduler.ops.embedded_redis import EmbeddedValkey
from scheduler.ops.redis_policy import embedded_args

from .helpers import session, speak, start_node
from .test_redis_restart import readyz, wait_for

SESSIONS = 4
BAD_EVENTS = {"node_heartbeat_timeout", "node_disconnected", "answer_not_stored", "placement_crashed", "lane_failed", "connection_failed",
              "session_error", "client_error"}


@pytest.fixture
def valkey(tmp_path):
    server = EmbeddedValkey(tmp_path / "valkey", persist=False, extra_args=embedded_args(256))
    url = server.start()
    yield server, url
    if server.pid:
        os.kill(server.pid, signal.SIGCONT)
    server.stop()


class Streams:
    """``SESSIONS`` clients, each cutting an utterance (300 ms of speech, ``finalize``) every
    0.4 s until told to stop, and reading everything the daemon sends."""

    def __init__(self) -> None:
        self.stop = trio.Event()
        self.finalized: dict[int, set[int]] = {}
        self.results: dict[int, dict[int, str]] = {}
        self.closed: list[int] = []
        self.errors: list[dict] = []

    async def run(self, daemon, n: int) -> None:
        self.finalized[n], self.results[n] = set(), {}
        async with session(daemon) as s, trio.open_nursery() as nursery:
            nursery.start_soon(self._read, s, n)
            while not self.stop.is_set():
                await speak(s)
                await s.send(type="finalize")
                await trio.sleep(0.4)
            with trio.fail_after(60):  # every finalized utterance gets its result
                while len(self.results[n]) < len(self.finalized[n]) or not self.finalized[n]:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    async def _read(self, s, n: int) -> None:
        while True:
            try:
                msg = await s.recv(timeout=120)
            except Exception:
                self.closed.append(n)
                raise
            if msg["type"] == "utterance_finalized":
                self.finalized[n].add(msg["utterance_index"])
            elif msg["type"] == "result":
                self.results[n][msg["utterance_index"]] = msg["translations"]["en"]["status"]
            elif msg["type"] == "error":
                self.errors.append(msg)

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for per_session in self.results.values():
            for status in per_session.values():
                counts[status] = counts.get(status, 0) + 1
        return counts


def bad_events(caplog) -> list[str]:
    return [f"{r.event} {getattr(r, 'fields', '')}" for r in caplog.records if getattr(r, "event", None) in BAD_EVENTS]


async def stream_through(daemon, nursery, fault) -> Streams:
    """Stream from ``SESSIONS`` clients, run ``fault`` after 2 s, stream 2 s more, then wait
    for every result."""
    streams = Streams()
    async with trio.open_nursery() as clients:
        for n in range(SESSIONS):
            clients.start_soon(streams.run, daemon, n)
        await trio.sleep(2)
        await fault()
        await trio.sleep(2)
        streams.stop.set()
    return streams


@pytest.mark.parametrize("seconds", [3, 8, 20])
async def test_a_redis_stall_loses_no_answer_and_blames_no_node(valkey, start_daemon, nursery, caplog, seconds):
    server, url = valkey
    caplog.set_level(logging.INFO)
    daemon = await start_daemon(redis_url=url)
    await start_node(nursery, daemon, node_id="n1", delay_ms=20, max_jobs=8)
    unready = []

    async def stall():
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with trio.move_on_after(seconds):
                while True:
                    unready.append(await readyz(daemon))
                    await trio.sleep(0.5)
        finally:
            os.kill(server.pid, signal.SIGCONT)

    streams = await stream_through(daemon, nursery, stall)
    statuses = streams.statuses()
    print(f"stall {seconds} s: results {statuses}, readyz during it {sorted(set(unready))}")
    assert set(statuses) == {"SUCCESS"}, statuses
    assert sum(statuses.values()) >= SESSIONS * (4 + seconds) / 0.7 * 0.5  # utterances kept coming, during the stall too
    assert not streams.closed and not streams.errors and not bad_events(caplog)
    assert daemon.nodes.get("n1") is not None  # never closed (node_disconnected, above), never reconnected
    if seconds >= 8:
        assert 503 in unready  # the health check's 5 s bound: not ready while it stalls
    metrics = daemon.metrics.render().decode()
    assert 'scheduler_redis_errors_total{reply="timeout"}' in metrics or seconds < 5
    counted = [r for r in caplog.records if getattr(r, "event", None) == "redis_outage_counted_out"]
    assert counted and sum(r.fields["seconds"] for r in counted) >= seconds - 1.5, counted  # deadlines count it out
    assert daemon.metrics.redis_outage_seconds_total._value.get() >= seconds - 1.5


async def test_a_full_redis_refuses_writes_closes_nothing_and_recovers(valkey, start_daemon, nursery, caplog):
    server, url = valkey
    caplog.set_level(logging.INFO)
    daemon = await start_daemon(redis_url=url)
    await start_node(nursery, daemon, node_id="n1", delay_ms=20, max_jobs=8)
    admin = redis.Redis.from_url(url)
    during: dict[str, list] = {"readyz": [], "refused": []}

    async def fill():
        admin.config_set("maxmemory", 1)
        try:
            await wait_for(lambda: is_unready(daemon), timeout=5)
            with trio.move_on_after(15):
                while True:
                    during["readyz"].append(await readyz(daemon))
                    during["refused"].append(await new_session_refused(daemon))
                    await trio.sleep(1)
        finally:
            admin.config_set("maxmemory", 256 * 2**20)

    streams = await stream_through(daemon, nursery, fill)
    statuses = streams.statuses()
    print(f"full 15 s: results {statuses}, readyz during it {sorted(set(during['readyz']))}, refused {during['refused'][:1]}")
    assert set(statuses) == {"SUCCESS"}, statuses
    assert set(during["readyz"]) == {503}, during
    assert all(code == ("UNAVAILABLE", 1013) and 1000 <= retry <= 3000 for code, retry in during["refused"]), during
    assert not streams.closed and not streams.errors and not bad_events(caplog)
    assert daemon.nodes.get("n1") is not None
    await wait_for(lambda: is_ready(daemon), timeout=5)
    metrics = daemon.metrics.render().decode()
    assert 'scheduler_redis_errors_total{reply="OOM"}' in metrics
    assert "scheduler_redis_memory_max_bytes 2.68435456e+08" in metrics


async def is_unready(daemon) -> bool:
    return await readyz(daemon) == 503


async def is_ready(daemon) -> bool:
    return await readyz(daemon) == 200


async def new_session_refused(daemon) -> tuple[tuple[str, int], int]:
    """A new session while Redis is full: its ``error`` code and close code, and retry_after_ms."""
    from .helpers import peer

    async with peer(daemon.ws_url + "/v1/session") as p:
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en"])
        error = await p.recv()
        with trio.fail_after(5):
            while not p.closed:
                await trio.sleep(0.05)
        return (error.get("code"), p.closed.code), error.get("retry_after_ms", 0)


async def test_an_instance_starts_while_redis_is_full(valkey, start_daemon, nursery, caplog):
    """An instance (re)started during a full Redis (kill -9 and a restart by systemd, while
    another fault lasts) comes up unready instead of exiting: what it could not write at
    start (the relay's consumer group) is made once Redis takes writes again."""
    server, url = valkey
    caplog.set_level(logging.INFO)
    admin = redis.Redis.from_url(url)
    admin.config_set("maxmemory", 1)
    try:
        with trio.fail_after(10):
            daemon = await start_daemon(redis_url=url)
        await wait_for(lambda: is_unready(daemon), timeout=5)
    finally:
        admin.config_set("maxmemory", 256 * 2**20)
    await wait_for(lambda: is_ready(daemon), timeout=10)
    assert any(getattr(r, "event", None) == "relay_group_deferred" for r in caplog.records)
    await start_node(nursery, daemon, node_id="n1", delay_ms=20, max_jobs=2)
    streams = await stream_through(daemon, nursery, lambda: trio.sleep(0))
    assert set(streams.statuses()) == {"SUCCESS"} and not streams.closed and not streams.errors, streams.statuses()
