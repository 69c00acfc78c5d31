"""Admission control (session/admission.py): past ``--max-sessions`` a new session gets
``SERVER_FULL`` with ``retry_after_ms`` and close 1013, ``/readyz`` is 503, a resume is still
admitted into the reserve, and a refused session leaves nothing behind. Real daemon, real
Valkey, real sockets."""

from __future__ import annotations

import json
import logging
import time

import trio

from scheduler.client import connect
from scheduler.ops.supervisor import Worker, _readiness, _status
from scheduler.session.admission import reserve_for
from scheduler.session.audio import silence, tone
from scheduler.store import keys

from .helpers import init_answer, peer, session, speak, start_node
from .test_gateways import http_get
from .test_redis_restart import readyz, readyz_is, wait_for


def _refused(running, reason: str) -> float:
    return running.metrics.sessions_refused_total.labels(reason)._value.get()


def _owner_keys(redis_client) -> int:
    return sum(1 for _ in redis_client.scan_iter(keys.session_owner("*")))


def test_the_reserve_is_a_twentieth_at_least_one_below_the_limit():
    assert [reserve_for(n) for n in (0, 1, 2, 3, 20, 40, 100, 1000)] == [0, 0, 1, 1, 1, 2, 5, 50]


async def test_past_max_sessions_new_sessions_are_refused_and_resumes_admitted(start_daemon, nursery, redis_client):
    running = await start_daemon(max_sessions=3)  # reserve 1: two new sessions, a third place for a resume
    await start_node(nursery, running, node_id="n1", max_jobs=2)
    assert await readyz(running) == 200
    async with session(running) as a, session(running) as b:
        owners = _owner_keys(redis_client)
        await wait_for(lambda: readyz_is(running, 503), timeout=5)  # full for new sessions
        answer, code = await init_answer(running)
        assert answer["type"] == "error" and answer["code"] == "SERVER_FULL" and answer["fatal"] is True, answer
        assert isinstance(answer["retry_after_ms"], int) and 1000 <= answer["retry_after_ms"] <= 3000, answer
        assert code == 1013
        assert _refused(running, "full") == 1 and _owner_keys(redis_client) == owners  # it left nothing behind
        code, body = await trio.to_thread.run_sync(http_get, running.admin_port, "/readyz")
        assert code == 503 and "full" in body, body
        status = json.loads((await trio.to_thread.run_sync(http_get, running.admin_port, "/status"))[1])
        assert status["state"] == "full" and status["admission"]["held"] == 2 and status["admission"]["full"], status
        assert {k: status["admission"][k] for k in ("max_sessions", "reserve", "overloaded")} == \
            {"max_sessions": 3, "reserve": 1, "overloaded": False}, status
        sid, token = b.ready["session_id"], b.ready["resume_token"]
        await speak(a)
        await a.send(type="finalize")
        await a.recv_until("result")  # the admitted sessions are served as before
    # both ended (disconnected, resumable): room again
    await wait_for(lambda: readyz_is(running, 200), timeout=5)
    async with session(running), session(running):
        answer, code = await init_answer(running)  # a third new one: refused
        assert answer["code"] == "SERVER_FULL" and code == 1013
        async with peer(running.ws_url + "/v1/session") as resumed:  # the resume takes the reserved place
            await resumed.send(type="session_init", src_lang="zh", tgt_langs=["en"], session_id=sid, resume_token=token,
                               resume_from=0)
            ready = await resumed.recv()
            assert ready["type"] == "session_ready" and ready["resumed"] is True, ready
            epoch = redis_client.hget(keys.session(sid), "epoch")
            answer, code = await init_answer(running, session_id=sid, resume_token=token, resume_from=0)  # none left
            assert answer["code"] == "SERVER_FULL" and code == 1013
            assert redis_client.hget(keys.session(sid), "epoch") == epoch  # refused before it took anything over
    assert _refused(running, "full") == 2 and _refused(running, "full_resume") == 1
    await wait_for(lambda: readyz_is(running, 200), timeout=5)
    metrics = running.metrics.render().decode()
    assert 'scheduler_sessions_refused_total{reason="full"} 2.0' in metrics

    async def all_released() -> bool:
        return running.admission.held == 0

    await wait_for(all_released, timeout=5)


async def test_without_a_limit_nothing_is_refused(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon), session(daemon), session(daemon):
        assert await readyz(daemon) == 200 and daemon.admission.held == 3 and not daemon.admission.full()
    assert daemon.metrics.sessions_refused_total.labels("full")._value.get() == 0


async def test_a_box_of_workers_is_full_only_when_every_worker_is():
    """The supervisor's /readyz and /status under --workers (ops/supervisor.py)."""
    stopping = trio.Event()
    a, b = Worker(0, "w0", 1), Worker(1, "w1", 2)
    a.status = {"admission": {"held": 3, "max_sessions": 3, "reserve": 1, "full": True}}
    b.status = {"admission": {"held": 1, "max_sessions": 3, "reserve": 1, "full": False}}
    a.full, b.ready = True, True
    assert _readiness([a, b], stopping) == (True, "ready")  # one has room: the box takes sessions
    assert (await _status([a, b]))["admission"] == {"held": 4, "max_sessions": 6, "full": False}
    b.ready, b.full = False, True
    assert _readiness([a, b], stopping) == (False, "full")
    b.full = False  # not ready for another reason (starting, Redis): that wins
    assert _readiness([a, b], stopping) == (False, "workers not ready: 1")


async def test_the_client_library_waits_retry_after_ms_and_gets_in(start_daemon, nursery):
    """A full instance: scheduler.client (and the reference client built on it) waits the
    refusal's retry_after_ms, tries again, and is admitted once a session ended."""
    running = await start_daemon(max_sessions=2)  # one new session at a time (reserve 1)
    await start_node(nursery, running, node_id="n1", max_jobs=2)
    done = trio.Event()

    async def hold_then_leave():
        async with session(running):
            await trio.sleep(0.5)
        done.set()

    nursery.start_soon(hold_then_leave)
    await wait_for(lambda: readyz_is(running, 503), timeout=5)
    started = trio.current_time()
    async with connect(running.ws_url, src_lang="zh", tgt_langs=["en"], reconnects=5, backoff_s=0.05) as client:
        waited = trio.current_time() - started
        await client.send_audio(tone(300) + silence(700))
        await client.finalize()
        await client.close()
        results = [r async for r in client.results()]
    assert done.is_set() and 0.8 <= waited <= 8, waited  # at least one retry_after_ms (1-3 s, less its jitter)
    assert [r.status for r in results] == ["SUCCESS"] and _refused(running, "full") >= 1


async def test_the_overload_guard_refuses_new_sessions_while_the_loop_lags(start_daemon, nursery, caplog):
    """The daemon's event loop is kept busy (the test blocks it: the daemon runs in this
    process): past --overload-lag-ms new sessions get SERVER_FULL and /readyz is 503
    "overloaded", an admitted session is still served, and once the loop is free again the
    guard releases and new sessions are admitted."""
    caplog.set_level(logging.INFO)
    running = await start_daemon(overload_lag_ms=100)
    await start_node(nursery, running, node_id="n1", max_jobs=2)
    busy = trio.Event()

    async def hog():  # the loop runs nothing else for 250 ms at a time
        while not busy.is_set():
            time.sleep(0.25)
            await trio.sleep(0.01)

    async with session(running) as admitted:
        nursery.start_soon(hog)
        await wait_for(lambda: trio.to_thread.run_sync(lambda: running.admission.overloaded), timeout=10)
        answer, code = await init_answer(running)
        assert answer["code"] == "SERVER_FULL" and "overloaded" in answer["message"] and code == 1013, answer
        assert running.readiness() == (False, "overloaded") and _refused(running, "overload") >= 1
        busy.set()
        await speak(admitted)
        await admitted.send(type="finalize")
        result, _ = await admitted.recv_until("result")
        assert result["translations"]["en"]["status"] == "SUCCESS", result
    await wait_for(lambda: readyz_is(running, 200), timeout=10)
    async with session(running):
        pass
    names = [getattr(r, "event", None) for r in caplog.records]
    assert "overload_guard_engaged" in names and "overload_guard_released" in names
    assert running.metrics.event_loop_lag_seconds._value.get() < 0.05


async def test_a_daemon_process_refuses_when_full_and_while_its_loop_lags(tmp_path):
    """`scheduler serve` as its own process: past --max-sessions a new session gets
    SERVER_FULL and /readyz 503 "full"; then the process is stopped for 3 s (SIGSTOP: its event
    loop wakes that late once), so the overload guard engages (new sessions refused,
    "overloaded") and releases by itself, and new sessions are admitted again."""
    import os
    import signal
    import urllib.parse

    from .test_e2e import Daemon, log_events

    d = Daemon(tmp_path, "--max-sessions", "2", "--overload-lag-ms", "5")
    running = d  # (init_answer and session need only its ws_url, readyz its admin_url)
    admin_port = urllib.parse.urlsplit(d.admin_url).port
    try:
        with trio.fail_after(60):
            await wait_for(lambda: readyz_is(d, 200), timeout=10)
            async with peer(d.ws_url + "/v1/node") as node:
                await node.register("n1", max_jobs=2)
                async with session(running):  # one new session (the second place is the resume reserve)
                    answer, code = await init_answer(running)
                    assert answer["code"] == "SERVER_FULL" and code == 1013, answer
                    assert await trio.to_thread.run_sync(http_get, admin_port, "/readyz") == (503, "full\n")
                await wait_for(lambda: readyz_is(d, 200), timeout=10)
                os.kill(d.proc.pid, signal.SIGSTOP)
                await trio.sleep(3)
                os.kill(d.proc.pid, signal.SIGCONT)
                seen = set()
                while "overload_guard_released" not in log_events(d.log_path):
                    answer, code = await init_answer(running)
                    seen.add("overloaded" if answer["type"] == "error" and "overloaded" in answer["message"] else answer["type"])
                    await trio.sleep(0.05)
                assert "overloaded" in seen, seen  # refused while the guard was engaged
                async with session(running):  # and admitted again once it released
                    pass
        assert "overload_guard_engaged" in log_events(d.log_path)
    finally:
        assert d.stop() == 0

