"""The per-connection error boundary: whatever one connection raises ends that connection only.

Every listener (the WebSocket listener's ``/v1/session`` and ``/v1/node``, the admin HTTP
listener) runs each accepted connection through :meth:`Boundary.run`.

Error handling
    An ``Exception`` from the connection's work, ours or a library's (wsproto's
    ``LocalProtocolError`` raised inside trio-websocket's reader task, an ``idna`` error on
    a hostile ``Host`` header, a TLS error), is caught here, never in the listener: the
    connection is failed (``on_failure``, e.g. close code 1011), one ``connection_failed``
    line is logged at warning with the listener, the peer and a bounded reason (the
    traceback at debug level), and ``scheduler_connections_failed_total{listener,reason}``
    is counted. Cancellation and ``BaseException`` (KeyboardInterrupt, SystemExit) pass:
    they belong to the daemon, not to one peer.

Resource handling
    The boundary owns nothing itself; ``on_failure`` releases the transport. Labels are a
    fixed set (:data:`REASONS`; the listener names are the caller's constants), so no peer
    value ever becomes a metric label or reaches the log unescaped.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import h11
import trio
import wsproto.utilities

from scheduler.ops.logs import event

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger("scheduler.edge")

REASONS = ("websocket_library", "http_library", "tls", "transport", "bad_encoding", "internal")
"""What ``reason`` says in the log line and the metric label: which layer gave up."""


def classify(exc: BaseException) -> str:
    """The bounded reason for one failure (the first leaf of a group decides)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, wsproto.utilities.ProtocolError):
        return "websocket_library"
    if isinstance(exc, h11.ProtocolError):
        return "http_library"
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return "tls"
    if isinstance(exc, trio.BrokenResourceError | trio.BusyResourceError | OSError):
        return "transport"
    if isinstance(exc, UnicodeError):
        return "bad_encoding"
    return "internal"


def leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def peer_of(stream: trio.abc.Stream) -> str:
    """``address:port`` of a socket stream, or of the socket under a TLS stream."""
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    try:
        address = sock.getpeername() if sock is not None else None
    except OSError:
        address = None
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "unknown"


class Boundary:
    """Runs one connection's work; a failure in it is contained, logged once and counted."""

    def __init__(self, failures: Counter) -> None:
        """``failures``: a counter labelled ``listener``, ``reason`` (the daemon's
        ``scheduler_connections_failed_total``; the supervisor's admin port has its own)."""
        self._failures = failures

    async def run(self, work: Callable[[], Awaitable[None]], *, listener: Callable[[], str], peer: str,
                  on_failure: Callable[[], Awaitable[None]]) -> None:
        """Await ``work()``. If it raises an ``Exception`` (or a group of them), count and log
        it under ``listener()`` (asked then: routing may have named the path meanwhile) and
        await ``on_failure()``; never raise it."""
        failure: BaseException | None = None
        try:
            await work()
        except* Exception as group:
            failure = group
        if failure is None:
            return
        reason, exc = classify(failure), leaf(failure)
        name = listener()
        self._failures.labels(name, reason).inc()
        event(log, "connection_failed", logging.WARNING, listener=name, reason=reason, peer=peer,
              error=type(exc).__name__, detail=ascii(str(exc))[:160])
        log.debug("connection_failed traceback (listener=%s peer=%s)", name, peer, exc_info=exc)
        await on_failure()
