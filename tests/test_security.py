"""Secure by default (docs/security.md): protected mode, the admin token, bounded connections,
secrets from files and systemd credentials, and no secret in the clear anywhere. Real daemons
(in-process and as processes), real Valkey, real sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio

from scheduler.ops import config, secrets
from scheduler.ops.config import ConfigError, Settings
from scheduler.ops.embedded_redis import EmbeddedValkey

from .helpers import peer, session, speak, start_node, token_of
from .rawws import RawPeer, frame

ROOT = Path(__file__).resolve().parent.parent


def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
    except OSError:  # not listening yet
        return 0, b"", {}


# ---------------------------------------------------------------- protected mode


def test_protected_mode_refuses_open_listeners_off_loopback():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        Settings(ws_host=host, admin_host=host)  # loopback: no token needed
    with pytest.raises(ConfigError, match="--node-token.*--insecure-open-nodes"):
        Settings(ws_host="0.0.0.0")
    with pytest.raises(ConfigError, match="--admin-token.*--insecure-open-admin"):
        Settings(admin_host="10.1.2.3")
    with pytest.raises(ConfigError, match="ws_host"):
        Settings(ws_host="scheduler.example")  # a name may resolve to anything
    Settings(ws_host="0.0.0.0", node_token="t", admin_host="::", admin_token="a")
    Settings(ws_host="0.0.0.0", insecure_open_nodes=True, admin_host="0.0.0.0", insecure_open_admin=True)


def test_serve_exits_2_naming_both_ways_out_and_warns_when_told_to_run_open(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scheduler", "serve", "--ws-host", "0.0.0.0", "--ws-port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "--node-token" in done.stderr and "--insecure-open-nodes" in done.stderr, done.stderr
    log = tmp_path / "open.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--ws-host", "0.0.0.0", "--ws-port", "0",
                                 "--admin-port", "0", "--insecure-open-nodes"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while '"listening"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        warned = [e for e in events if e.get("event") == "insecure_open_nodes"]
        assert warned and warned[0]["level"] == "warning", events
    finally:
        proc.terminate()
        proc.wait(20)


# ---------------------------------------------------------------- the admin token


async def test_the_admin_token_guards_everything_but_health(start_daemon):
    running = await start_daemon(admin_token="adm-one, adm-two")
    port = running.admin_port
    get = lambda path, token=None: trio.to_thread.run_sync(_get, port, path, token)  # noqa: E731
    assert (await get("/healthz"))[0] == 200 and (await get("/readyz"))[0] == 200
    for path in ("/status", "/metrics", "/", "/app"):
        status, _, headers = await get(path)
        assert status == 401 and headers.get("www-authenticate", "").startswith("Bearer"), path
        assert (await get(path, "adm-three"))[0] == 401
    assert (await get("/status", "adm-one"))[0] == 200 and (await get("/metrics", "adm-two"))[0] == 200  # rotation: both
    assert running.metrics.admin_unauthorized_total._value.get() == 8


# ---------------------------------------------------------------- bounded connections


@pytest.mark.parametrize("path", ["/v1/session", "/v1/node"])
async def test_a_silent_connection_gets_init_timeout(start_daemon, path):
    running = await start_daemon(init_timeout_ms=400)
    for first in (b"", frame(0x1, b'{"type":"nope"}')):  # silent, or only refused frames
        raw = await RawPeer.connect(running.ws_port)
        await raw.upgrade(path)
        await raw.send(first)
        with trio.fail_after(3):
            code, texts = await raw.close_code()
        assert code == 1008 and json.loads(texts[-1])["code"] == "INIT_TIMEOUT", texts
        await raw.aclose()


async def test_connection_limits_refuse_newcomers_with_503_and_touch_nobody(start_daemon, nursery):
    running = await start_daemon(max_connections=3, init_timeout_ms=60_000)
    await start_node(nursery, running, node_id="n1")  # one of the three
    async with session(running) as witness:  # two
        held = await RawPeer.connect(running.ws_port)  # three
        await held.upgrade()
        refused = await RawPeer.connect(running.ws_port)
        with trio.fail_after(5):
            assert await refused.http_status() == 503
        assert b"\r\nRetry-After: 5" in refused.last_head
        await refused.aclose()
        assert running.metrics.connections_refused_total.labels("max_connections")._value.get() == 1
        await speak(witness)  # the connected ones go on
        await witness.send(type="finalize")
        assert (await witness.recv_until("result"))[0]["status"] == "SUCCESS"
        await held.aclose()
        with trio.fail_after(5):
            while True:
                again = await RawPeer.connect(running.ws_port)
                await again.send(b"GET /v1/session HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n")
                status = await again.http_status()
                await again.aclose()
                if status == 101:  # a place is free again once the held one is gone
                    break
                await trio.sleep(0.05)


async def test_per_ip_limit(start_daemon):
    running = await start_daemon(max_connections_per_ip=2, init_timeout_ms=60_000)
    held = []
    for _ in range(2):
        raw = await RawPeer.connect(running.ws_port)
        await raw.upgrade()
        held.append(raw)
    third = await RawPeer.connect(running.ws_port)
    await third.send(b"GET /v1/session HTTP/1.1\r\n\r\n")
    with trio.fail_after(5):
        assert await third.http_status() == 503
    assert running.metrics.connections_refused_total.labels("max_connections_per_ip")._value.get() == 1
    for raw in [third, *held]:
        await raw.aclose()


# ---------------------------------------------------------------- secrets: sources and display


def test_secrets_from_files_and_systemd_credentials(tmp_path):
    (tmp_path / "node").write_text("from-a-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin_token").write_text("from-a-credential")
    (creds / "node_token").write_text("not-used: the file wins")
    sources: dict[str, str] = {}
    s = config.from_sources({"node_token_file": str(tmp_path / "node")}, {"CREDENTIALS_DIRECTORY": str(creds)}, sources=sources)
    assert s.node_tokens == ["from-a-file"] and s.admin_tokens == ["from-a-credential"]
    assert sources["admin_token"] == "systemd credential"
    with pytest.raises(ConfigError, match="node_token and node_token_file"):
        config.from_sources({"node_token": "x", "node_token_file": str(tmp_path / "node")}, {})
    with pytest.raises(ConfigError, match="admin_token_file"):
        config.from_sources({"admin_token_file": str(tmp_path / "missing")}, {})
    shown = config.render(config.from_sources({"redis_url": "redis://u:pw-canary@h:6379/0", "node_token": "tok-canary"}, {}), {})
    assert "pw-canary" not in shown and "tok-canary" not in shown and "redis://u:***@h:6379/0" in shown


def test_redacted_urls_and_token_matching():
    assert secrets.redacted("redis://:p4ss@host:6379/0") == "redis://:***@host:6379/0"
    assert secrets.redacted("rediss://user:p4ss@host/1") == "rediss://user:***@host/1"
    assert secrets.redacted("unix:///tmp/x.sock") == "unix:///tmp/x.sock"
    assert secrets.matches("b", ["a", "b"]) and not secrets.matches("c", ["a", "b"]) and not secrets.matches(None, ["a"])


# ---------------------------------------------------------------- canaries: no secret in the clear, anywhere


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
async def test_no_secret_reaches_a_log_status_metric_error_or_node(tmp_path, nursery):
    canary = {name: f"canary-{name}-7f3a9c" for name in ("redis", "node", "admin", "key")}
    port = _free_port()
    with EmbeddedValkey(port=port) as plain_url:
        import redis

        client = redis.Redis.from_url(plain_url)
        client.config_set("requirepass", canary["redis"])
        client.close()
        (tmp_path / "redis_url").write_text(f"redis://:{canary['redis']}@127.0.0.1:{port}/0\n")
        (tmp_path / "keys").write_text(canary["key"])
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "node_token").write_text(canary["node"])
        (creds / "admin_token").write_text(canary["admin"])
        ws_port, admin_port = _free_port(), _free_port()
        log = tmp_path / "daemon.log"
        env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--ws-port", str(ws_port), "--admin-port",
                                     str(admin_port), "--redis-url-file", str(tmp_path / "redis_url"), "--client-api-keys-file",
                                     str(tmp_path / "keys"), "--pause-ms", "200", "--log-level", "debug"],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            seen = await _drive(ws_port, admin_port, canary, nursery)
        finally:
            proc.terminate()
            proc.wait(30)
        texts = {"log": log.read_text(), **seen}
        assert '"listening"' in texts["log"]
        tokens = [t for t in texts.pop("resume_tokens").split()]
        for where, text in texts.items():
            for name, value in canary.items():
                assert value not in text, f"the {name} secret is in the {where}"
            for token in tokens:
                assert token not in text, f"a resume token is in the {where}"


async def _drive(ws_port: int, admin_port: int, canary: dict[str, str], nursery) -> dict[str, str]:
    """A session with a node job, a resume, a refused node and a refused resume; returns what
    each party saw (the resume tokens apart, to be looked for everywhere else)."""
    url = f"ws://127.0.0.1:{ws_port}"
    with trio.fail_after(30):
        while (await trio.to_thread.run_sync(_get, admin_port, "/readyz"))[0] != 200:
            await trio.sleep(0.1)
    errors, node_saw = [], []
    async with peer(url + "/v1/node") as node:
        await node.send(type="register", node_id="n1", lang_pairs=[["zh", "en"]], max_jobs=2, token=canary["node"])
        node_saw.append(await node.recv())
        async with peer(url + "/v1/node") as intruder:  # a refused node
            await intruder.send(type="register", node_id="n2", lang_pairs=[["zh", "en"]], max_jobs=2, token="wrong")
            errors.append(await intruder.recv())
        async with peer(url + "/v1/session") as s:
            await s.send(type="session_init", src_lang="zh", tgt_langs=["en"], api_key=canary["key"])
            ready = await s.recv()
            sid = ready["session_id"]
            await speak(s)
            await s.send(type="finalize")
            job, _ = await node.recv_until("job_assign")
            node_saw.append(job)
            await node.send(type="job_result", job_id=job["job_id"], attempt=job["attempt"], status="ok", source_text="s", text="t")
            await s.recv_until("result")
        async with peer(url + "/v1/session") as thief:  # a refused resume
            await thief.send(type="session_init", src_lang="zh", tgt_langs=["en"], api_key=canary["key"], session_id=sid,
                             resume_token="A" * 32)
            errors.append(await thief.recv())
        async with peer(url + "/v1/session") as s:  # the rightful resume
            await s.send(type="session_init", src_lang="zh", tgt_langs=["en"], api_key=canary["key"], session_id=sid,
                         resume_token=token_of(sid), resume_from=0)
            resumed = await s.recv()
            assert resumed["type"] == "session_ready" and resumed["resumed"], resumed
            await s.send(type="close_session")
            await s.recv_until("session_closed")
    assert [e["code"] for e in errors] == ["UNAUTHORIZED", "UNKNOWN_SESSION"], errors
    status = await trio.to_thread.run_sync(_get, admin_port, "/status", canary["admin"])
    metrics = await trio.to_thread.run_sync(_get, admin_port, "/metrics", canary["admin"])
    assert status[0] == 200 and metrics[0] == 200
    return {"status": status[1].decode(), "metrics": metrics[1].decode(), "errors": json.dumps(errors),
            "node messages": json.dumps(node_saw), "resume_tokens": f"{ready['resume_token']} {token_of(sid)}"}


async def test_the_reference_node_takes_its_token_from_a_file_not_the_command_line(start_daemon, tmp_path):
    """``scheduler node --token-file``: the token never shows in the process list; a file it
    cannot read exits 2 with the reason (and without the token)."""
    daemon = await start_daemon(node_token="n0de-s3cret")
    (tmp_path / "token").write_text("n0de-s3cret\n")
    cmd = [sys.executable, "-m", "scheduler", "node", "--url", daemon.ws_url, "--node-id", "nf", "--log-level", "warning"]
    missing = await trio.run_process([*cmd, "--token-file", str(tmp_path / "nope")], capture_stderr=True, check=False)
    assert missing.returncode == 2 and b"cannot read --token-file" in missing.stderr
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(lambda task_status: trio.run_process(
            [*cmd, "--token-file", str(tmp_path / "token")], stdin=subprocess.DEVNULL, check=False, task_status=task_status))
        with trio.fail_after(20):
            while "nf" not in daemon.nodes:
                await trio.sleep(0.1)
        assert "n0de-s3cret" not in " ".join(proc.args)
        proc.terminate()
