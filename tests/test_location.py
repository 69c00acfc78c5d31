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


async def test_both_instances_show_the_same_cluster(start_daemon, nursery):
    """``GET /cluster`` (cluster/overview.py) from Redis: each instance alive with the counts it
    publishes, every node, per language pair the nodes and free slots, and the balance of jobs
    over nodes; the same from either instance."""
    a = await start_daemon(instance_id="cl-a")
    b = await start_daemon(instance_id="cl-b")
    await start_node(nursery, a, node_id="n1", max_jobs=2, delay_ms=5000)  # slow: its job is held when we look
    await start_node(nursery, b, node_id="n2", max_jobs=4, lang_pairs=[("zh", "en"), ("zh", "de")], delay_ms=5000)
    async with session(a) as s:
        await speak(s)
        await s.send(type="finalize")
        await s.recv_until("utterance_finalized")

        async def settled() -> bool:  # each instance republishes its counts about every second
            code, seen = await _get(b, "/cluster")
            return code == 200 and (seen["totals"]["jobs_in_flight"], seen["totals"]["sessions"], seen["totals"]["nodes"]) \
                == (1, 1, 2)

        await wait_for(settled, timeout=10)
        (_, one), (_, other) = await _get(a, "/cluster"), await _get(b, "/cluster")
    for view in (one, other):
        for i in view["instances"]:
            i.pop("lapses_in_s")  # (read a moment apart)
        for n in view["nodes"]:  # (a heartbeat may land between the two reads: 0.037, then 0.039)
            assert 0 <= n.pop("load_score") <= 1, n
    assert one == other, (one, other)
    by_id = {i["instance_id"]: i for i in one["instances"]}
    assert by_id["cl-a"]["sessions"] == 1 and by_id["cl-a"]["nodes"] == 1 and by_id["cl-b"]["nodes"] == 1
    assert by_id["cl-a"]["ws_url"] == a.ws_url
    assert {n["node_id"]: n["current_jobs"] for n in one["nodes"]} == {"n1": 1, "n2": 0}  # (locality: a's own node)
    pairs = {(p["src_lang"], p["tgt_lang"]): p for p in one["lang_pairs"]}
    assert pairs[("zh", "en")] == {"src_lang": "zh", "tgt_lang": "en", "nodes": 2, "eligible": 2, "free_slots": 5,
                                   "slots": 6, "load": round(1 / 6, 3)}
    assert pairs[("zh", "de")] == {"src_lang": "zh", "tgt_lang": "de", "nodes": 1, "eligible": 1, "free_slots": 4,
                                   "slots": 4, "load": 0.0}
    assert one["balance"] == {"mean": 0.5, "stddev": 0.5, "cv": 1.0}  # one job on two nodes
    assert one["totals"] == {"sessions": 1, "nodes": 2, "jobs_in_flight": 1, "jobs_waiting": 0,
                             "instances": 2, "nodes_online": 2}
    assert (await _get(a, "/cluster/x"))[0] == 404


async def test_scheduler_status_prints_the_cluster_with_the_token_from_the_environment(start_daemon, nursery, tmp_path):
    """``scheduler status`` as a real process: tables, ``--json``, the admin token from the
    environment or a file (a 401 says how to give it), exit 1 when the port cannot be read."""
    import os
    import subprocess
    import sys

    running = await start_daemon(instance_id="st-a", admin_token="adm-secret-1")
    await start_node(nursery, running, node_id="n1", max_jobs=3)
    url = f"http://127.0.0.1:{running.admin_port}"

    async def status(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
        if token:
            env["SCHEDULER_ADMIN_TOKEN"] = token
        return await trio.run_process([sys.executable, "-m", "scheduler", "status", "--url", url, *args], env=env,
                                      capture_stdout=True, capture_stderr=True, check=False)

    async def node_seen() -> bool:
        done = await status("--json", token="adm-secret-1")
        return done.returncode == 0 and json.loads(done.stdout)["totals"]["nodes"] == 1

    await wait_for(node_seen, timeout=10)
    done = await status(token="adm-secret-1")
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "instances (1)" in text and "st-a" in text and running.ws_url in text
    assert "n1" in text and "0/3" in text and "zh-en" in text and "stddev/mean" in text
    assert "adm-secret-1" not in text
    token_file = tmp_path / "admin-token"
    token_file.write_text("adm-secret-1\n")
    assert (await status("--json", "--admin-token-file", str(token_file))).returncode == 0
    refused = await status()
    assert refused.returncode == 1 and b"HTTP 401" in refused.stderr and b"SCHEDULER_ADMIN_TOKEN" in refused.stderr
    gone = await trio.run_process([sys.executable, "-m", "scheduler", "status", "--url", "http://127.0.0.1:1"],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert gone.returncode == 1 and b"cannot read" in gone.stderr
