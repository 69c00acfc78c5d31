"""The daemon's edges over real WebSockets on loopback, with real Valkey: errors and isolation."""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.request

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from scheduler.reference.node import NodeFatal, NodeOptions, ReferenceNode
from scheduler.store import keys, lua

from .helpers import SPEECH_100MS, peer, session, speak, start_node


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_unknown_path_is_rejected_with_404(daemon):
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(daemon.ws_url + "/v2/elsewhere"):
            pass
    assert info.value.status_code == 404


async def test_admin_endpoints(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1")
    status, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/healthz")
    assert status == 200
    status, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/readyz")
    assert (status, body.strip()) == (200, "ready")
    status, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/metrics")
    assert status == 200
    for name in ("scheduler_session_actor_backlog_size", "scheduler_duplicate_finalize_suppressed_total",
                 "scheduler_duplicate_job_blocked_total", "scheduler_result_gap_timeout_total",
                 "scheduler_finalize_latency_seconds_bucket", "scheduler_nodes_online 1.0", "process_resident_memory_bytes",
                 "scheduler_session_lag_seconds_bucket", "scheduler_nodes_saturated 0.0"):
        assert name in body
    assert (await trio.to_thread.run_sync(http_get, daemon.admin_port, "/nope"))[0] == 404
    async with session(daemon) as s:
        status, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/status")
        snap = json.loads(body)
        assert status == 200 and snap["state"] == "ready" and snap["redis"]["ok"] is True
        assert [x["session_id"] for x in snap["sessions"]] == [s.ready["session_id"]]
        assert (snap["sessions"][0]["lag_ms"], snap["sessions"][0]["oldest_frame_age_ms"]) == (0, 0)  # caught up
        (node,) = snap["nodes"]
        assert (node["node_id"], node["online"], node["local"], node["current_jobs"]) == ("n1", True, True, 0)
        assert snap["jobs"] == {"in_flight": 0, "waiting": 0}


def _sample(body: str, name: str) -> float | None:
    """The value of the series ``name`` (with its labels, as exposed) in a /metrics body."""
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


async def test_pair_gauges_and_overhead_leave_the_node_time_out(daemon, nursery):
    """The dashboard's per-pair capacity and the daemon's own overhead per result
    (docs/operations.md, "Metrics"): a node that takes 600 ms per job holds one slot of four
    while it works, and those 600 ms are not counted as the daemon's overhead."""
    await start_node(nursery, daemon, node_id="n1", delay_ms=600, max_jobs=4, lang_pairs=(("zh", "en"), ("zh", "de")))
    scrape = lambda: trio.to_thread.run_sync(http_get, daemon.admin_port, "/metrics")  # noqa: E731
    async with session(daemon) as s:
        await speak(s)
        await s.send(type="audio_chunk", data=base64.b64encode(SPEECH_100MS).decode(), is_final=True)
        await s.recv_until("utterance_finalized")
        await trio.sleep(0.3)
        _, body = await scrape()
        assert _sample(body, 'scheduler_pair_jobs_in_flight{pair="zh-en"}') == 1
        assert _sample(body, 'scheduler_pair_slots{pair="zh-en"}') == 4
        assert _sample(body, 'scheduler_pair_slots{pair="zh-de"}') == 4
        assert _sample(body, 'scheduler_pair_slots_free{pair="zh-en"}') == 3
        assert _sample(body, 'scheduler_pair_slots_free{pair="zh-de"}') == 3  # one node: its slots are shared
        result, _ = await s.recv_until("result")
        assert result["status"] == "SUCCESS"
    _, body = await scrape()
    assert _sample(body, 'scheduler_pair_jobs_in_flight{pair="zh-en"}') == 0
    assert _sample(body, 'scheduler_pair_jobs_waiting{pair="zh-en"}') == 0
    assert _sample(body, 'scheduler_pair_slots_free{pair="zh-en"}') == 4
    assert _sample(body, "scheduler_result_overhead_seconds_count") == 1
    assert _sample(body, "scheduler_result_overhead_seconds_sum") < 0.3  # the node's 600 ms are left out
    # the utterance's resume-journal entry was written by its job's creation, not by a call of its own
    assert _sample(body, 'scheduler_journal_finalize_entries_total{written_by="job"}') == 1


async def test_bad_messages_keep_the_session_alive(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    async with session(daemon) as s:
        for bad in ["{", '{"type":"dance"}', '{"type":"audio_chunk","data":42}', '{"type":"session_init","src_lang":"zh","tgt_langs":["en"]}']:
            await s.send_raw(bad)
            err = await s.recv()
            assert err["type"] == "error" and err["code"] == "BAD_MESSAGE" and err["fatal"] is False, err
        await speak(s)
        await s.send(type="audio_chunk", data=base64.b64encode(SPEECH_100MS).decode(), is_final=True)
        fin = await s.recv()
        assert fin["type"] == "utterance_finalized" and fin["utterance_index"] == 0 and fin["audio_ms"] == 400
        result, _ = await s.recv_until("result")
        assert result["status"] == "SUCCESS" and result["translations"]["en"]["text"].startswith("[en] 400ms")


async def test_audio_before_init_is_not_initialized_and_init_can_follow(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1")
    async with peer(daemon.ws_url + "/v1/session") as p:
        await p.send_raw(SPEECH_100MS)
        assert (await p.recv())["code"] == "NOT_INITIALIZED"
        await p.send(type="audio_chunk", data="AAAA")
        assert (await p.recv())["code"] == "NOT_INITIALIZED"
        await p.send(type="session_init", src_lang="zh", tgt_langs=[])
        assert (await p.recv())["code"] == "BAD_MESSAGE"
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en"])
        ready = await p.recv()
        assert ready["type"] == "session_ready" and ready["next_utterance_index"] == 0 and ready["resumed"] is False
        assert ready["limits"]["pause_ms"] == 200


async def test_unsupported_lang_pair_is_fatal(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1")
    async with peer(daemon.ws_url + "/v1/session") as p:
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en", "xx"])
        err = await p.recv()
        assert err["code"] == "UNSUPPORTED_LANG_PAIR" and err["fatal"] is True and "zh->xx" in err["message"]
        with pytest.raises(ConnectionClosed) as info:
            await p.recv()
        assert info.value.reason.code == 1008


async def test_resume_of_unknown_session_is_fatal(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1")
    async with peer(daemon.ws_url + "/v1/session") as p:
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en"], session_id="nope", resume_from=0)
        assert (await p.recv())["code"] == "UNKNOWN_SESSION"
        with pytest.raises(ConnectionClosed) as info:
            await p.recv()
        assert info.value.reason.code == 1008


async def test_frame_too_large_closes_1009(start_daemon, nursery):
    daemon = await start_daemon(max_frame_bytes=1000)
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon) as s:
        await s.send_raw(b"\x01\x00" * 1000)
        err = await s.recv()
        assert err["code"] == "FRAME_TOO_LARGE" and err["fatal"] is True
        with pytest.raises(ConnectionClosed) as info:
            await s.recv()
        assert info.value.reason.code == 1009


async def test_one_bad_client_does_not_hurt_another(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    async with session(daemon) as good, session(daemon) as bad:
        await bad.send_raw(b"\x00" * (daemon.settings.max_frame_bytes + 10))  # fatal for `bad`
        assert (await bad.recv())["code"] == "FRAME_TOO_LARGE"
        await speak(good)
        await good.send(type="finalize")
        result, before = await good.recv_until("result")
        assert [m["type"] for m in before] == ["utterance_finalized"] and result["status"] == "SUCCESS"


async def test_node_token_is_enforced(start_daemon, nursery):
    daemon = await start_daemon(node_token="s3cret")
    with pytest.raises(NodeFatal, match="UNAUTHORIZED"):
        await ReferenceNode(NodeOptions(url=daemon.ws_url, node_id="n1", token="wrong", reconnect=False)).run()
    await start_node(nursery, daemon, node_id="n1", token="s3cret")
    assert "n1" in daemon.nodes


async def test_duplicate_node_id_is_refused(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1")
    with pytest.raises(NodeFatal, match="DUPLICATE_NODE_ID"):
        await ReferenceNode(NodeOptions(url=daemon.ws_url, node_id="n1", reconnect=False)).run()
    assert "n1" in daemon.nodes


async def test_node_must_register_first_and_bad_frames_are_not_fatal(daemon):
    async with peer(daemon.ws_url + "/v1/node") as p:
        await p.send(type="heartbeat")
        assert (await p.recv())["code"] == "NOT_REGISTERED"
        await p.send(type="register", node_id="n9", lang_pairs=[["zh", "en"]], max_jobs=1)
        assert (await p.recv())["type"] == "registered"
        await p.send_raw("garbage")
        assert (await p.recv())["code"] == "BAD_MESSAGE"
        await p.send(type="job_result", job_id="12345", attempt=1, status="ok", source_text="x", text="y")
        await p.send(type="heartbeat", load={"cpu": 0.1})
        await trio.sleep(0.2)
        assert "n9" in daemon.nodes
        assert 'scheduler_stale_answers_dropped_total{code="UNKNOWN_JOB"} 1.0' in daemon.metrics.render().decode()


async def test_answers_from_the_wrong_node_are_dropped(daemon, nursery):
    """A node answering a job it does not hold is ignored; the holder's answer is delivered."""
    async with peer(daemon.ws_url + "/v1/node") as holder, peer(daemon.ws_url + "/v1/node") as intruder:
        await holder.register("holder", max_jobs=1)
        await intruder.register("intruder", max_jobs=1, pair=("de", "fr"))
        async with session(daemon) as s:
            await s.send_raw(SPEECH_100MS)
            await s.send(type="finalize")
            job = await holder.recv()
            assert job["type"] == "job_assign" and job["job_key"] == f"{s.ready['session_id']}:0:translate:en"
            await intruder.send(type="job_result", job_id=job["job_id"], attempt=1, status="ok", text="FORGED")
            await holder.send(type="job_result", job_id=job["job_id"], attempt=2, status="ok", text="OLD")
            await holder.send(type="job_result", job_id=job["job_id"], attempt=1, status="ok", source_text="s", text="REAL")
            await holder.send(type="job_result", job_id=job["job_id"], attempt=1, status="ok", text="AGAIN")
            result, _ = await s.recv_until("result")
            assert result["translations"]["en"]["text"] == "REAL"
            await s.send(type="close_session")
            closed, between = await s.recv_until("session_closed")
            assert [m["type"] for m in between] == []
        expected = [f'scheduler_stale_answers_dropped_total{{code="{code}"}} 1.0'
                    for code in ("NODE_MISMATCH", "STALE_ATTEMPT", "ALREADY_COMPLETED")]
        with trio.fail_after(5):  # the intruder's socket is read by another task: wait for it
            while not all(line in daemon.metrics.render().decode() for line in expected):
                await trio.sleep(0.02)


async def test_no_node_free_until_deadline_gives_failed(start_daemon, nursery):
    daemon = await start_daemon(result_deadline_ms=600)
    async with peer(daemon.ws_url + "/v1/node") as silent_node:
        await silent_node.register("busy", max_jobs=1)
        async with session(daemon) as s:
            for _ in range(2):
                await s.send_raw(SPEECH_100MS)
                await s.send(type="finalize")
            results = []
            while len(results) < 2:
                msg = await s.recv(timeout=5)
                if msg["type"] == "result":
                    results.append(msg)
            assert [(r["utterance_index"], r["status"]) for r in results] == [(0, "SKIPPED"), (1, "FAILED")]
            assert results[1]["translations"]["en"]["error"] == "NO_AVAILABLE_NODE"
    # utterance 0's job was created and journaled it; utterance 1's found no slot: the writer journaled it
    body = daemon.metrics.render().decode()
    for by in ("job", "writer"):
        assert f'scheduler_journal_finalize_entries_total{{written_by="{by}"}} 1.0' in body, by


async def test_lost_node_job_is_dispatched_again_to_another_node(daemon, redis_client):
    async with peer(daemon.ws_url + "/v1/node") as n1, peer(daemon.ws_url + "/v1/node") as n2:
        for node, name in ((n1, "n1"), (n2, "n2")):
            await node.register(name, max_jobs=2)
        async with session(daemon) as s:
            await s.send_raw(SPEECH_100MS)
            await s.send(type="finalize")
            with trio.fail_after(5):
                holder, job, other = None, None, None
                while job is None:  # whichever node got it
                    for node, spare in ((n1, n2), (n2, n1)):
                        with trio.move_on_after(0.05):
                            job, holder, other = await node.recv(), node, spare
                            break
            assert job["attempt"] == 1
            await holder.ws.aclose()  # the node dies holding the job
            again = await other.recv()
            assert (again["type"], again["job_id"], again["attempt"]) == ("job_assign", job["job_id"], 2)
            await other.send(type="job_result", job_id=again["job_id"], attempt=2, status="ok", source_text="s", text="saved")
            result, _ = await s.recv_until("result")
            assert result["status"] == "SUCCESS" and result["translations"]["en"]["text"] == "saved"
        assert 'scheduler_redispatch_total 1.0' in daemon.metrics.render().decode()


async def test_expired_lease_moves_the_job_and_cancels_it_on_the_slow_node(start_daemon):
    daemon = await start_daemon(job_lease_ms=1000, node_ttl_ms=10_000)  # raw peers send no heartbeats
    async with peer(daemon.ws_url + "/v1/node") as slow:
        await slow.register("slow", max_jobs=1)
        async with session(daemon) as s:
            await s.send_raw(SPEECH_100MS)
            await s.send(type="finalize")
            job = await slow.recv()
            async with peer(daemon.ws_url + "/v1/node") as fast:
                await fast.register("fast", max_jobs=1)
                cancel = await slow.recv(timeout=5)  # lease (1 s) ran out
                assert cancel == {"type": "job_cancel", "job_id": job["job_id"], "attempt": 1}
                again = await fast.recv(timeout=5)
                assert (again["job_id"], again["attempt"]) == (job["job_id"], 2)
                await slow.send(type="job_result", job_id=job["job_id"], attempt=1, status="ok", text="too late")
                await fast.send(type="job_result", job_id=job["job_id"], attempt=2, status="ok", source_text="s", text="on time")
                result, _ = await s.recv_until("result")
                assert result["translations"]["en"]["text"] == "on time"


async def test_shutdown_drains_sessions_and_refuses_newcomers(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1", delay_ms=300)
    async with session(daemon) as s:
        await speak(s)
        await trio.sleep(0.1)
        daemon.shutdown()
        status, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/readyz")
        assert status == 503 and "draining" in body
        fin, _ = await s.recv_until("utterance_finalized")
        assert fin["reason"] == "close"
        async with peer(daemon.ws_url + "/v1/session") as late:
            err = await late.recv()
            assert err["code"] == "SHUTTING_DOWN" and err["fatal"] and 100 <= err["retry_after_ms"] <= 500  # (v1.6)
        result, _ = await s.recv_until("result")
        assert result["status"] == "SUCCESS"
        closed, _ = await s.recv_until("session_closed")
        assert closed == {"type": "session_closed", "reason": "shutdown", "utterances": 1}
        with pytest.raises(ConnectionClosed) as info:
            await s.recv()
        assert info.value.reason.code == 1001




async def test_client_disconnect_cancels_its_jobs_and_frees_slots(daemon, redis_client):
    async with peer(daemon.ws_url + "/v1/node") as node:
        await node.register("n1", max_jobs=2)
        async with session(daemon) as s:
            await s.send_raw(SPEECH_100MS)
            await s.send(type="finalize")
            job = await node.recv()
            assert job["type"] == "job_assign"
            assert redis_client.hget(keys.nodes_runtime(), keys.runtime_field("n1", "current_jobs")) == "1"
        cancel = await node.recv()  # the client went away: the answer is no longer wanted
        assert cancel == {"type": "job_cancel", "job_id": job["job_id"], "attempt": 1}
        assert redis_client.hget(keys.nodes_runtime(), keys.runtime_field("n1", "current_jobs")) == "0"
        assert redis_client.hget(keys.job(job["job_id"]), "status") == "cancelled"
        # a late answer for the cancelled job is refused, not delivered anywhere
        await node.send(type="job_result", job_id=job["job_id"], attempt=1, status="ok", text="late")
        with trio.fail_after(5):
            while 'stale_answers_dropped_total{code="ALREADY_COMPLETED"} 1.0' not in daemon.metrics.render().decode():
                await trio.sleep(0.02)


async def test_a_crash_while_placing_costs_one_job_not_the_daemon(daemon, nursery, monkeypatch):
    from scheduler.placement.dispatcher import Dispatcher

    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    real = Dispatcher._placed_or_code
    crashed = []

    def flaky(self, request, *args):
        if not crashed:
            crashed.append(request.job_key)
            raise RuntimeError("bug")
        return real(self, request, *args)

    monkeypatch.setattr(Dispatcher, "_placed_or_code", flaky)
    async with session(daemon) as s:
        for _ in range(2):
            await s.send_raw(SPEECH_100MS)
            await s.send(type="finalize")
        first, _ = await s.recv_until("result")
        second, _ = await s.recv_until("result")
        assert first["translations"]["en"]["error"] == "INTERNAL"
        assert second["status"] == "SUCCESS"


async def test_client_api_keys_by_header_or_field(start_daemon, nursery):
    daemon = await start_daemon(client_api_keys="k1, k2")
    await start_node(nursery, daemon, node_id="n1")
    url = daemon.ws_url + "/v1/session"
    async with peer(url) as p:
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en"])
        err = await p.recv()
        assert (err["code"], err["fatal"]) == ("UNAUTHORIZED", True)
        with pytest.raises(ConnectionClosed) as info:
            await p.recv()
        assert info.value.reason.code == 1008
    async with peer(url) as p:
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en"], api_key="k2")
        assert (await p.recv())["type"] == "session_ready"
    async with open_websocket_url(url, extra_headers=[(b"Authorization", b"Bearer k1")]) as ws:
        await ws.send_message(json.dumps({"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"]}))
        assert json.loads(await ws.get_message())["type"] == "session_ready"


async def test_rate_limit_paces_a_flood_and_loses_nothing(start_daemon, nursery):
    daemon = await start_daemon(max_messages_per_s=20, pause_ms=500)
    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    async with session(daemon) as s:
        start = trio.current_time()
        for _ in range(40):
            await s.send_raw(SPEECH_100MS)  # goes out at once; the daemon reads 20 per second
        await s.send(type="finalize")
        fin, _ = await s.recv_until("utterance_finalized", timeout=15)
        assert fin["audio_ms"] == 4000  # every frame, one utterance
        assert trio.current_time() - start >= 1.0  # (40 + 2 messages - 20 burst) / 20 per second


async def _one_job(s, node) -> dict:
    """One utterance from session ``s``, finalized: the ``job_assign`` ``node`` gets for it."""
    await s.send_raw(SPEECH_100MS)
    await s.send(type="finalize")
    with trio.fail_after(5):
        return await node.recv()


async def test_daemon_on_a_redis_cluster_dispatches_moves_and_answers(start_daemon, flushed_cluster_url):
    """The whole path on a 3-master Valkey cluster: register, dispatch, node loss -> attempt 2
    elsewhere, answer, result; /readyz and /status read the cluster too."""
    daemon = await start_daemon(redis_url=flushed_cluster_url)
    assert daemon.redis.cluster
    async with peer(daemon.ws_url + "/v1/node") as n1, peer(daemon.ws_url + "/v1/node") as n2:
        await n1.register("n1", max_jobs=2)
        async with session(daemon) as s:
            job = await _one_job(s, n1)  # the only node so far
            await n2.register("n2", max_jobs=2)  # joins later: the cached candidates go stale
            await n1.ws.aclose()
            with trio.fail_after(5):
                again = await n2.recv()
            assert (again["type"], again["job_id"], again["attempt"]) == ("job_assign", job["job_id"], 2)
            await n2.send(type="job_result", job_id=again["job_id"], attempt=2, status="ok", source_text="s", text="on a cluster")
            result, _ = await s.recv_until("result")
            assert result["status"] == "SUCCESS" and result["translations"]["en"]["text"] == "on a cluster"
            assert (await trio.to_thread.run_sync(http_get, daemon.admin_port, "/readyz"))[0] == 200
            status, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/status")
            assert status == 200 and {n["node_id"] for n in json.loads(body)["nodes"]} == {"n1", "n2"}


async def test_sharded_daemon_moves_a_job_across_shards_when_its_shard_has_no_node(start_daemon, flushed_cluster_url):
    """Key layout 2 on the cluster (``--redis-shards 2``): the node directory puts n1 and n2 in
    two shards; n1 is lost with a job, and its shard has no other node: the job moves across
    shards (a new id in n2's shard, attempt 2), is answered there, and the session gets it; the
    move is counted and logged."""
    daemon = await start_daemon(redis_url=flushed_cluster_url, redis_shards=2)
    async with peer(daemon.ws_url + "/v1/node") as n1, peer(daemon.ws_url + "/v1/node") as n2:
        await n1.register("n1", max_jobs=2)
        async with session(daemon) as s:
            job = await _one_job(s, n1)
            await n2.register("n2", max_jobs=2)
            space = daemon.redis.space
            assert space.node_shard("n1") != space.node_shard("n2")
            await n1.ws.aclose()
            with trio.fail_after(5):
                again = await n2.recv()
            assert again["type"] == "job_assign" and again["attempt"] == 2 and again["job_key"] == job["job_key"]
            assert space.job_shard(again["job_id"]) == space.node_shard("n2") != space.job_shard(job["job_id"])
            await n2.send(type="job_result", job_id=again["job_id"], attempt=2, status="ok", source_text="s", text="moved")
            result, _ = await s.recv_until("result")
            assert result["status"] == "SUCCESS" and result["translations"]["en"]["text"] == "moved"
            _, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/metrics")
            assert 'scheduler_placement_shard_events_total{event="relocated"} 1.0' in body


async def test_a_waiting_backlog_is_placed_in_shared_pipelines(daemon):
    """Jobs queued while no node was free are placed together once one is: their
    dispatch_task calls share Redis pipelines instead of one round trip each (a serial lane
    sent one batch per job)."""
    async with peer(daemon.ws_url + "/v1/node") as first, peer(daemon.ws_url + "/v1/node") as second:
        await first.register("draining", max_jobs=64)
        await first.send(type="drain")
        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(session(daemon)) for _ in range(24)]
            for s in sessions:
                await s.send_raw(SPEECH_100MS)
                await s.send(type="finalize")
            for s in sessions:
                await s.recv_until("utterance_finalized")
            await trio.sleep(0.3)  # the lane is blocked: NO_AVAILABLE_NODE
            calls, batches = daemon.redis.calls_total, daemon.redis.batches_total
            await second.register("wide", max_jobs=64)
            assigned = set()
            with trio.fail_after(5):
                while len(assigned) < 24:
                    msg = await second.recv()
                    if msg["type"] == "job_assign":
                        assigned.add(msg["session_id"])
            calls, batches = daemon.redis.calls_total - calls, daemon.redis.batches_total - batches
            assert calls >= 24 and batches <= calls / 3, (calls, batches)


async def test_full_pool_gives_freed_slots_to_waiting_jobs_in_arrival_order(daemon):
    async with peer(daemon.ws_url + "/v1/node") as node:
        await node.register("narrow", max_jobs=1)
        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(session(daemon)) for _ in range(5)]
            for s in sessions:  # one after the other: this is the arrival order
                await s.send_raw(SPEECH_100MS)
                await s.send(type="finalize")
                await s.recv_until("utterance_finalized")
            order = []
            with trio.fail_after(10):
                while len(order) < 5:
                    msg = await node.recv()
                    if msg["type"] == "job_assign":
                        order.append(msg["session_id"])
                        await node.send(type="job_result", job_id=msg["job_id"], attempt=msg["attempt"], status="ok",
                                        source_text="s", text="t")
            expected = [s.ready["session_id"] for s in sessions]
            assert [expected.index(x) for x in order] == [0, 1, 2, 3, 4]


async def test_a_node_that_reconnects_at_once_stays_online(daemon, nursery, redis_client, monkeypatch):
    """The close of a node's old socket, handled after the node registered again on a new one
    (here: its clean-up is slow), must not take the new registration offline nor drop its
    owner record; the node keeps getting jobs without a heartbeat in between."""
    from scheduler.cluster.ownership import Ownership
    from scheduler.store import keys

    release = Ownership.release_node

    async def slow_release(self, node_id):
        await trio.sleep(0.5)
        await release(self, node_id)

    monkeypatch.setattr(Ownership, "release_node", slow_release)
    async with peer(daemon.ws_url + "/v1/node") as old:
        await old.register("n1")
    async with peer(daemon.ws_url + "/v1/node") as node:
        await node.register("n1")  # the old socket closed above: off this instance's books, its clean-up still going
        await trio.sleep(1.0)  # the old socket's clean-up has run by now
        assert redis_client.hget(keys.node_info("n1"), "online") == "1"
        assert redis_client.exists(keys.node_owner("n1"))
        async with session(daemon) as s:
            await speak(s)
            await s.send(type="finalize")
            job, _ = await node.recv_until("job_assign")
            assert job["attempt"] == 1


async def test_audio_faster_than_the_realtime_factor_is_read_more_slowly(start_daemon, nursery, caplog):
    """--max-realtime-factor 4: after a 10 s burst a client's audio is read at 4x real time
    at most (16 s sent at once take 1.5 s more), and its session still gets every result;
    with 0 nothing is paced."""
    import logging

    caplog.set_level(logging.INFO)
    for factor, slower in ((4.0, True), (0.0, False)):
        daemon = await start_daemon(max_realtime_factor=factor)
        await start_node(nursery, daemon, node_id=f"n{int(factor)}", delay_ms=10)
        async with session(daemon) as s:
            start = trio.current_time()
            for _ in range(150):
                await s.send_raw(b"\x00" * 3200)  # 15 s of silence
            for _ in range(9):
                await s.send_raw(SPEECH_100MS)
            await s.send_raw(SPEECH_100MS)
            await s.send(type="finalize")
            result, _ = await s.recv_until("result", timeout=20)
            took = trio.current_time() - start
            assert result["status"] == "SUCCESS" and result["utterance_index"] == 0, result
            assert (took >= 1.45) is slower, took
            paced = daemon.metrics.sessions_paced_total._value.get()
            assert paced == (1 if slower else 0)
    assert sum(getattr(r, "event", "") == "client_paced" for r in caplog.records) == 1


async def test_heartbeats_that_arrive_together_are_written_in_one_batch(daemon, redis_client):
    """Three nodes' heartbeats within one window (a quarter of the heartbeat interval) are
    written with one heartbeats.lua call (edge/heartbeats.py), each with its own load score."""
    async with peer(daemon.ws_url + "/v1/node") as a, peer(daemon.ws_url + "/v1/node") as b, \
            peer(daemon.ws_url + "/v1/node") as c:
        for p, node in ((a, "hb-a"), (b, "hb-b"), (c, "hb-c")):
            await p.register(node, max_jobs=4)
        await trio.sleep(0.8)  # (the registrations' own writes are not heartbeats)
        before = _sample(daemon.metrics.render().decode(), "scheduler_node_heartbeat_batches_total") or 0.0
        for p, score in ((a, 0.1), (b, 0.2), (c, 0.3)):
            await p.send(type="heartbeat", load={"gpu": score}, load_score=score)
        with trio.fail_after(5):
            while _sample(daemon.metrics.render().decode(), "scheduler_node_heartbeats_written_total") != 3:
                await trio.sleep(0.05)
        body = daemon.metrics.render().decode()
        assert _sample(body, "scheduler_node_heartbeat_batches_total") == before + 1
        for node, score in (("hb-a", "0.1"), ("hb-b", "0.2"), ("hb-c", "0.3")):
            assert redis_client.hget(keys.node_info(node), "load_score") == score
            assert lua.runtime_copy(redis_client.hget(keys.nodes_runtime(), node))["load_score"] == score  # (node choice's copy)


async def test_an_utterance_whose_job_waits_for_a_node_is_journaled_without_waiting(start_daemon, nursery):
    """A job queued in a lane that waits for a free slot is not created soon: the dispatcher
    says so at once, and the session's writer journals the utterance itself instead of holding
    its utterance_finalized back for the word (up to 250 ms, journal.py)."""
    daemon = await start_daemon(result_deadline_ms=3000)
    async with peer(daemon.ws_url + "/v1/node") as busy_node:
        await busy_node.register("busy", max_jobs=1)
        async with session(daemon) as s:
            for _ in range(4):  # the first takes the only slot; the second finds none; then the lane waits
                await s.send_raw(SPEECH_100MS)
                await s.send(type="finalize")
                await s.recv_until("utterance_finalized")
            body = daemon.metrics.render().decode()
    assert _sample(body, 'scheduler_journal_finalize_entries_total{written_by="writer"}') == 3
    assert _sample(body, "scheduler_journal_ahead_wait_seconds_count") == 4
    assert _sample(body, 'scheduler_journal_ahead_wait_seconds_bucket{le="0.1"}') == 4  # none waited the bound out

