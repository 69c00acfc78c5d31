import os
import signal
import subprocess
import sys
import time

import redis

from scheduler.ops.embedded_redis import EmbeddedValkey


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_start_answers_and_stop_removes_everything():
    server = EmbeddedValkey()
    url = server.start()
    pid, data_dir = server.pid, server.data_dir
    client = redis.Redis.from_url(url)
    assert client.ping()
    assert client.info("server").get("server_name", "valkey") == "valkey"
    client.close()
    server.stop()
    assert not _alive(pid)
    assert not data_dir.exists()


def test_child_dies_with_a_killed_parent():
    """kill -9 of the process that started valkey-server must not leave an orphan."""
    code = (
        "from scheduler.ops.embedded_redis import EmbeddedValkey; import sys, time\n"
        "s = EmbeddedValkey(); s.start(); print(s.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)
