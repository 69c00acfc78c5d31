"""The node library (scheduler.node) against a real daemon: answers, errors, threads, cancel,
deadline, drain, a daemon restart and several URLs (docs/nodes.md).

Each test runs a daemon in this process (the shared Valkey) and a :class:`Node` around a
function of the test's, so the test controls when a job ends. The node's SIGTERM and the
twenty-line example run as real processes in tests/test_node_processes.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import trio

from scheduler.node import Job, JobFailed, Node, NodeRefused, Result, read_token

from .helpers import session, speak


async def started_node(nursery, handler, urls, **kwargs) -> tuple[Node, trio.Event]:
    """A node serving ``handler``, registered; and an event set when its ``run`` returned."""
    node = Node(handler, lang_pairs=[("en", "es")], urls=urls, node_id=kwargs.pop("node_id", "n1"), **kwargs)
    ended = trio.Event()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await node.run(task_status=task_status)
        finally:
            ended.set()

    await nursery.start(run)
    return node, ended


async def utterance(p, timeout: float = 10.0) -> dict:
    """Speak, finalize, and return the utterance's result."""
    await speak(p)
    await p.send(type="finalize")
    result, _ = await p.recv_until("result", timeout=timeout)
    return result


class Held:
    """A function (an object with an async ``__call__``) whose jobs run until the test
    releases them."""

    def __init__(self, text: str = "hecho") -> None:
        self.text, self.running, self.release = text, trio.Event(), trio.Event()

    async def __call__(self, job: Job) -> Result:
        self.running.set()
        await self.release.wait()
        return Result(text=self.text)

    async def started_by(self, p) -> None:
        """Speak and finalize on session ``p``; return once its job runs here."""
        await speak(p)
        await p.send(type="finalize")
        with trio.fail_after(5):
            await self.running.wait()


async def test_answers_errors_and_a_raising_function_cost_one_job(daemon, nursery):
    calls: list[int] = []

    async def handler(job: Job) -> Result | str:
        calls.append(job.utterance_index)
        assert job.src_lang == "en" and job.tgt_lang == "es" and job.sample_rate == 16000 and job.audio_ms == 300
        if job.utterance_index == 0:
            raise ValueError("a message a client must not see: /srv/models/secret")
        if job.utterance_index == 1:
            raise JobFailed("MODEL_OVERLOADED")
        if job.utterance_index == 2:
            return 42  # type: ignore[return-value]  (not a Result: an error, not a crash)
        return "hola" if job.utterance_index == 3 else Result(text="buenos días", source_text="good morning")

    node, _ = await started_node(nursery, handler, [daemon.ws_url], max_jobs=2)
    async with session(daemon, src="en", tgts=("es",)) as p:
        results = [await utterance(p) for _ in range(5)]
    errors = [r["translations"]["es"].get("error") for r in results[:3]]
    assert errors == ["HANDLER_ERROR: ValueError", "MODEL_OVERLOADED", "HANDLER_ERROR: returned int, not Result or str"]
    assert "secret" not in json.dumps(results)
    assert [r["translations"]["es"]["status"] for r in results] == ["FAILED"] * 3 + ["SUCCESS"] * 2
    assert results[3]["translations"]["es"]["text"] == "hola"
    assert (results[4]["source_text"], results[4]["translations"]["es"]["text"]) == ("good morning", "buenos días")
    assert calls == [0, 1, 2, 3, 4]
    assert (node.stats.jobs_done, node.stats.jobs_failed) == (2, 3)


async def test_a_blocking_function_runs_in_threads_under_its_limiter(daemon, nursery):
    lock, inside, most = threading.Lock(), [0], [0]

    def handler(job: Job) -> Result:  # blocking: a thread each, at most `threads` at once
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            threading.Event().wait(0.2)
            return Result(text=f"#{job.utterance_index}")
        finally:
            with lock:
                inside[0] -= 1

    node, _ = await started_node(nursery, handler, [daemon.ws_url], max_jobs=4, threads=1)
    async with trio.open_nursery() as clients:
        for _ in range(3):
            async def one() -> None:
                async with session(daemon, src="en", tgts=("es",)) as p:
                    assert (await utterance(p))["translations"]["es"]["text"] == "#0"
            clients.start_soon(one)
    assert most[0] == 1 and node.stats.jobs_done == 3


async def test_job_cancel_stops_the_function_and_nothing_is_answered(daemon, nursery):
    began, saw_cancel = trio.Event(), threading.Event()

    def handler(job: Job) -> Result:
        trio.from_thread.run_sync(began.set)
        if job.cancelled.wait(10):  # a blocking function sees the cancel on its job
            saw_cancel.set()
        return Result(text="too late")

    node, _ = await started_node(nursery, handler, [daemon.ws_url])
    async with session(daemon, src="en", tgts=("es",)) as p:
        await speak(p)
        await p.send(type="finalize")
        with trio.fail_after(5):
            await began.wait()
        await p.send(type="close_session")  # ... and goes before its result: the session ends
        await p.ws.aclose()
    with trio.fail_after(5):
        while not node.stats.jobs_cancelled:
            await trio.sleep(0.02)
    await trio.to_thread.run_sync(saw_cancel.wait, 5)
    assert saw_cancel.is_set() and (node.stats.jobs_done, node.stats.jobs_failed) == (0, 0)


async def test_the_deadline_ends_a_job_with_an_error(start_daemon, nursery):
    daemon = await start_daemon(result_deadline_ms=1500)

    async def handler(job: Job) -> Result:
        await trio.sleep_forever()

    node, _ = await started_node(nursery, handler, [daemon.ws_url])
    async with session(daemon, src="en", tgts=("es",)) as p:
        result = await utterance(p)
    assert result["translations"]["es"]["status"] in ("FAILED", "SKIPPED")
    with trio.fail_after(5):
        while not node.stats.jobs_expired:
            await trio.sleep(0.02)
    assert node.stats.jobs_failed == 1


async def test_drain_answers_the_jobs_held_then_leaves(daemon, nursery):
    handler = Held()

    node, ended = await started_node(nursery, handler, [daemon.ws_url], max_jobs=2)
    async with session(daemon, src="en", tgts=("es",)) as p:
        await handler.started_by(p)
        node.stop()
        with trio.fail_after(5):  # the daemon marks it draining: no new job goes to it
            while not [n for n in await daemon.scheduling.nodes_status() if n["node_id"] == "n1" and n["draining"]]:
                await trio.sleep(0.05)
        assert not ended.is_set()
        handler.release.set()
        result, _ = await p.recv_until("result")
    assert result["translations"]["es"] == {"status": "SUCCESS", "text": "hecho", "node_id": "n1"} | {
        k: v for k, v in result["translations"]["es"].items() if k not in ("status", "text", "node_id")}
    with trio.fail_after(5):  # the daemon closed it (1001 drained) and it did not come back
        await ended.wait()
    assert "n1" not in daemon.nodes and node.stats.registrations == 1


async def test_a_daemon_that_stops_gets_the_answers_held_and_the_node_moves_on(start_daemon, nursery):
    first, second = await start_daemon(drain_timeout_ms=10_000), await start_daemon()
    handler = Held()

    node, _ = await started_node(nursery, handler, [first.ws_url, second.ws_url], max_jobs=2)
    async with session(first, src="en", tgts=("es",)) as p:
        await handler.started_by(p)
        first.shutdown()  # graceful: its sessions wait for their results, its nodes for their answers
        await trio.sleep(0.3)
        handler.release.set()
        result, _ = await p.recv_until("result")
        closed, _ = await p.recv_until("session_closed")
    assert result["translations"]["es"]["text"] == "hecho" and closed["reason"] == "shutdown"
    with trio.fail_after(20):  # the node went on to the next URL
        while "n1" not in second.nodes:
            await trio.sleep(0.05)
    assert (node.stats.jobs_done, node.stats.registrations) == (1, 2)


def test_the_token_comes_from_the_flag_the_file_or_the_environment(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file,older-one\n")
    monkeypatch.setenv("SCHEDULER_NODE_TOKEN", "from-env")
    assert read_token("from-flag", token_file) == "from-flag"
    assert read_token(None, token_file) == "from-file"
    assert read_token(None, None) == "from-env"
    monkeypatch.delenv("SCHEDULER_NODE_TOKEN")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_token(None, None) is None
    (tmp_path / "node_token").write_text("from-systemd\n")  # deploy/scheduler-node.service's LoadCredential
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_token(None, None) == "from-systemd"
    assert "from-file" not in repr(Node(lambda job: "x", lang_pairs=[("en", "es")], token_file=token_file).register)


async def test_the_node_comes_back_after_the_daemon_restarts(start_daemon, nursery):
    first = await start_daemon()
    port = int(first.ws_url.rsplit(":", 1)[1])

    async def handler(job: Job) -> Result:
        return Result(text="ok")

    node, _ = await started_node(nursery, handler, [first.ws_url])
    first.shutdown(immediate=True)
    with trio.fail_after(10):  # its listener is gone
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
            except OSError:
                break
            await trio.sleep(0.05)
    second = await start_daemon(ws_port=port)  # the same address again: a restart
    with trio.fail_after(20):
        while "n1" not in second.nodes:
            await trio.sleep(0.05)
    async with session(second, src="en", tgts=("es",)) as p:
        assert (await utterance(p))["translations"]["es"]["text"] == "ok"
    assert node.stats.registrations == 2


async def test_a_url_that_is_down_is_passed_over_for_the_next(daemon, nursery):
    async def handler(job: Job) -> Result:
        return Result(text="ok")

    with trio.fail_after(10):  # nothing listens on port 9: the node goes on to the daemon's URL
        node, _ = await started_node(nursery, handler, ["ws://127.0.0.1:9", daemon.ws_url])
    async with session(daemon, src="en", tgts=("es",)) as p:
        assert (await utterance(p))["translations"]["es"]["text"] == "ok"
    assert node.stats.registrations == 1


@pytest.mark.parametrize("score", [None, "engine"])
async def test_load_score_is_busy_slots_or_the_authors_and_falls_at_once(start_daemon, nursery, score):
    # (without the author's score, a fall must not wait for the next heartbeat, 2.5 s later)
    daemon = await start_daemon(**({} if score else {"heartbeat_interval_ms": 2500, "node_ttl_ms": 10_000}))
    handler = Held()

    kwargs = {"load_score": lambda: 0.125} if score else {}
    node, _ = await started_node(nursery, handler, [daemon.ws_url], max_jobs=1, **kwargs)

    async def stored() -> float | None:
        return next(n["load_score"] for n in await daemon.scheduling.nodes_status() if n["node_id"] == "n1")

    async with session(daemon, src="en", tgts=("es",)) as p:
        await handler.started_by(p)
        with trio.fail_after(10):
            while await stored() != (0.125 if score else 1.0):
                await trio.sleep(0.05)
        handler.release.set()
        released_at = trio.current_time()
        await p.recv_until("result")
        if not score:  # back to 0 at once (heartbeats are written within 0.6 s), not at the next heartbeat
            with trio.fail_after(5):
                while await stored() != 0.0:
                    await trio.sleep(0.02)
            assert trio.current_time() - released_at < 1.5
    assert node.stats.jobs_done == 1


async def scripted_daemon(nursery, script) -> str:
    """A WebSocket server on loopback that plays ``script(ws)`` for each node connection (what
    the real daemon does not send on purpose: a repeated assignment, bad audio, an unknown
    message); returns its URL."""
    from trio_websocket import serve_websocket

    async def handler(request):
        await script(await request.accept())

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}"


def assign(job_id: str, audio: str = "AAAAAA==") -> str:
    return json.dumps({"type": "job_assign", "job_id": job_id, "attempt": 1, "job_key": "s:0:translate:es", "session_id": "s",
                       "utterance_index": 0, "job_type": "translate:es", "src_lang": "en", "tgt_lang": "es", "turn_id": "t",
                       "sample_rate": 16000, "audio": audio, "deadline_ms": int(time.time() * 1000) + 30_000})


async def test_each_job_is_answered_once_and_odd_messages_cost_nothing(nursery):
    answers: list[dict] = []
    done = trio.Event()

    async def script(ws) -> None:
        assert json.loads(await ws.get_message())["type"] == "register"
        await ws.send_message(json.dumps({"type": "registered", "node_id": "n1", "heartbeat_interval_ms": 60_000,
                                          "node_ttl_ms": 180_000}))
        await ws.send_message(json.dumps({"type": "job_offer_v9", "what": "a newer daemon's message"}))  # ignored
        await ws.send_message(assign("j1"))
        await ws.send_message(assign("j1"))  # the same assignment again: still one job, one answer
        await ws.send_message(assign("j2", audio="not base64!"))
        while len(answers) < 2:
            answers.append(json.loads(await ws.get_message()))
        with trio.move_on_after(0.5):  # nothing more comes
            answers.append(json.loads(await ws.get_message()))
        done.set()
        await trio.sleep_forever()

    calls: list[str] = []

    async def handler(job: Job) -> Result:
        calls.append(job.job_id)
        await trio.sleep(0.1)
        return Result(text=f"{len(job.audio)} bytes")

    await started_node(nursery, handler, [await scripted_daemon(nursery, script)])
    with trio.fail_after(10):
        await done.wait()
    assert calls == ["j1"]
    by_id = {a["job_id"]: a for a in answers}
    assert len(answers) == 2 and by_id["j1"]["status"] == "ok" and by_id["j1"]["text"] == "4 bytes"
    assert by_id["j2"]["status"] == "error" and by_id["j2"]["error"] == "BAD_AUDIO: not base64"


async def test_a_node_id_in_use_is_fatal_only_at_the_first_registration(nursery):
    registrations = 0

    async def script(ws) -> None:
        nonlocal registrations
        await ws.get_message()
        registrations += 1
        if registrations == 1:  # registered, then the connection drops
            await ws.send_message(json.dumps({"type": "registered", "node_id": "n1", "heartbeat_interval_ms": 60_000,
                                              "node_ttl_ms": 180_000}))
            await ws.aclose()
            return
        if registrations == 2:  # the daemon still holds the old connection: try again, do not give up
            await ws.send_message(json.dumps({"type": "error", "code": "DUPLICATE_NODE_ID", "message": "n1 is connected",
                                              "fatal": True}))
            return
        await ws.send_message(json.dumps({"type": "registered", "node_id": "n1", "heartbeat_interval_ms": 60_000,
                                          "node_ttl_ms": 180_000}))
        await trio.sleep_forever()

    node, ended = await started_node(nursery, lambda job: "x", [await scripted_daemon(nursery, script)])
    with trio.fail_after(15):
        while node.stats.registrations < 2:
            await trio.sleep(0.05)
    assert registrations == 3 and not ended.is_set()
    first = Node(lambda job: "x", lang_pairs=[("en", "es")], urls=[await scripted_daemon(nursery, refuse_duplicate)], reconnect=True)
    with pytest.raises(NodeRefused, match="DUPLICATE_NODE_ID"):  # at the first registration it is: another node has the id
        await first.run()


async def refuse_duplicate(ws) -> None:
    await ws.get_message()
    await ws.send_message(json.dumps({"type": "error", "code": "DUPLICATE_NODE_ID", "message": "taken", "fatal": True}))


def test_flags_override_only_what_they_name(monkeypatch, tmp_path):
    """run_node's flags: a URL list or token the node's code passes stays unless a flag or the
    environment names one."""
    import argparse

    from scheduler.node import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, max_jobs=3)
    monkeypatch.delenv("SCHEDULER_NODE_URLS", raising=False)
    monkeypatch.delenv("SCHEDULER_NODE_TOKEN", raising=False)
    assert from_arguments(parser.parse_args([])) == {"max_jobs": 3, "drain_timeout_s": 60.0}
    monkeypatch.setenv("SCHEDULER_NODE_URLS", "ws://a:1, ws://b:2")
    (tmp_path / "t").write_text("secret-token\n")
    given = from_arguments(parser.parse_args(["--token-file", str(tmp_path / "t"), "--node-id", "x", "--max-jobs", "5"]))
    assert given == {"max_jobs": 5, "drain_timeout_s": 60.0, "urls": ["ws://a:1", "ws://b:2"], "token": "secret-token",
                     "node_id": "x"}
    assert from_arguments(parser.parse_args(["--url", "ws://c:3"]))["urls"] == ["ws://c:3"]


async def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read().decode()

    return await trio.to_thread.run_sync(get)


async def test_the_node_serves_its_metrics_and_readiness(daemon, nursery):
    async def handler(job: Job) -> Result:
        if job.utterance_index == 1:
            raise JobFailed("NO_MODEL")
        return Result(text="ok")

    lonely = Node(handler, lang_pairs=[("en", "es")], urls=["ws://127.0.0.1:9"], metrics_port=0)
    nursery.start_soon(lonely.run)
    with trio.fail_after(5):
        while lonely.metrics_port is None:
            await trio.sleep(0.01)
    assert (await http_get(lonely.metrics_port, "/readyz"))[0] == 503  # no daemon took it
    lonely.stop()

    node, _ = await started_node(nursery, handler, [daemon.ws_url], metrics_port=0)
    async with session(daemon, src="en", tgts=("es",)) as p:
        await utterance(p)
        await utterance(p)
    status, text = await http_get(node.metrics_port, "/metrics")
    assert status == 200
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['speech_node_jobs_total{outcome="ok"}'] == 1 and values['speech_node_jobs_total{outcome="failed"}'] == 1
    assert values["speech_node_connected"] == 1 and values["speech_node_registrations_total"] == 1
    assert values["speech_node_jobs_in_flight"] == 0 and values["speech_node_job_seconds_count"] == 2
    assert (await http_get(node.metrics_port, "/readyz"))[0] == 200
    assert (await http_get(node.metrics_port, "/"))[0] == 404  # (the daemon's pages are not a node's)


async def test_a_job_assigned_while_the_node_drains_is_answered_before_it_leaves(nursery, monkeypatch):
    from scheduler.node import link

    monkeypatch.setattr(link, "DRAINED_CLOSE_WAIT_S", 0.3)  # (the wait for the daemon's close, shorter than the job)
    seen: list[str] = []
    node: Node | None = None

    async def script(ws) -> None:
        await ws.get_message()
        await ws.send_message(json.dumps({"type": "registered", "node_id": "n1", "heartbeat_interval_ms": 60_000,
                                          "node_ttl_ms": 180_000}))
        assert node is not None
        node.stop()
        while json.loads(await ws.get_message())["type"] != "drain":
            pass
        await ws.send_message(assign("late"))  # sent before this "daemon" read the drain
        while True:
            seen.append(json.loads(await ws.get_message())["type"])

    async def handler(job: Job) -> Result:
        await trio.sleep(1.0)
        return Result(text="late but answered")

    node = Node(handler, lang_pairs=[("en", "es")], urls=[await scripted_daemon(nursery, script)], node_id="n1")
    with trio.fail_after(10):
        await node.run()  # it returns once it has left
    assert "job_result" in seen and node.stats.jobs_done == 1


async def test_a_long_utterance_at_48_khz_reaches_the_node(start_daemon, nursery):
    """12 s of 48 kHz audio is a job_assign of 1.5 MB (base64): more than trio-websocket's
    default 1 MiB message, which cut the node off at such a job and again at its next try."""
    from scheduler.session.audio import tone

    daemon = await start_daemon(max_utterance_ms=20_000)
    sizes: list[int] = []

    async def handler(job: Job) -> Result:
        sizes.append(len(job.audio))
        return Result(text="long")

    node, _ = await started_node(nursery, handler, [daemon.ws_url])
    frame = tone(100, 48_000)
    async with session(daemon, src="en", tgts=("es",), sample_rate=48_000) as p:
        for _ in range(120):
            await p.send_raw(frame)
        await p.send(type="finalize")
        result, _ = await p.recv_until("result", timeout=20)
    assert result["translations"]["es"]["text"] == "long" and sizes == [120 * len(frame)]
    assert node.stats.registrations == 1  # never cut off


async def test_a_peer_that_ignores_max_jobs_gets_node_full(nursery):
    answers: list[dict] = []
    done = trio.Event()

    async def script(ws) -> None:
        await ws.get_message()
        await ws.send_message(json.dumps({"type": "registered", "node_id": "n1", "heartbeat_interval_ms": 60_000,
                                          "node_ttl_ms": 180_000}))
        for n in range(5):  # max_jobs 1: two may be held (one just cancelled may still be ending), not five
            await ws.send_message(assign(f"j{n}"))
        while len(answers) < 3:
            answers.append(json.loads(await ws.get_message()))
        done.set()
        await trio.sleep_forever()

    async def handler(job: Job) -> Result:
        await trio.sleep_forever()

    await started_node(nursery, handler, [await scripted_daemon(nursery, script)])
    with trio.fail_after(5):
        await done.wait()
    assert sorted((a["job_id"], a["status"], a["error"]) for a in answers) == [
        ("j2", "error", "NODE_FULL"), ("j3", "error", "NODE_FULL"), ("j4", "error", "NODE_FULL")]


async def test_while_one_node_drains_another_takes_the_new_jobs_and_none_is_lost(daemon, nursery):
    held = Held(text="from n1")

    async def quick(job: Job) -> Result:
        return Result(text="from n2")

    first, first_ended = await started_node(nursery, held, [daemon.ws_url], max_jobs=4, node_id="n1")
    async with trio.open_nursery() as clients:
        results: dict[int, dict] = {}

        async def talker(n: int, started: trio.Event) -> None:
            async with session(daemon, src="en", tgts=("es",)) as p:
                await speak(p)
                await p.send(type="finalize")
                started.set()
                results[n] = (await p.recv_until("result"))[0]
                results[n + 10] = await utterance(p)  # placed after n1 drains: on n2

        for n in range(3):
            started = trio.Event()
            clients.start_soon(talker, n, started)
            await started.wait()
        with trio.fail_after(5):  # n1 holds all three
            while not [n for n in await daemon.scheduling.nodes_status() if n["node_id"] == "n1" and n["current_jobs"] == 3]:
                await trio.sleep(0.02)
        first.stop()
        await started_node(nursery, quick, [daemon.ws_url], node_id="n2")
        held.release.set()  # n1 answers what it holds; the sessions' next utterances go to n2
    texts = {n: r["translations"]["es"].get("text") for n, r in results.items()}
    assert texts == {0: "from n1", 1: "from n1", 2: "from n1", 10: "from n2", 11: "from n2", 12: "from n2"}, results
    with trio.fail_after(5):
        await first_ended.wait()
    assert first.stats.jobs_done == 3
