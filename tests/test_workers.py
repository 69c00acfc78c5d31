"""``scheduler serve --workers 2`` as a real process: one supervisor, two workers on one port
(SO_REUSEPORT), one admin port for the box, a dead worker started again, SIGTERM drains all."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from scheduler.ops.supervisor import Worker, _free_port, _get, _run_worker
from scheduler.reference.node import NodeOptions, ReferenceNode

from .helpers import SPEECH_100MS, peer, speak, token_of
from .test_e2e import log_events
from .test_gateways import http_get

pytestmark = pytest.mark.slow


class Supervisor:
    def __init__(self, tmp, *flags: str) -> None:
        self.log_path = tmp / "supervisor.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--workers", "2", "--ws-port", "0",
                                      "--admin-port", "0", *flags], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if '"scheduler.supervisor"' in line and '"listening"' in line:
                    ev = json.loads(line)
                    self.ws_url, self.admin_port = ev["ws"], urllib.parse.urlsplit(ev["admin"]).port
                    return
            if self.proc.poll() is not None:
                self.close()
                raise AssertionError(self.log_path.read_text())
            time.sleep(0.1)
        self.close()  # (its workers would live on, and refresh their liveness in the next test's Redis)
        raise AssertionError("supervisor did not start:\n" + self.log_path.read_text())

    async def get(self, path: str) -> tuple[int, str]:
        return await trio.to_thread.run_sync(http_get, self.admin_port, path)

    async def workers(self) -> list[dict]:
        return json.loads((await self.get("/status"))[1])["workers"]

    def close(self) -> None:
        """SIGTERM (the supervisor stops its workers), SIGKILL if it is not gone in 20 s: a
        supervisor killed at once would leave its workers running (they do not watch it)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def test_two_workers_one_port_one_admin_restart_and_drain(tmp_path):
    sup = Supervisor(tmp_path)
    try:
        assert (await sup.get("/readyz"))[0] == 200 and (await sup.get("/healthz"))[0] == 200
        workers = await sup.workers()
        assert [w["worker"] for w in workers] == [0, 1] and all(w["ready"] for w in workers)
        assert len({w["status"]["instance_id"] for w in workers}) == 2  # two instances of one Valkey
        async with peer(sup.ws_url + "/v1/node") as node:
            await node.register("n1")
            for _ in range(4):  # sessions land on either worker; the job reaches n1 either way
                async with peer(sup.ws_url + "/v1/session") as client:
                    await client.send(type="session_init", src_lang="zh", tgt_langs=["en"])
                    ready = await client.recv()
                    assert ready["type"] == "session_ready"
                    session_id = ready["session_id"]
                    await speak(client)
                    await client.send(type="finalize")
                    job = await node.recv(timeout=10)
                    await node.send(type="job_result", job_id=job["job_id"], attempt=job["attempt"], status="ok",
                                    source_text="s", text="t")
                    result, _ = await client.recv_until("result", timeout=10)
                    assert result["status"] == "SUCCESS"
            code, cluster = await sup.get("/cluster")  # the cluster and location APIs, asked of a worker
            assert code == 200 and {i["instance_id"] for i in json.loads(cluster)["instances"]} == \
                {w["status"]["instance_id"] for w in workers}
            assert [n["node_id"] for n in json.loads(cluster)["nodes"]] == ["n1"]
        code, where = await sup.get(f"/sessions/{session_id}")
        assert code == 200 and json.loads(where)["state"] in ("ended", "resumable"), where
        assert (await sup.get("/sessions/" + "0" * 32))[0] == 404 and (await sup.get("/sessions/{x}"))[0] == 400
        metrics = (await sup.get("/metrics"))[1]
        assert 'scheduler_sessions_total{worker="0"}' in metrics and 'scheduler_sessions_total{worker="1"}' in metrics
        dead = workers[0]["pid"]
        os.kill(dead, signal.SIGKILL)
        with trio.fail_after(20):
            while True:
                w0 = (await sup.workers())[0]
                if w0["restarts"] == 1 and w0["ready"] and w0["pid"] != dead:
                    break
                await trio.sleep(0.2)
        assert (await sup.get("/readyz"))[0] == 200
        assert "worker_exited" in log_events(sup.log_path)
        sup.proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: sup.proc.wait(timeout=30)) == 0
        assert "stopped" in log_events(sup.log_path)
    finally:
        sup.close()


async def _answer_next_job(node) -> None:
    job, _ = await node.recv_until("job_assign")
    await node.send(type="job_result", job_id=job["job_id"], attempt=job["attempt"], status="ok", source_text="s", text="t")


async def test_a_dead_workers_session_resumes_on_another_worker(tmp_path):
    """Whatever still kills a worker (the error boundary keeps one connection's failure inside
    that connection: docs/security.md) costs its sessions a resume, nothing else: the
    supervisor starts the worker again, and the client resumes on the shared port with every
    result in order."""
    sup = Supervisor(tmp_path, "--node-ttl-ms", "60000")  # (the raw test node sends no heartbeats)
    try:
        with trio.fail_after(60):  # (each phase has its own bound: a timeout names the phase)
            async with peer(sup.ws_url + "/v1/node") as node:
                await node.register("n1", max_jobs=4)
                while True:  # the kernel spreads connections over the workers: take one that lands on worker 0
                    async with peer(sup.ws_url + "/v1/session") as client:
                        await client.send(type="session_init", src_lang="zh", tgt_langs=["en"])
                        session_id = (await client.recv())["session_id"]
                        holder = None
                        while holder is None:
                            for w in await sup.workers():
                                if any(s["session_id"] == session_id for s in (w["status"] or {}).get("sessions", [])):
                                    holder = w
                            await trio.sleep(0.1)
                        if holder["worker"] != 0:
                            continue
                        await speak(client)
                        await client.send(type="finalize")
                        await _answer_next_job(node)
                        assert (await client.recv_until("result"))[0]["utterance_index"] == 0
                        os.kill(holder["pid"], signal.SIGKILL)
                        with pytest.raises(Exception):  # noqa: B017 (the connection is cut: ConnectionClosed)
                            await client.recv(timeout=10)
                        break
        try:
            with trio.fail_after(30):  # worker 0 restarted and ready: either worker may take the resume
                while not ((w0 := (await sup.workers())[0])["restarts"] == 1 and w0["ready"]):
                    await trio.sleep(0.2)
        except trio.TooSlowError as exc:  # (what the box said, for the next one to look)
            raise AssertionError(f"{await sup.workers()}\n{sup.log_path.read_text()[-6000:]}") from exc
        with trio.fail_after(30):
            await _resume_after_the_kill(sup, session_id)
    finally:
        sup.close()


async def _resume_after_the_kill(sup: Supervisor, session_id: str) -> None:
    async with peer(sup.ws_url + "/v1/node") as node:  # a second node: n1 may have been on worker 0 too
        await node.register("n2", max_jobs=4)
        async with peer(sup.ws_url + "/v1/session") as client:
            await client.send(type="session_init", src_lang="zh", tgt_langs=["en"], session_id=session_id,
                              resume_token=token_of(session_id), resume_from=0)
            ready = await client.recv()
            assert ready["type"] == "session_ready" and ready["resumed"] and ready["next_utterance_index"] == 1
            assert (await client.recv())["utterance_index"] == 0  # re-sent from the journal
            await speak(client)
            await client.send(type="finalize")
            await _answer_next_job(node)
            result, _ = await client.recv_until("result")
            assert result["utterance_index"] == 1 and result["status"] == "SUCCESS"


async def test_the_admin_token_guards_the_supervisors_port_and_it_reads_its_workers_with_it(tmp_path):
    import urllib.request

    sup = Supervisor(tmp_path, "--admin-token", "adm-new,adm-old")

    def get(path: str, token: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{sup.admin_port}{path}",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    try:
        with trio.fail_after(30):
            while (await trio.to_thread.run_sync(get, "/readyz"))[0] != 200:  # open, as /healthz
                await trio.sleep(0.2)
            assert (await trio.to_thread.run_sync(get, "/status"))[0] == 401
            while True:  # the supervisor reads each worker's (guarded) /status with the token
                code, body = await trio.to_thread.run_sync(get, "/status", "adm-old")
                if code == 200 and all(w["status"] for w in json.loads(body)["workers"]):
                    break
                await trio.sleep(0.2)
            code, body = await trio.to_thread.run_sync(get, "/metrics", "adm-new")
            assert code == 200 and b'scheduler_sessions_total{worker="1"}' in body
    finally:
        sup.close()


async def test_workers_behind_tls(tmp_path, tls_certs):
    """--tls-cert: the workers serve wss:// on the shared port, the supervisor's admin port
    https://, and the supervisor reads its workers' admin over TLS (else never ready)."""
    import urllib.request

    from trio_websocket import open_websocket_url

    cert, key, client = tls_certs
    sup = Supervisor(tmp_path, "--tls-cert", cert, "--tls-key", key)
    try:
        assert sup.ws_url.startswith("wss://")

        def get(path: str) -> int:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{sup.admin_port}{path}", context=client, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        with trio.fail_after(30):
            while await trio.to_thread.run_sync(get, "/readyz") != 200:
                await trio.sleep(0.2)
        async with open_websocket_url(sup.ws_url + "/v1/session", ssl_context=client) as ws:
            await ws.send_message(json.dumps({"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"]}))
            assert json.loads(await ws.get_message())["code"] == "UNSUPPORTED_LANG_PAIR"  # served: no node yet
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
            await trio.to_thread.run_sync(lambda: urllib.request.urlopen(f"https://127.0.0.1:{sup.admin_port}/healthz", timeout=5))
    finally:
        sup.close()


async def test_workers_never_outlive_their_supervisor(tmp_path):
    """kill -9 of the supervisor: its workers see their parent gone, drain for at most 1.5 s
    and exit (supervisor_gone), and its embedded Valkey dies with it: nothing is left
    serving on the shared port."""
    sup = Supervisor(tmp_path)
    try:
        with trio.fail_after(30):
            while not all(w["ready"] for w in await sup.workers()):
                await trio.sleep(0.2)
        pids = [w["pid"] for w in await sup.workers()]
        valkey = next(json.loads(line)["pid"] for line in sup.log_path.read_text().splitlines()
                      if '"embedded_redis_started"' in line)
        sup.proc.kill()
        sup.proc.wait()
        with trio.fail_after(5):  # (2 s to drain and exit, with room for a slow box)
            while any(_alive(pid) for pid in [*pids, valkey]):
                await trio.sleep(0.1)
        assert log_events(sup.log_path).get("supervisor_gone"), "a worker did not say why it stopped"
    finally:
        sup.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie (its parent gone, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


async def test_sigterm_drains_every_worker_as_one_daemon_drains(tmp_path):
    """systemctl stop (SIGTERM to the supervisor): every worker drains as a single daemon
    does: the open utterance of each session is finalized (reason close) and its result
    arrives before session_closed (reason shutdown).

    Audio a worker has not read yet when it starts draining is not buffered and is not
    finalized (a resumed client sends it again): so the test lets every worker read its
    sessions' audio (a second; the pause finalize is 5 s away) before the SIGTERM. Without
    that, on a box busy with other tests, the last session's frames could still be on the
    wire when the drain began (seen on three xdist workers)."""
    sup = Supervisor(tmp_path, "--pause-ms", "5000")
    try:
        with trio.fail_after(60):
            async with peer(sup.ws_url + "/v1/node") as node, trio.open_nursery() as nursery:
                await node.register("n1", max_jobs=8)

                async def answer_everything():
                    with contextlib.suppress(ConnectionClosed):  # (its worker closes it once drained)
                        while True:
                            await _answer_next_job(node)

                nursery.start_soon(answer_everything)
                async with contextlib.AsyncExitStack() as stack:
                    clients = [await stack.enter_async_context(peer(sup.ws_url + "/v1/session")) for _ in range(4)]
                    for client in clients:  # the kernel spreads them over both workers
                        await client.send(type="session_init", src_lang="zh", tgt_langs=["en"])
                        assert (await client.recv())["type"] == "session_ready"
                        await speak(client)  # an utterance left open
                    await trio.sleep(1.0)  # (read by the workers: see the docstring)
                    sup.proc.send_signal(signal.SIGTERM)
                    for client in clients:
                        try:
                            fin, _ = await client.recv_until("utterance_finalized", timeout=20)
                            result, _ = await client.recv_until("result", timeout=20)
                            closed, _ = await client.recv_until("session_closed", timeout=20)
                        except (ConnectionClosed, trio.TooSlowError) as exc:  # (what the box said, for the next one to look)
                            raise AssertionError(sup.log_path.read_text()[-6000:]) from exc
                        assert (fin["reason"], result["status"], closed["reason"]) == ("close", "SUCCESS", "shutdown")
                nursery.cancel_scope.cancel()
        assert await trio.to_thread.run_sync(lambda: sup.proc.wait(timeout=30)) == 0
    finally:
        sup.close()


async def test_a_reload_replaces_the_workers_one_at_a_time_and_loses_nothing(tmp_path):
    """SIGHUP (systemctl reload) to a --workers 2 supervisor while three clients stream: each
    worker is replaced by a new process (ready first, then the old one drains), the clients
    of a draining worker resume on the others, and every utterance ends SUCCESS, in order,
    with no gap."""
    from scheduler.client import connect

    sup = Supervisor(tmp_path, "--drain-timeout-ms", "5000")
    utterances = 12
    try:
        with trio.fail_after(90):
            before = {w["pid"] for w in await sup.workers()}
            async with trio.open_nursery() as nursery:  # a reference node: it registers again when its worker drains
                await nursery.start(ReferenceNode(NodeOptions(url=sup.ws_url, node_id="n1", max_jobs=8, delay_ms=50)).run)
                got: list[list] = []

                async def client():
                    async with connect(sup.ws_url, src_lang="zh", tgt_langs=["en"], reconnects=10) as session:
                        for _ in range(utterances):
                            for k in range(3):
                                await session.send_audio(SPEECH_100MS, is_final=k == 2)
                            await trio.sleep(0.4)
                        await session.close()
                        got.append([(r.utterance_index, r.status) async for r in session.results()])

                async with trio.open_nursery() as clients:
                    for _ in range(3):
                        clients.start_soon(client)
                    await trio.sleep(1.5)
                    sup.proc.send_signal(signal.SIGHUP)
                nursery.cancel_scope.cancel()
            assert got == [[(i, "SUCCESS") for i in range(utterances)]] * 3, got
            while "reload_done" not in (events := log_events(sup.log_path)):  # (it may outlast the clients)
                await trio.sleep(0.2)
            assert events["reload_done"]["replaced"] == 2, events.get("reload_done")
            after = {w["pid"] for w in await sup.workers()}
            assert not before & after and all(w["ready"] for w in await sup.workers())
    finally:
        sup.close()


def test_a_worker_that_dies_mid_answer_is_no_answer_not_a_crash():
    """The supervisor reads its workers' admin paths; a worker killed while it answers cuts
    the body short (http.client.IncompleteRead, no OSError), which once ended the supervisor
    (chaos run, 2026-12-07). It is now "no answer", as a refused connection is."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_half():
        for status in (b"200 OK", b"500 Internal Server Error"):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 21964\r\n\r\n{\"partial\":")

    thread = threading.Thread(target=answer_half, daemon=True)
    thread.start()
    try:
        assert _get(port, "/status") == (0, b"")  # a 200 cut short
        assert _get(port, "/status") == (0, b"")  # an error status cut short
    finally:
        thread.join(timeout=5)
        listener.close()


async def test_a_worker_that_exits_starts_again_on_another_admin_port():
    """A worker that exits is started again on a new private admin port: its old one may be
    taken by now (a worker that exited on EADDRINUSE would exit again on that port at every
    restart, and the supervisor would never be ready: seen once on CI). Here the worker exits
    at once (a setting it refuses), three times."""
    worker, ports, stopping = Worker(0, "restarts-w0", _free_port()), [], trio.Event()

    def env_for(w: Worker) -> dict[str, str]:
        ports.append(w.admin_port)
        if len(ports) == 3:
            stopping.set()
        return {**os.environ, "SCHEDULER_ADMIN_PORT": str(w.admin_port), "SCHEDULER_WS_PORT": "not-a-port"}

    with trio.fail_after(60):
        await _run_worker(worker, env_for, stopping)
    assert len(ports) == 3 and len(set(ports)) == 3, ports
    assert worker.restarts == 2

