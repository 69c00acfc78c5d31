"""Two ``scheduler serve`` processes on one port (``--reuse-port``): the kernel spreads new
connections over both; when one is killed, new connections still get in (on the other)."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import trio

from .helpers import peer
from .test_e2e import Daemon, log_events

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def open_sessions(url: str, n: int) -> None:
    for _ in range(n):
        async with peer(url + "/v1/session") as client:
            await client.send(type="session_init", src_lang="zh", tgt_langs=["en"])
            ready = await client.recv()
            # no node has registered a pool for zh->en: a clear refusal, from whichever process took it
            assert ready["type"] == "error" and ready["code"] == "UNSUPPORTED_LANG_PAIR", ready


async def test_two_processes_share_one_port(tmp_path, valkey_url):
    port = free_port()
    flags = ("--redis-url", valkey_url, "--ws-port", str(port), "--reuse-port")
    daemons = []
    try:
        for name in "ab":
            (tmp_path / name).mkdir()
            daemons.append(Daemon(tmp_path / name, *flags, "--instance-id", name))
        url = f"ws://127.0.0.1:{port}"
        await open_sessions(url, 40)
        served = [sum(1 for line in d.log_path.read_text().splitlines() if "client_error" in line) for d in daemons]
        assert sum(served) == 40 and min(served) > 0, served  # both took connections
        os.kill(daemons[0].proc.pid, signal.SIGKILL)
        daemons[0].proc.wait()
        with trio.fail_after(10):
            await open_sessions(url, 10)  # all on b now
        assert "listening" in log_events(daemons[1].log_path)
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            d.log.close()
