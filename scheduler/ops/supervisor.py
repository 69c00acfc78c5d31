"""``scheduler serve --workers N``: N daemon processes behind one port, one admin port for the box.

The supervisor (this module, one Trio run) starts the embedded Valkey once (when no
``redis_url`` is set) and N worker processes (``scheduler serve``, one instance each) that
share the WebSocket port with ``SO_REUSEPORT`` (``--reuse-port``): the kernel spreads new
connections over them. Each worker gets every setting of the supervisor through
``SCHEDULER_*`` variables, plus its own ``instance_id`` (``<instance_id>-w<i>``) and a private
admin port on 127.0.0.1.

- **One admin port for the box** (``admin_host:admin_port``): ``/healthz`` is 200 while every
  worker process runs; ``/readyz`` is 200 only when every worker says ready, or is only full
  (``--max-sessions``) while another one has room (503 ``full`` when all are); ``/status``
  lists every worker (pid, restarts, its own ``/status``) and the sessions held against the
  workers' ``--max-sessions`` together; ``/metrics`` exposes every worker's
  series with a ``worker`` label (read with prometheus_client's parser and exposed again
  through a collector: no text is merged by hand).
- **A worker that dies is started again** (after ``RESTART_DELAY_S``, logged
  ``worker_exited``); its clients resume on its siblings (docs/protocol.md, "Resume").
- **SIGHUP** (``systemctl reload``): the workers are replaced one at a time: a new process
  (instance ``<instance_id>-w<i>-g<generation>``, a new private admin port) starts and is
  ready, then the old one gets SIGTERM and drains; its clients resume on the others. Logged
  ``reload_started``, ``worker_replaced`` per worker, ``reload_done``.
- **SIGTERM / SIGINT**: every worker gets SIGTERM and drains (``drain_timeout_ms``); then the
  embedded Valkey stops. systemd gets ``READY=1`` once every worker is ready, ``STOPPING=1``
  on the signal, and the watchdog from the supervisor (workers do not talk to systemd).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable

import attrs
import trio
from prometheus_client import Counter
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.ops import secrets, tls
from scheduler.ops.admin import AdminServer, Lookup, bad_session_id, no_such_path
from scheduler.ops.config import Settings, env_name
from scheduler.ops.embedded_redis import EmbeddedValkey
from scheduler.ops.logs import event
from scheduler.ops.redis_policy import check_policy, embedded_args, read_policies
from scheduler.ops.secrets import redacted
from scheduler.ops.systemd import Notifier
from scheduler.protocol import ID_PATTERN

log = logging.getLogger("scheduler.supervisor")

RESTART_DELAY_S = 1.0
POLL_S = 0.5


def worker_count(workers: str) -> int:
    """``auto``: one per CPU core; else the number."""
    return (os.cpu_count() or 1) if workers == "auto" else int(workers)


@attrs.define(eq=False)
class Worker:
    index: int
    instance_id: str
    admin_port: int
    process: trio.Process | None = None
    generation: int = 0  # +1 per reload (the process that replaced the last one)
    base_id: str = ""  # its first instance_id (a reload's successor is <base_id>-g<generation>)
    restarts: int = 0
    ready: bool = False
    full: bool = False  # not ready only because it holds --max-sessions (its /readyz says "full")
    status: dict | None = None
    metrics_text: str = ""
    tls: bool = False  # its admin listener speaks https (--tls-cert): polled over TLS, on loopback


class _WorkerMetrics:
    """What the admin server renders for ``/metrics``: every worker's last scrape, labelled."""

    def __init__(self, workers: list[Worker]) -> None:
        self._workers = workers
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        self.connections_failed_total = Counter(
            "scheduler_supervisor_connections_failed_total", "Connections to the supervisor's admin port ended by an exception "
            "inside their error boundary (ops/boundary.py), by listener and reason", ["listener", "reason"], registry=self._registry)
        self.admin_unauthorized_total = Counter(
            "scheduler_supervisor_admin_unauthorized_total", "Requests to the supervisor's admin port refused 401 for a "
            "missing or wrong admin token", registry=self._registry)

    def collect(self):
        restarts = CounterMetricFamily("scheduler_supervisor_worker_restarts", "Times the supervisor started a worker "
                                       "again after it exited on its own (not a reload), by worker", labels=["worker"])
        ready = GaugeMetricFamily("scheduler_supervisor_worker_ready", "1 while the worker answers its /readyz 200 "
                                  "(or is only full), by worker", labels=["worker"])
        for worker in self._workers:
            restarts.add_metric([str(worker.index)], worker.restarts)
            ready.add_metric([str(worker.index)], 1 if worker.ready or worker.full else 0)
        yield restarts
        yield ready
        for worker in self._workers:
            for family in text_string_to_metric_families(worker.metrics_text):
                out = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "worker": str(worker.index)}, sample.value,
                                   sample.timestamp, sample.exemplar)
                yield out

    def render(self) -> bytes:
        return generate_latest(self._registry)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker_env(settings: Settings, worker: Worker, redis_url: str, ws_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    values = attrs.asdict(settings) | {"redis_url": redis_url, "ws_port": ws_port, "reuse_port": True, "workers": "1",
                                       "instance_id": worker.instance_id, "admin_host": "127.0.0.1",
                                       "admin_port": worker.admin_port}
    for name, value in values.items():
        if value is None:
            env.pop(env_name(name), None)
        else:
            env[env_name(name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    env.pop(env_name("config"), None)  # everything is in the variables above
    env["SCHEDULER_SUPERVISOR_PID"] = str(os.getpid())  # the worker exits when its supervisor is gone (server.py)
    for name in secrets.SECRETS:  # resolved above: the worker takes the value, not the file again
        env.pop(env_name(f"{name}_file"), None)
    return env


def _get(port: int, path: str, tls: bool = False, token: str | None = None) -> tuple[int, bytes]:
    """GET a worker's admin path (with the admin token, when one is set: the workers require
    it as the supervisor does). Over TLS the certificate is not checked: the worker is our
    own child on loopback, and the certificate names the public host, not 127.0.0.1."""
    context = ssl._create_unverified_context() if tls else None
    request = urllib.request.Request(f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
    except (OSError, http.client.HTTPException):  # refused, timed out, or cut off mid-answer (the worker died:
        return 0, b""  # http.client.IncompleteRead is no OSError, and once ended the supervisor)


async def _ask_a_worker(workers: list[Worker], token: str | None, path: str) -> tuple[int, dict]:
    """A Redis-backed answer (``/sessions/<id>``, ``/cluster``) from the first worker that
    gives one, ready ones first: any worker answers the same from Redis. 503 when none can."""
    for worker in sorted(workers, key=lambda w: not w.ready):
        code, body = await trio.to_thread.run_sync(_get, worker.admin_port, path, worker.tls, token)
        if code in (200, 400, 404):
            return code, json.loads(body)
    return 503, {"error": "UNAVAILABLE", "message": "no worker could answer"}


def _lookups(workers: list[Worker], token: str | None) -> dict[str, Lookup]:
    """The location and cluster APIs on the supervisor's port, asked of a worker (the input
    checked here first, as the worker would: only a valid id travels on)."""

    async def session(rest: str) -> tuple[int, dict]:
        if not ID_PATTERN.fullmatch(rest):
            return bad_session_id()
        return await _ask_a_worker(workers, token, "/sessions/" + rest)

    async def cluster(rest: str) -> tuple[int, dict]:
        if rest not in ("", "/"):
            return no_such_path()
        return await _ask_a_worker(workers, token, "/cluster")

    return {"/sessions/": session, "/cluster": cluster}


async def _poll(worker: Worker, token: str | None) -> None:
    """Keep the worker's readiness, status and metrics fresh for the box's admin port."""
    while True:
        process = worker.process
        code, body = await trio.to_thread.run_sync(_get, worker.admin_port, "/readyz", worker.tls)
        # a reply that left before the worker exited must not mark it ready again afterwards
        running = worker.process is process and process is not None and process.returncode is None
        worker.ready = code == 200 and running
        worker.full = code == 503 and body.strip() == b"full" and running
        code, body = await trio.to_thread.run_sync(_get, worker.admin_port, "/status", worker.tls, token)
        worker.status = json.loads(body) if code == 200 else None
        code, body = await trio.to_thread.run_sync(_get, worker.admin_port, "/metrics", worker.tls, token)
        worker.metrics_text = body.decode() if code == 200 else ""
        await trio.sleep(POLL_S)


async def _run_worker(worker: Worker, env_for: Callable[[Worker], dict[str, str]], stopping: trio.Event) -> None:
    """Start the worker, and start it again whenever it exits, until the supervisor stops or a
    reload replaced it (its successor runs in a task of its own: :func:`_replace`)."""
    while not stopping.is_set():
        process = await trio.lowlevel.open_process([sys.executable, "-m", "scheduler", "serve"], env=env_for(worker),
                                                   stdin=subprocess.DEVNULL)
        worker.process = process
        event(log, "worker_started", worker=worker.index, pid=process.pid, instance_id=worker.instance_id)
        code = await process.wait()
        if worker.process is not process:  # replaced by a reload
            return
        worker.ready = worker.full = False
        if stopping.is_set():
            event(log, "worker_stopped", worker=worker.index, exit_code=code)
            return
        worker.restarts += 1
        event(log, "worker_exited", logging.WARNING, worker=worker.index, exit_code=code, restarts=worker.restarts)
        # a new private admin port: the old one may be taken by now (another process bound it
        # while this one was starting, and the worker exited on EADDRINUSE: on that port it
        # would exit again at every restart, and the supervisor never be ready)
        worker.admin_port = _free_port()
        await trio.sleep(RESTART_DELAY_S)


async def _replace(worker: Worker, start: Callable[[], None], drain_s: float) -> bool:
    """One step of a reload: start the worker's successor (new instance id and admin port),
    and once it is ready give the old process SIGTERM and wait while it drains. False (and
    the old process left running) when the successor is not ready within 60 s."""
    old, old_id, old_port = worker.process, worker.instance_id, worker.admin_port
    worker.generation += 1
    worker.base_id = worker.base_id or old_id
    worker.instance_id = f"{worker.base_id}-g{worker.generation}"
    worker.admin_port, worker.ready, worker.full = _free_port(), False, False
    start()
    with trio.move_on_after(60):
        while not (worker.ready and worker.process is not old):
            await trio.sleep(0.1)
    if not worker.ready:
        event(log, "worker_replace_failed", logging.ERROR, worker=worker.index, instance_id=worker.instance_id)
        return False
    if old is not None and old.returncode is None:
        old.send_signal(signal.SIGTERM)
        with trio.move_on_after(drain_s + 10):
            await old.wait()
    event(log, "worker_replaced", worker=worker.index, old=old_id, new=worker.instance_id, old_port=old_port)
    return True


async def _reload(workers: list[Worker], start: Callable[[Worker], None], drain_s: float, busy: list[bool]) -> None:
    """SIGHUP: replace the workers one at a time (module docstring); one reload at a time."""
    if busy[0]:
        event(log, "reload_ignored", reason="a reload is under way")
        return
    busy[0] = True
    try:
        event(log, "reload_started", workers=len(workers))
        replaced = 0
        for worker in workers:
            if not await _replace(worker, lambda w=worker: start(w), drain_s):
                break
            replaced += 1
        event(log, "reload_done", replaced=replaced, workers=len(workers))
    finally:
        busy[0] = False


async def supervise(settings: Settings, preflight: Callable[[str], None] | None = None) -> None:
    """Run ``worker_count(settings.workers)`` workers until SIGTERM/SIGINT; see the module
    docstring. ``preflight(redis_url)`` may raise :class:`UnsafeRedis` too (the key layout
    check: store/layout.py, handed in by the CLI, as this layer does not know the keys)."""
    n = worker_count(settings.workers)
    if settings.redis_url:  # before any worker starts: N workers exiting 2 in turn would be restarted forever
        check_policy(await trio.to_thread.run_sync(read_policies, settings.redis_url), settings.redis_url,
                     settings.allow_evicting_redis)
        if preflight is not None:
            await trio.to_thread.run_sync(preflight, settings.redis_url)
    embedded = None if settings.redis_url else EmbeddedValkey(settings.data_dir, extra_args=embedded_args(settings.embedded_maxmemory_mb))
    redis_url = settings.redis_url or embedded.start()
    try:
        ws_port = settings.ws_port or _free_port(settings.ws_host)
        workers = [Worker(i, f"{settings.instance_id}-w{i}", _free_port(), tls=settings.tls_cert is not None) for i in range(n)]
        await _serve(settings, workers, redis_url, ws_port)
    finally:
        if embedded is not None:
            embedded.stop()
    event(log, "stopped", workers=n)


async def _serve(settings: Settings, workers: list[Worker], redis_url: str, ws_port: int) -> None:
    stopping = trio.Event()
    notifier = Notifier()
    context = tls.server_context(settings.tls_cert, settings.tls_key)
    admin = AdminServer(_WorkerMetrics(workers), lambda: _readiness(workers, stopping), lambda: _status(workers),
                        health=lambda: _health(workers), cors_origins=settings.admin_cors_origins, ssl_context=context,
                        tokens=settings.admin_tokens, lookups=_lookups(workers, next(iter(settings.admin_tokens), None)))
    async with trio.open_nursery() as nursery:
        admin_port = await nursery.start(admin.serve, settings.admin_host, settings.admin_port)
        nursery.start_soon(notifier.watchdog)
        async with trio.open_nursery() as running:
            def start(worker: Worker) -> None:
                running.start_soon(_run_worker, worker, lambda w: _worker_env(settings, w, redis_url, ws_port), stopping)

            for worker in workers:
                start(worker)
                running.start_soon(_poll, worker, next(iter(settings.admin_tokens), None))
            reloading = [False]
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                while not all(w.ready for w in workers):
                    await trio.sleep(0.1)
                ws, admin_url = ("wss", "https") if context else ("ws", "http")
                event(log, "listening", ws=f"{ws}://{settings.ws_host}:{ws_port}", admin=f"{admin_url}://{settings.admin_host}:{admin_port}",
                      workers=len(workers), redis=redacted(redis_url) if settings.redis_url else "embedded")
                notifier.notify("READY=1", f"STATUS={len(workers)} workers on {ws}://{settings.ws_host}:{ws_port}")
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        break
                    running.start_soon(_reload, workers, start, settings.drain_timeout_ms / 1000, reloading)
            stopping.set()
            notifier.notify("STOPPING=1")
            event(log, "draining", workers=len(workers))
            for worker in workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(settings.drain_timeout_ms / 1000 + 10):
                for worker in workers:
                    if worker.process is not None:
                        await worker.process.wait()
            running.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def _health(workers: list[Worker]) -> tuple[bool, str]:
    down = [str(w.index) for w in workers if w.process is None or w.process.returncode is not None]
    return (not down), ("ok" if not down else "workers not running: " + ",".join(down))


def _readiness(workers: list[Worker], stopping: trio.Event) -> tuple[bool, str]:
    if stopping.is_set():
        return False, "draining"
    waiting = [str(w.index) for w in workers if not w.ready and not w.full]
    if waiting:
        return False, "workers not ready: " + ",".join(waiting)
    if not any(w.ready for w in workers):  # every worker holds its --max-sessions
        return False, "full"
    return True, "ready"


async def _status(workers: list[Worker]) -> dict:
    """Every worker, and the box's sessions against its workers' --max-sessions together."""
    admissions = [(w.status or {}).get("admission") or {} for w in workers]
    return {"workers": [{"worker": w.index, "instance_id": w.instance_id, "pid": w.process.pid if w.process else None,
                         "restarts": w.restarts, "ready": w.ready, "status": w.status} for w in workers],
            "admission": {"held": sum(a.get("held", 0) for a in admissions),
                          "max_sessions": sum(a.get("max_sessions", 0) for a in admissions),
                          "full": all(w.full for w in workers)}}
