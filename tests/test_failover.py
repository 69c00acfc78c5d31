"""Failover over real processes (issue 6): two ``scheduler serve`` processes on one Valkey,
a reference node on B, clients streaming to A. A is killed with SIGKILL mid-stream; every
client reconnects to B with ``session_id`` + ``resume_from`` (its last result + 1), resends
the audio of the utterances B says were not finalized, and must end up with results
0..n-1 exactly once, in order, each the node's answer for exactly that utterance's audio.

Failover time (kill -> first result on B, per client) is printed; ``just failover`` runs
this file with its output shown. docs/scaling.md records what it measured.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import time
import zlib

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from scheduler.session.audio import tone

from .helpers import peer, start_node, token_of
from .test_e2e import Daemon

pytestmark = pytest.mark.slow


@pytest.fixture(params=["single", "cluster"])
def redis_url(request):
    return request.getfixturevalue("flushed_cluster_url" if request.param == "cluster" else "flushed_single_url")

UTTERANCES = 10
SPEECH_MS = 300


def utterance_audio(k: int) -> list[bytes]:
    pcm = tone(SPEECH_MS, freq=300 + 40 * k)
    return [pcm[i:i + 3200] for i in range(0, len(pcm), 3200)]  # 100 ms frames


def expected_text(k: int) -> str:
    pcm = b"".join(utterance_audio(k))
    return f"[en] {SPEECH_MS}ms crc32={zlib.crc32(pcm):08x}"


@attrs.define
class ResumingClient:
    """Streams UTTERANCES utterances (each explicitly finalized), resuming on another URL
    when its connection breaks."""

    name: str
    session_id: str | None = None
    results: list[dict] = attrs.Factory(list)  # every result received, in arrival order
    connections: int = 0
    broke_at: float | None = None
    first_after_break: float | None = None
    first_result_after_break: dict | None = None
    closed: dict | None = None

    async def run(self, urls: list[str], pace_s: float, finalized_before_break: trio.Event | None = None) -> None:
        for url in urls:
            if await self._connection(url, pace_s, finalized_before_break):
                return
            self.broke_at = self.broke_at or time.monotonic()
        raise AssertionError(f"{self.name}: every instance failed")

    async def _connection(self, url: str, pace_s: float, halfway: trio.Event | None) -> bool:
        """True once the session closed normally; False when the connection broke."""
        init = {"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"]}
        if self.session_id is not None:
            init |= {"session_id": self.session_id, "resume_token": token_of(self.session_id),
                     "resume_from": self.results[-1]["utterance_index"] + 1 if self.results else 0}
        try:
            async with peer(url + "/v1/session") as p:
                self.connections += 1
                await p.send(**init)
                ready = await p.recv()
                assert ready["type"] == "session_ready", ready
                self.session_id = ready["session_id"]
                start = ready["next_utterance_index"]

                async def send_audio() -> None:
                    with contextlib.suppress(ConnectionClosed):  # the reader sees it too
                        for k in range(start, UTTERANCES):
                            for frame in utterance_audio(k):
                                await p.send_raw(frame)
                            await p.send(type="finalize")
                            await trio.sleep(pace_s)
                        await p.send(type="close_session")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_audio)
                    while True:
                        try:
                            msg = await p.recv(timeout=30)
                        except ConnectionClosed:
                            nursery.cancel_scope.cancel()
                            return False
                        if msg["type"] == "result":
                            if self.broke_at is not None and self.first_after_break is None:
                                self.first_after_break = time.monotonic()
                                self.first_result_after_break = msg
                            self.results.append(msg)
                        elif msg["type"] == "utterance_finalized" and halfway is not None \
                                and msg["utterance_index"] >= UTTERANCES // 2:
                            halfway.set()
                        elif msg["type"] == "session_closed":
                            self.closed = msg
                            nursery.cancel_scope.cancel()
                            return True
        except (ConnectionClosed, HandshakeError, OSError):
            return False

    def check(self) -> None:
        indexes = [r["utterance_index"] for r in self.results]
        assert indexes == list(range(UTTERANCES)), f"{self.name}: {indexes}"
        assert self.closed == {"type": "session_closed", "reason": "client_close", "utterances": UTTERANCES}
        assert self.connections == 2
        for r in self.results:
            if r["status"] == "SUCCESS":
                assert r["translations"]["en"]["text"] == expected_text(r["utterance_index"]), r
        # a job A placed but never handed over (killed between the two) ends SKIPPED at its deadline
        assert sum(r["status"] != "SUCCESS" for r in self.results) <= 1, self.results


async def test_kill_9_one_instance_clients_resume_on_another(tmp_path, redis_url, nursery):
    flags = ("--redis-url", redis_url, "--result-deadline-ms", "6000", "--log-level", "info")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", *flags, "--instance-id", "a")
    b = Daemon(tmp_path / "b", *flags, "--instance-id", "b")
    try:
        await start_node(nursery, b, node_id="nb", delay_ms=150, jitter_ms=100, max_jobs=8)
        clients = [ResumingClient(f"c{i}") for i in range(3)]
        halfway = [trio.Event() for _ in clients]
        killed_at = 0.0
        async with trio.open_nursery() as inner:
            for client, event in zip(clients, halfway, strict=True):
                inner.start_soon(client.run, [a.ws_url, b.ws_url], 0.15, event)
            for event in halfway:
                await event.wait()
            killed_at = time.monotonic()
            os.kill(a.proc.pid, signal.SIGKILL)
        for client in clients:
            client.check()
        failover = [c.first_after_break - killed_at for c in clients]
        print("\nfailover (kill -9 -> first result on the other instance): "
              + ", ".join(f"{s * 1000:.0f} ms" for s in failover))
        # target < 2 s (docs/scaling.md); slack for a loaded CI box
        assert max(failover) < 5.0, (failover, [c.first_result_after_break for c in clients])
    finally:
        a.proc.kill()
        a.proc.wait()
        a.log.close()
        b.stop()


async def test_jobs_whose_audio_died_with_their_owner_are_adopted_and_moved(tmp_path, redis_url):
    """Instance A (a real process) holds a session and the node that got its job; A is killed
    with SIGKILL before the node answers. The client resumes on B: B adopts the job from
    Redis (which kept its audio), sees its node's instance gone and places it again on a node
    of B as attempt 2, with exactly the audio the client sent; the result is that answer."""
    a = Daemon(tmp_path, "--redis-url", redis_url, "--instance-id", "a", "--owner-ttl-ms", "1000")
    b = None
    try:
        async with peer(a.ws_url + "/v1/node") as node_a, peer(a.ws_url + "/v1/session") as client:
            await node_a.register("na", max_jobs=1)
            await client.send(type="session_init", src_lang="zh", tgt_langs=["en"])
            sid = (await client.recv())["session_id"]
            for frame in utterance_audio(3):
                await client.send_raw(frame)
            await client.send(type="finalize")
            first = await node_a.recv(timeout=5)
            assert (first["type"], first["attempt"]) == ("job_assign", 1)
            assert (await client.recv())["type"] == "utterance_finalized"
            os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        (tmp_path / "b").mkdir()
        b = Daemon(tmp_path / "b", "--redis-url", redis_url, "--instance-id", "b", "--owner-ttl-ms", "1000")
        async with peer(b.ws_url + "/v1/node") as node_b, peer(b.ws_url + "/v1/session") as resumed:
            await node_b.register("nb", max_jobs=1)
            await resumed.send(type="session_init", src_lang="zh", tgt_langs=["en"], session_id=sid,
                                  resume_token=token_of(sid), resume_from=0)
            ready = await resumed.recv()
            assert (ready["type"], ready["next_utterance_index"]) == ("session_ready", 1), ready
            job = await node_b.recv(timeout=6)  # A's liveness lapses (1 s), B's watch moves the job (1 s)
            assert (job["type"], job["job_id"], job["attempt"]) == ("job_assign", first["job_id"], 2)
            assert job["audio"] == first["audio"]
            await node_b.send(type="job_result", job_id=job["job_id"], attempt=2, status="ok", source_text="s", text="moved")
            result, _ = await resumed.recv_until("result", timeout=5)
            assert (result["utterance_index"], result["status"]) == (0, "SUCCESS")
            assert result["translations"]["en"] == {"status": "SUCCESS", "text": "moved", "node_id": "nb", "error": None}
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        a.log.close()
        if b is not None:
            b.stop()


async def test_nothing_is_placed_on_a_dead_instance_s_node(tmp_path, redis_url):
    """Instance A (a real process) holds node na and a session; B holds node nb; C holds no
    node. A is killed with SIGKILL; the client resumes on C at once and keeps talking. Every
    new utterance ends SUCCESS; one finalized in the first second may still be placed on na
    (A's liveness has not lapsed yet) and is then moved to nb as attempt 2; once A's liveness
    lapsed (owner_ttl_ms) na is never chosen again: every later job reaches nb as attempt 1."""
    ttl_ms = 1000
    flags = ("--redis-url", redis_url, "--owner-ttl-ms", str(ttl_ms), "--result-deadline-ms", "8000")
    daemons = {}
    for name in "abc":
        (tmp_path / name).mkdir()
        daemons[name] = Daemon(tmp_path / name, *flags, "--instance-id", name)
    attempts: dict[int, int] = {}  # utterance index -> the attempt nb got
    try:
        async with trio.open_nursery() as nursery, peer(daemons["a"].ws_url + "/v1/node") as na, \
                peer(daemons["b"].ws_url + "/v1/node") as nb:
            await na.register("na", max_jobs=4)
            await nb.register("nb", max_jobs=4)
            nursery.start_soon(_answer_all, nb, attempts)
            async with peer(daemons["a"].ws_url + "/v1/session") as first:
                await first.send(type="session_init", src_lang="zh", tgt_langs=["en"])
                sid = (await first.recv())["session_id"]
                os.kill(daemons["a"].proc.pid, signal.SIGKILL)
            killed_at = trio.current_time()
            async with peer(daemons["c"].ws_url + "/v1/session") as client:
                await client.send(type="session_init", src_lang="zh", tgt_langs=["en"], session_id=sid,
                                  resume_token=token_of(sid), resume_from=0)
                assert (await client.recv())["type"] == "session_ready"
                finalized_at, results = {}, []
                for k in range(8):
                    for frame in utterance_audio(k):
                        await client.send_raw(frame)
                    await client.send(type="finalize")
                    fin, before = await client.recv_until("utterance_finalized", timeout=5)
                    results += [m for m in before if m["type"] == "result"]
                    finalized_at[fin["utterance_index"]] = trio.current_time() - killed_at
                    await trio.sleep(0.3)
                await client.send(type="close_session")
                closed, rest = await client.recv_until("session_closed", timeout=12)
                results += [m for m in rest if m["type"] == "result"]
            nursery.cancel_scope.cancel()
        assert [r["status"] for r in results] == ["SUCCESS"] * 8, results
        assert [r["translations"]["en"]["text"] for r in results] == [expected_text(k) for k in range(8)]
        late = [i for i, t in finalized_at.items() if t > ttl_ms / 1000 + 0.5]
        assert late and all(attempts[i] == 1 for i in late), (finalized_at, attempts)
    finally:
        for name, d in daemons.items():
            if name == "a":
                d.proc.kill()
                d.proc.wait()
                d.log.close()
            else:
                d.stop()


async def _answer_all(node, attempts: dict[int, int]) -> None:
    """A node that answers every job with the CRC text of its audio, recording attempts."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            msg = await node.recv(timeout=60)
            if msg["type"] != "job_assign":
                continue
            attempts[msg["utterance_index"]] = msg["attempt"]
            pcm = base64.b64decode(msg["audio"])
            await node.send(type="job_result", job_id=msg["job_id"], attempt=msg["attempt"], status="ok",
                            source_text="s", text=f"[en] {len(pcm) // 32}ms crc32={zlib.crc32(pcm):08x}")
