"""The WebSocket listener: our own accept loop, our own WebSocket (edge/wsconn.py).

``trio.serve_listeners`` accepts; each connection runs in the accepting task: the upgrade
request is read (:func:`~scheduler.edge.wsconn.read_request`) from a
:class:`~scheduler.edge.frames.FrameGuard` around the transport, then the handler (the
handshake policy and a gateway) runs. The whole connection sits inside a
:class:`~scheduler.ops.boundary.Boundary`: an exception while serving one connection (ours,
or a library's, such as wsproto's on a ``Host`` that is not IDNA) ends that connection
only (issue 29: trio-websocket's own server let one end the daemon).

Resource handling
    At most ``max_connections`` connections at once, and ``max_connections_per_ip`` from one
    peer address (0: no limit): past either, a new connection is answered HTTP 503 with
    ``Retry-After`` before anything is read, counted in
    ``scheduler_connections_refused_total{reason}``; nothing already connected is touched.
    Per connection: the guard (the transport), the codec's buffer (at most one frame being
    received, messages of at most ``max_message_size``: a larger one is refused at its
    header with 1009), the handler's tasks; no reader task and no message queue of its own.
    The upgrade request must arrive within ``handshake_timeout`` (TLS included) or the
    transport is closed. When the handler returns, the WebSocket is closed (our close frame
    and the peer's answer, at most :data:`CLOSE_TIMEOUT_S`) and the transport closed.
    A connection the codec failed (1002, 1007, 1009) is counted in
    ``scheduler_websocket_protocol_errors_total{listener,code}`` and logged
    (``websocket_protocol_error``, at debug: a hostile peer can make many).

Error handling
    See :mod:`scheduler.ops.boundary`: a failure is logged, counted, and the connection
    closed with 1011 (no close frame if one went out already); the listener goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from scheduler.edge.frames import SERVICE_UNAVAILABLE, FrameGuard
from scheduler.edge.wsconn import ServerRequest, ServerWebSocket, read_request
from scheduler.ops.boundary import Boundary, peer_of
from scheduler.ops.logs import event
from scheduler.protocol import CLOSE_INTERNAL

CLOSE_TIMEOUT_S = 2.0

log = logging.getLogger("scheduler.edge")


@attrs.define(eq=False)
class Connection:
    """One accepted connection as the handler sees it: its peer, the listener name for the
    logs and metrics (``websocket`` until the handler names the path), its guard."""

    peer: str
    guard: FrameGuard
    listener: str = "websocket"
    ws: ServerWebSocket | None = None

    async def accept(self, request: ServerRequest, subprotocol: str | None) -> ServerWebSocket:
        """Complete the handshake (the listener closes the WebSocket when the handler returns)."""
        self.ws = await request.accept(subprotocol=subprotocol)
        return self.ws


Handler = Callable[[ServerRequest, Connection], Awaitable[None]]


@attrs.define
class Limits:
    """How many connections the listener holds at once: in all, and per peer address (0: no
    limit). ``refused`` counts refusals by reason (a prometheus Counter)."""

    max_connections: int
    per_ip: int
    refused: object
    open: int = 0
    by_ip: dict[str, int] = attrs.field(factory=dict)
    full: bool = False  # the max_connections episode, for one log line when it starts and ends

    def admit(self, ip: str) -> str | None:
        """Take a place for a connection from ``ip``, or say why not."""
        if self.max_connections and self.open >= self.max_connections:
            if not self.full:
                self.full = True
                event(log, "connections_limit_reached", logging.WARNING, max_connections=self.max_connections)
            return "max_connections"
        if self.per_ip and self.by_ip.get(ip, 0) >= self.per_ip:
            return "max_connections_per_ip"
        self.open += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        left = self.by_ip[ip] - 1
        if left:
            self.by_ip[ip] = left
        else:
            del self.by_ip[ip]
        if self.full and self.open < self.max_connections:
            self.full = False
            event(log, "connections_limit_cleared", open=self.open)


class WebSocketListener:
    def __init__(self, handler: Handler, listeners: Sequence[trio.abc.Listener], *, boundary: Boundary, limits: Limits,
                 max_message_size: int, handshake_timeout: float, protocol_errors: object) -> None:
        self._handler = handler
        self.limits = limits
        self._listeners = list(listeners)
        self._boundary = boundary
        self._max_message_size = max_message_size
        self._handshake_timeout = handshake_timeout
        self._protocol_errors = protocol_errors  # a prometheus Counter by listener and close code

    @property
    def port(self) -> int:
        """The bound port (of the first socket; they all share it)."""
        listener = self._listeners[0]
        sock = getattr(listener, "transport_listener", listener).socket
        return sock.getsockname()[1]

    async def run(self, *, task_status: trio.TaskStatus[WebSocketListener] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled; ``started`` once every socket listens."""
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, self._listeners)
            task_status.started(self)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        peer = peer_of(stream)
        ip = peer.rpartition(":")[0]
        guard = FrameGuard(stream, peer)
        refused = self.limits.admit(ip)
        if refused is not None:
            self.limits.refused.labels(refused).inc()
            event(log, "connection_refused", logging.DEBUG, reason=refused, peer=peer)
            await guard.fail(SERVICE_UNAVAILABLE)
            return
        conn = Connection(peer=peer, guard=guard)
        try:
            await self._boundary.run(lambda: self._serve(conn), listener=lambda: conn.listener, peer=conn.peer,
                                     on_failure=lambda: guard.fail(CLOSE_INTERNAL, "internal error"))
        finally:
            self.limits.release(ip)
            await guard.aclose()

    async def _serve(self, conn: Connection) -> None:
        request = None
        with trio.move_on_after(self._handshake_timeout):  # TLS and the upgrade request
            request = await read_request(conn.guard, self._max_message_size)
        if request is None:
            return
        await self._handler(request, conn)
        if conn.ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await conn.ws.aclose()
            if conn.ws.failed is not None:
                code, what = conn.ws.failed
                self._protocol_errors.labels(conn.listener, str(code)).inc()
                event(log, "websocket_protocol_error", logging.DEBUG, listener=conn.listener, code=code, detail=what,
                      peer=conn.peer)
