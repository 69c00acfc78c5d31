"""Node load scores against a real daemon and Valkey: a node whose heartbeat's ``load_score`` is
above ``--node-load-threshold`` gets no new job, jobs wait while every node of their pair is
above it, and a bad score is refused with a clear error and changes nothing."""

from __future__ import annotations

import json
import logging

import trio

from scheduler.store import keys

from .helpers import peer, session, speak
from .test_gateways import http_get
from .test_redis_restart import wait_for


def _judged(redis_client, node_id: str, score: str, saturated: str):
    return lambda: redis_client.hmget(keys.node_info(node_id), "load_score", "saturated") == [score, saturated]


async def _no_job_for(node, seconds: float) -> None:
    with trio.move_on_after(seconds):
        msg = await node.recv(timeout=seconds + 1)
        raise AssertionError(f"a saturated node got {msg}")


async def test_a_saturated_node_gets_no_job_and_jobs_wait_while_every_node_is(daemon, redis_client, caplog):
    caplog.set_level(logging.INFO)
    async with peer(daemon.ws_url + "/v1/node") as a, peer(daemon.ws_url + "/v1/node") as b:
        await a.register("a", max_jobs=4)
        await b.register("b", max_jobs=4)
        async with session(daemon) as s:
            await _saturation(daemon, redis_client, a, b, s)
    events = [(getattr(r, "event", None), getattr(r, "fields", {}).get("node_id")) for r in caplog.records]
    assert ("node_saturated", "a") in events and ("node_unsaturated", "a") in events


async def _saturation(daemon, redis_client, a, b, s) -> None:
    await a.send(type="heartbeat", load_score=0.9)
    await wait_for(lambda: trio.to_thread.run_sync(_judged(redis_client, "a", "0.9", "1")), timeout=5)
    for index in range(2):  # a has free slots and is the least busy by slots, yet b takes both
        await speak(s)
        await s.send(type="finalize")
        job = await b.recv()
        assert job["type"] == "job_assign" and job["utterance_index"] == index, job
    await b.send(type="heartbeat", load_score=1.0)
    await wait_for(lambda: trio.to_thread.run_sync(_judged(redis_client, "b", "1.0", "1")), timeout=5)
    await speak(s)
    await s.send(type="finalize")
    await _no_job_for(a, 0.6)  # every node is above the threshold: the job waits in its lane
    assert daemon.dispatcher.waiting == 1
    _, body = await trio.to_thread.run_sync(http_get, daemon.admin_port, "/status")
    scores = {n["node_id"]: (n["load_score"], n["saturated"]) for n in json.loads(body)["nodes"]}
    assert scores == {"a": (0.9, True), "b": (1.0, True)}
    metrics = daemon.metrics.render().decode()
    assert 'scheduler_node_load_score{node_id="a"} 0.9' in metrics and "scheduler_nodes_saturated 2.0" in metrics

    await a.send(type="heartbeat", load_score=0.2)  # a is below again: the waiting job goes at once
    job = await a.recv(timeout=5)
    assert job["type"] == "job_assign" and job["utterance_index"] == 2, job
    assert daemon.dispatcher.waiting == 0

    for bad in (1.5, -0.1, "0.5", True):  # refused, not fatal, and the stored score stays
        await a.send(type="heartbeat", load_score=bad)
        error = await a.recv()
        assert error["type"] == "error" and error["code"] == "BAD_MESSAGE" and not error["fatal"], error
        assert "load_score" in error["message"], error  # (out of range: "must be a number from 0 to 1")
    await a.send(type="heartbeat")  # a later heartbeat shows the node is still served
    await wait_for(lambda: trio.to_thread.run_sync(_judged(redis_client, "a", "", "0")), timeout=5)
    assert "a" in daemon.nodes
