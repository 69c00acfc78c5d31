"""The node: connect, register, serve jobs, reconnect with jittered backoff over its URLs,
and on :meth:`Node.stop` (SIGTERM under :meth:`Node.serve`) drain and leave (docs/nodes.md)."""

from __future__ import annotations

import logging
import os
import random
import signal
import ssl
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from scheduler.node.job import Handler
from scheduler.node.link import Link, LinkConfig, NodeRefused, TryLater
from scheduler.node.metrics import NodeMetrics, Stats
from scheduler.ops import secrets
from scheduler.ops.admin import AdminServer
from scheduler.ops.logs import event
from scheduler.protocol import ProtocolError, Register

log = logging.getLogger("scheduler.node")

DEFAULT_URL = "ws://127.0.0.1:8765"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The largest message the node takes: a ``job_assign`` carries its utterance as base64, up to
``max_utterance_ms`` x ``sample_rate`` x 2 x 4/3 bytes (10.3 MB at 192 kHz and the daemon's
default 20 s; 2.6 MB at 48 kHz). trio-websocket's own default, 1 MiB, cut a node off at the
first long utterance of a 48 kHz session."""
CONNECT_TIMEOUT_S = 10.0  # (a URL that swallows packets is passed over for the next this soon)
TOKEN_ENV = "SCHEDULER_NODE_TOKEN"
BACKOFF_S = (0.2, 5.0)


def node_url(url: str) -> str:
    """``ws://host:port`` or ``.../v1/node``: the node endpoint either way."""
    url = url.rstrip("/")
    return url if url.endswith("/v1/node") else url + "/v1/node"


def read_token(token: str | None, token_file: str | os.PathLike | None) -> str | None:
    """The registration token: given, else the first in ``token_file``, else
    ``$SCHEDULER_NODE_TOKEN``, else the systemd credential ``node_token``
    (``$CREDENTIALS_DIRECTORY/node_token``, deploy/scheduler-node.service)."""
    if token:
        return token
    if token_file:
        return _first(Path(token_file).read_text())
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    return _first(secrets.credential("node_token", os.environ))


def _first(tokens: str | None) -> str | None:
    """The first of comma-separated tokens (the daemon accepts several during a rotation)."""
    return (secrets.tokens(tokens) or [None])[0]


class Node:
    """A worker node around one function (``handler``: :class:`~scheduler.node.Job` in,
    :class:`~scheduler.node.Result` or ``str`` out; async, or blocking in a thread).

    ``threads`` bounds the blocking function's threads (default ``max_jobs``; 1 for one GPU).
    ``load_score`` is called at each heartbeat for the engine's load, 0-1 (default: busy slots
    over ``max_jobs``). ``urls`` are tried in turn; the token comes from ``token``,
    ``token_file``, ``$SCHEDULER_NODE_TOKEN`` or the systemd credential ``node_token``.
    ``metrics_port``: serve ``/metrics``,
    ``/healthz`` and ``/readyz`` there (scheduler/node/metrics.py; 0 for any free port).
    """

    def __init__(self, handler: Handler, *, lang_pairs: Sequence[tuple[str, str]], max_jobs: int = 1,
                 urls: Sequence[str] = (DEFAULT_URL,), node_id: str | None = None, pools: Sequence[str] | None = None,
                 token: str | None = None, token_file: str | os.PathLike | None = None, threads: int | None = None,
                 load_score: Callable[[], float | None] | None = None, capabilities: dict | None = None,
                 drain_timeout_s: float = 60.0, reconnect: bool = True, ssl_context: ssl.SSLContext | None = None,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if not urls:
            raise ValueError("give at least one daemon URL")
        self.handler = handler
        self.urls = [node_url(u) for u in urls]
        self.register = Register(node_id=node_id or f"node-{uuid.uuid4().hex[:8]}", lang_pairs=[list(p) for p in lang_pairs],
                                 max_jobs=max_jobs, pools=list(pools) if pools else None, capabilities=capabilities,
                                 token=read_token(token, token_file))  # (validates: a bad pair or id fails here)
        self.node_id = self.register.node_id
        self.limiter = trio.CapacityLimiter(threads or max_jobs)
        self.load_score = load_score
        self.drain_timeout_s = drain_timeout_s
        self.reconnect = reconnect
        self.ssl_context = ssl_context
        self.max_message_bytes = max_message_bytes
        self.stats = Stats(metrics=NodeMetrics() if metrics_port is not None else None)
        self.metrics_address = (metrics_host, metrics_port)
        self.metrics_port: int | None = None  # the bound port, once listening (metrics_port 0: any free one)
        self._stopping = trio.Event()

    def stop(self) -> None:
        """Drain: tell the daemon, answer the jobs held, leave; :meth:`run` then returns."""
        self._stopping.set()
        if self.stats.metrics is not None:
            self.stats.metrics.draining.set(1)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stopped (or refused for good: :class:`NodeRefused`); ``task_status``
        fires at the first registration (and once the metrics listener is up, with ``metrics_port``)."""
        if self.stats.metrics is None:
            await self._serve_urls(task_status)
            return
        metrics = self.stats.metrics
        server = AdminServer(metrics, lambda: (True, "registered") if self.stats.connected else (False, "not registered"),
                             pages=False)
        async with trio.open_nursery() as nursery:
            self.metrics_port = await nursery.start(server.serve, *self.metrics_address)
            event(log, "node_metrics_listening", node_id=self.node_id,
                  url=f"http://{self.metrics_address[0]}:{self.metrics_port}/metrics")
            await self._serve_urls(task_status)
            nursery.cancel_scope.cancel()

    async def _serve_urls(self, task_status: trio.TaskStatus[None]) -> None:
        """Between connections: the next URL, after a jittered backoff that doubles while no
        registration succeeds (``retry_after_ms`` when given)."""
        backoff, turn = BACKOFF_S[0], 0
        while True:
            url = self.urls[turn % len(self.urls)]
            turn += 1
            wait = await self._connect(url, task_status)
            self.stats.disconnected()
            if self.stopping or not self.reconnect:
                return
            if wait is None:  # (it was registered: a new outage starts from the shortest wait)
                backoff, wait = BACKOFF_S[0], BACKOFF_S[0]
            else:
                wait, backoff = wait or backoff, min(backoff * 2, BACKOFF_S[1])
            with trio.move_on_after(wait * random.uniform(0.5, 1.5)):
                await self._stopping.wait()
            if self.stopping:
                return

    async def _connect(self, url: str, task_status: trio.TaskStatus[None]) -> float | None:
        """One connection; None when it had registered, else how long to wait (0: the backoff)."""
        config = LinkConfig(register=self.register, handler=self.handler, limiter=self.limiter, load_score=self.load_score,
                            drain_timeout_s=self.drain_timeout_s, stopping=self._stopping, stats=self.stats,
                            first=self.stats.registrations == 0)
        registered, refused, later = False, None, None
        try:
            async with open_websocket_url(url, ssl_context=self.ssl_context, max_message_size=self.max_message_bytes,
                                          connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=5,
                                          receive_buffer_size=64 * 1024) as ws:
                link = Link(ws, config)
                answer = await link.register()
                registered = True
                event(log, "node_registered", node_id=self.node_id, url=url, max_jobs=self.register.max_jobs)
                if self.stats.registrations == 1:
                    task_status.started()
                closed = await link.serve(answer)
                event(log, "node_disconnected", logging.INFO if self.stopping else logging.WARNING,
                      node_id=self.node_id, url=url, close=closed)
        except* NodeRefused as group:
            refused = _leaf(group)
        except* TryLater as group:
            later = _leaf(group)
        except* (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError, ProtocolError) as group:
            event(log, "node_disconnected", logging.WARNING, node_id=self.node_id, url=url, error=type(_leaf(group)).__name__)
        if refused is not None:
            raise refused
        if later is not None:
            event(log, "node_not_registered", logging.WARNING, node_id=self.node_id, url=url, code=str(later))
            return later.retry_after_s or 0.0
        return None if registered else 0.0

    async def serve(self) -> None:
        """:meth:`run` with signals: SIGTERM or Ctrl-C drains and leaves; a second one stops at once."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        if self.stopping:
                            event(log, "node_stopped_at_once", logging.WARNING, node_id=self.node_id)
                            nursery.cancel_scope.cancel()
                            return
                        event(log, "node_stop_requested", node_id=self.node_id, signal=signal.Signals(signum).name)
                        self.stop()

                nursery.start_soon(watch)
                await self.run()
                nursery.cancel_scope.cancel()
        event(log, "node_stopped", node_id=self.node_id, jobs_done=self.stats.jobs_done, jobs_failed=self.stats.jobs_failed,
              jobs_cancelled=self.stats.jobs_cancelled)

    def main(self) -> int:
        """Run until SIGTERM: the body of a node's ``if __name__ == "__main__"``. Exit code 2
        when the daemon refused the node for good."""
        refused = None
        try:
            trio.run(self.serve)
        except* NodeRefused as group:
            refused = _leaf(group)
        if refused is not None:
            event(log, "node_refused", logging.ERROR, node_id=self.node_id, reason=str(refused))
            return 2
        return 0


def _leaf(group: BaseException) -> BaseException:
    """The first exception of a (nested) exception group."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


__all__ = ["Node", "NodeRefused", "read_token", "node_url", "DEFAULT_URL", "TOKEN_ENV"]
