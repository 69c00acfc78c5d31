"""The location API, ``GET /sessions/<id>`` on the admin port (cluster/location.py): answered
from Redis, so two instances give the same answer; 404 for an unknown id, 400 for a string
that cannot be one; no secret in it. Real daemons, real Valkey."""

from __future__ import annotations

import json

import trio

from .helpers import session, speak, start_node
from .test_gateways import http_get
from .test_redis_restart import wait_for


async def _get(running, path: str) -> tuple[int, dict]:
    code, body = await trio.to_thread.run_sync(http_get, running.admin_port, path)
    return code, json.loads(body)


async def test_both_instances_say_where_a_session_is_and_what_it_owes(start_daemon, nursery):
    a = await start_daemon(instance_id="loc-a", result_deadline_ms=3000)
    b = await start_daemon(instance_id="loc-b", result_deadline_ms=3000)
    await start_node(nursery, a, node_id="n1", delay_ms=1000)  # slow: a result is still owed when we look
    async with session(a) as s:
        sid, token = s.ready["session_id"], s.ready["resume_token"]
        await speak(s)
        await s.send(type="finalize")
        await s.recv_until("utterance_finalized")
        answers = [await _get(a, f"/sessions/{sid}"), await _get(b, f"/sessions/{sid}")]
        assert answers[0] == answers[1], answers  # the same answer from any instance
        code, where = answers[0]
        assert code == 200 and where["state"] == "live" and where["instance_id"] == "loc-a", where
        assert where["ws_url"] == a.ws_url and where["epoch"] == 1 and where["next_utterance_index"] == 1, where
        assert where["results_owed"] == 1 and where["src_lang"] == "zh" and where["tgt_langs"] == ["en"], where
        assert token not in json.dumps(where) and "auth" not in json.dumps(where)
    # the socket is gone: nobody holds it, a client with its token may resume it anywhere

    async def resumable() -> bool:
        return (await _get(b, f"/sessions/{sid}"))[1].get("state") == "resumable"

    await wait_for(resumable, timeout=5)
    async with session(b, session_id=sid, resume_token=token, resume_from=0) as again:
        code, where = await _get(a, f"/sessions/{sid}")
        assert where["state"] == "live" and where["instance_id"] == "loc-b" and where["epoch"] == 2, where
        await again.send(type="close_session")  # (the owed result: SKIPPED at its 3 s deadline at the latest)
        await again.recv_until("session_closed")

    async def ended() -> bool:
        return (await _get(a, f"/sessions/{sid}"))[1].get("state") == "ended"

    await wait_for(ended, timeout=5)
    assert (await _get(a, f"/sessions/{sid}"))[1]["closed_reason"] == "client_close"


async def test_unknown_and_malformed_ids(daemon):
    code, answer = await _get(daemon, "/sessions/" + "0" * 32)
    assert code == 404 and answer["error"] == "UNKNOWN_SESSION", answer
    for bad in ("{x}", "a%20b", "..%2F..", "x" * 200, ""):
        code, answer = await _get(daemon, "/sessions/" + bad)
        assert code == 400 and answer["error"] == "BAD_SESSION_ID", (bad, answer)
