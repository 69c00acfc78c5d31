"""sd_notify with a fake NOTIFY_SOCKET: READY once listening, WATCHDOG pings, STOPPING on SIGTERM."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler.ops.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent


def test_notifier_is_silent_without_systemd():
    n = Notifier({})
    assert not n.enabled and n.notify("READY=1") is False and n.watchdog_interval is None


def test_notifier_sends_datagrams_and_reads_watchdog_interval(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        assert n.watchdog_interval == 2.0
        assert n.notify("READY=1", "STATUS=ok")
        assert sock.recv(1024) == b"READY=1\nSTATUS=ok"


@pytest.mark.slow
def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        proc = subprocess.Popen([sys.executable, "-m", "scheduler", "serve", "--ws-port", "0", "--admin-port", "0"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            got = []
            deadline = time.monotonic() + 30
            while not any("READY=1" in m for m in got) and time.monotonic() < deadline:
                got.append(sock.recv(4096).decode())
            assert any(m.startswith("READY=1") and "STATUS=listening on ws://" in m for m in got), got
            pings = 0
            while pings < 2:  # WatchdogSec/2 = 0.2 s
                pings += sock.recv(4096) == b"WATCHDOG=1"
            proc.send_signal(signal.SIGTERM)
            while True:
                msg = sock.recv(4096).decode()
                if msg.startswith("STOPPING=1"):
                    break
            assert proc.wait(timeout=20) == 0
        finally:
            proc.kill()
            proc.wait()


def test_unit_file_is_type_notify_with_watchdog_and_hardening():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "scheduler.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0 and service["Restart"] == "on-failure"
    for option in ("DynamicUser", "NoNewPrivileges", "ProtectSystem"):
        assert option in service
    assert "scheduler serve" in service["ExecStart"]
    text = (ROOT / "deploy" / "scheduler.service").read_text()
    for secret in ("node_token", "admin_token", "client_api_keys", "redis_url"):  # as credentials, never inline
        assert f"LoadCredential={secret}:/etc/scheduler/credentials/{secret}" in text
    assert "token=" not in service["ExecStart"].lower() and "redis://" not in text


def test_the_node_unit_drains_on_sigterm_and_keeps_its_token_off_the_command_line():
    """deploy/scheduler-node.service (docs/nodes.md): SIGTERM with time for the node's drain,
    no restart when refused for good, the token as a systemd credential."""
    from scheduler.cli import build_parser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "scheduler-node.service")
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 60  # (the node's --drain-timeout)
    assert service["RestartPreventExitStatus"] == "2" and service["Restart"] == "on-failure"
    assert service["LoadCredential"] == "node_token:/etc/scheduler/credentials/node_token"
    command = service["ExecStart"].replace("\\\n", " ").split()
    assert command[:2] == ["/usr/local/bin/scheduler", "node"] and not any("token" in word for word in command)
    build_parser().parse_args(command[1:])  # every flag is one the node knows
