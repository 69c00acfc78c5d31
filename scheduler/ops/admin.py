"""Admin HTTP listener (HTTP/1.1 via h11, one request per connection).

``/metrics`` Prometheus text; ``/healthz`` 200 while the process runs; ``/readyz`` 200 only
while the last Redis health check succeeded and the daemon accepts sessions, else 503 with
the reason in the body; ``/`` a small live status page (static HTML + JS polling
``/status`` every second, no build step); ``/status`` a JSON snapshot (see :meth:`AdminServer`'s ``status``
callable: sessions, nodes with load, jobs, Redis latency); ``/app`` the web client (a mic
page, docs/web-apps.md) and ``/app/scheduler-client.js`` the module it is built on.

Admin token (``--admin-token``, several comma-separated for rotation): when set, every path
but ``/healthz`` and ``/readyz`` (and a CORS preflight, which carries no credentials) needs
``Authorization: Bearer TOKEN``; otherwise 401 with ``WWW-Authenticate: Bearer``, counted in
``scheduler_admin_unauthorized_total``. Prometheus sends it with
``authorization: {credentials_file: ...}`` in its scrape config.

CORS: ``/status``, ``/healthz`` and ``/readyz`` answer a request whose ``Origin`` is in
``cors_origins`` with ``Access-Control-Allow-Origin`` (and ``OPTIONS`` preflights with
204), so a dashboard on another site can read them; ``/metrics`` and the pages do not.
TLS: with ``ssl_context`` the listener speaks https.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import trio

from scheduler.ops import secrets
from scheduler.ops.boundary import Boundary, peer_of
from scheduler.ops.metrics import Metrics
from scheduler.ops.origins import OriginPolicy, bearer_header, header
from scheduler.ops.tls import wrap

log = logging.getLogger("scheduler.admin")

Lookup = Callable[[str], Awaitable[tuple[int, dict[str, Any]]]]


def bad_session_id() -> tuple[int, dict[str, Any]]:
    """The answer of ``/sessions/<id>`` to an id that cannot be one (the daemon's and a
    ``--workers`` supervisor's alike: the supervisor checks before asking a worker)."""
    return 400, {"error": "BAD_SESSION_ID", "message": "not a session id"}


def no_such_path() -> tuple[int, dict[str, Any]]:
    """The answer to a path below a lookup that names nothing (``/cluster/x``)."""
    return 404, {"error": "NOT_FOUND", "message": "no such path"}

MAX_REQUEST_BYTES = 16 * 1024
STATIC = Path(__file__).resolve().parent / "static"
STATUS_PAGE = STATIC / "status.html"  # "/": a live page reading /status
PAGES = {"/": ("status.html", "text/html; charset=utf-8"), "/index.html": ("status.html", "text/html; charset=utf-8"),
         "/app": ("app.html", "text/html; charset=utf-8"), "/app/": ("app.html", "text/html; charset=utf-8"),
         "/app/scheduler-client.js": ("scheduler-client.js", "text/javascript; charset=utf-8"),
         "/app/capture-worklet.js": ("capture-worklet.js", "text/javascript; charset=utf-8")}
CORS_PATHS = ("/status", "/healthz", "/readyz")
OPEN_PATHS = ("/healthz", "/readyz")  # never behind the admin token: load balancers and probes
REQUEST_TIMEOUT = 5.0


class AdminServer:
    def __init__(self, metrics: Metrics, readiness: Callable[[], tuple[bool, str]],
                 status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                 health: Callable[[], tuple[bool, str]] = lambda: (True, "ok"), *, cors_origins: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, boundary: Boundary | None = None,
                 tokens: list[str] | None = None, lookups: dict[str, Lookup] | None = None, pages: bool = True) -> None:
        """``metrics`` is anything with ``render() -> bytes``; ``health`` answers ``/healthz``
        (default: 200 while the process runs). Each connection runs inside ``boundary``
        (ops/boundary.py; a fresh one on ``metrics`` by default): whatever one request
        raises ends that connection, never the listener. ``lookups`` answers paths under a
        prefix (``/sessions/``: the location API) with ``(status, JSON object)`` for the rest
        of the path; the lookup checks that rest itself. ``pages``: serve the status page and
        the web app (a node's metrics listener does not)."""
        self._metrics = metrics
        self._readiness = readiness
        self._status = status
        self._health = health
        self._cors = OriginPolicy(cors_origins)
        self._ssl = ssl_context
        self._boundary = boundary or Boundary(metrics.connections_failed_total)
        self._tokens = tokens or []
        self._lookups = lookups or {}
        self._pages = pages

    async def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if self._pages and path in PAGES:
            name, ctype = PAGES[path]
            return 200, ctype, (STATIC / name).read_bytes()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics.render()
        if path == "/healthz":
            healthy, why = self._health()
            return (200 if healthy else 503), "text/plain", (why + "\n").encode()
        if path == "/readyz":
            ready, why = self._readiness()
            return (200 if ready else 503), "text/plain", (why + "\n").encode()
        if path == "/status" and self._status is not None:
            body = json.dumps(await self._status(), separators=(",", ":"), default=str).encode()
            return 200, "application/json", body
        for prefix, lookup in self._lookups.items():
            if path.startswith(prefix):
                status, answer = await lookup(path[len(prefix):])
                return status, "application/json", json.dumps(answer, separators=(",", ":"), default=str).encode()
        return 404, "text/plain", b"not found\n"

    async def _connection(self, stream: trio.abc.Stream) -> None:
        async def close() -> None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

        await self._boundary.run(lambda: self.handle(stream), listener=lambda: "admin", peer=peer_of(stream),
                                 on_failure=close)

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await stream.receive_some(4096)
                        conn.receive_data(data)
                        if not data:
                            return
                        continue
                    if isinstance(ev, h11.Request):
                        method, path = ev.method.decode(), ev.target.decode("latin-1")
                        cors = self._cors_headers(path, ev.headers)
                        extra: list[tuple[str, str]] = []
                        if method == "OPTIONS" and cors:  # a CORS preflight
                            status, ctype, body = 204, "text/plain", b""
                            cors += [("access-control-allow-methods", "GET, HEAD"), ("access-control-max-age", "600")]
                        elif not self._authorized(path, ev.headers):
                            status, ctype, body = 401, "text/plain", b"admin token required (Authorization: Bearer)\n"
                            extra = [("www-authenticate", 'Bearer realm="scheduler admin"')]
                            self._metrics.admin_unauthorized_total.inc()
                        else:
                            status, ctype, body = await self.route(method, path)
                        headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close"), *cors,
                                   *extra]
                        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                        if ev.method != b"HEAD":
                            await stream.send_all(conn.send(h11.Data(data=body)))
                        await stream.send_all(conn.send(h11.EndOfMessage()))
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    def _authorized(self, path: str, headers: list[tuple[bytes, bytes]]) -> bool:
        """No token configured, an open path, or a right ``Authorization: Bearer`` (constant time)."""
        if not self._tokens or path.split("?", 1)[0] in OPEN_PATHS:
            return True
        presented = bearer_header(headers)
        return presented is not None and secrets.matches(presented, self._tokens)

    def _cors_headers(self, path: str, headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
        """CORS response headers for a cross-site read of the admin JSON, if its origin is allowed."""
        if path.split("?", 1)[0] not in CORS_PATHS:
            return []
        origin = header(headers, b"origin")
        if origin is None or not self._cors.allows(origin):
            return []
        return [("access-control-allow-origin", "*" if self._cors.any else origin), ("vary", "origin")]

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            await trio.serve_listeners(self._connection, wrap(listeners, self._ssl), handler_nursery=nursery)
