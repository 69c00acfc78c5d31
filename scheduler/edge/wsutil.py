"""What the client and node gateways share (one WebSocket per peer): sending, closing,
refusing a frame, and the one frame-read loop (:meth:`Gateway.read_frames`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from trio_websocket import ConnectionClosed

from scheduler.edge.ratelimit import TokenBucket
from scheduler.ops.logs import event
from scheduler.protocol import BAD_MESSAGE, CLOSE_POLICY, INIT_TIMEOUT, Error, ProtocolError, decode, encode

if TYPE_CHECKING:
    from scheduler.cluster.ownership import Ownership
    from scheduler.cluster.routing import Router
    from scheduler.edge.wsconn import ServerWebSocket
    from scheduler.ops.config import Settings
    from scheduler.ops.metrics import Metrics
    from scheduler.placement.dispatcher import Dispatcher
    from scheduler.session.registry import SessionRegistry
    from scheduler.store.redis_adapter import RedisAdapter
    from scheduler.store.scheduling import SchedulingClient

log = logging.getLogger("scheduler.ws")

T = TypeVar("T")

Handler = Callable[[Any], Awaitable[str | None]]
"""Handles one parsed frame; returns None to read on, or the reason to stop reading."""

CLOSE_TIMEOUT = 2.0


def peer(ws: ServerWebSocket) -> str:
    """The peer's ``address:port``, as the connection's guard names it."""
    return str(ws.remote)


async def send(ws: ServerWebSocket, msg: Any) -> bool:
    """Send one message; False if the socket is already closed."""
    try:
        await ws.send_message(encode(msg))
        return True
    except ConnectionClosed:
        return False


async def close(ws: ServerWebSocket, code: int, reason: str | None = None) -> None:
    """Close with ``code``, bounded in time and safe under cancellation."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(code, (reason or "")[:120] or None)


async def send_error(ws: ServerWebSocket, err: ProtocolError) -> None:
    """Send an ``error``; when fatal, close with the error's close code afterwards."""
    await send(ws, Error(code=err.code, message=err.message, fatal=err.fatal, retry_after_ms=err.retry_after_ms))
    if err.fatal:
        await close(ws, err.close_code, err.code)


async def pump(ws: ServerWebSocket, outbox: trio.MemoryReceiveChannel, peer: str) -> None:
    """Writer task: send everything from ``outbox`` until it is closed (or the socket is)."""
    async for msg in outbox:
        if not await send(ws, msg):
            event(log, "send_on_closed_socket", logging.DEBUG, peer=peer, type=msg.TYPE)
            return


class Gateway:
    """What the client and node gateways share: their dependencies and how they refuse a frame."""

    side = "peer"  # "client" or "node": metrics label and log event prefix
    parse: Callable[[str], Any]  # protocol.parse_client or parse_node: a text frame -> a typed message

    def __init__(
        self,
        *,
        settings: Settings,
        redis: RedisAdapter,
        scheduling: SchedulingClient,
        dispatcher: Dispatcher,
        router: Router,
        sessions: SessionRegistry,
        metrics: Metrics,
        ownership: Ownership,
    ) -> None:
        self.settings = settings
        self._redis = redis
        self._scheduling = scheduling
        self._dispatcher = dispatcher
        self._router = router
        self._sessions = sessions
        self._metrics = metrics
        self._ownership = ownership

    def rate_limit(self) -> TokenBucket:
        """A fresh per-connection bucket: ``max_messages_per_s``, bursts of as many."""
        return TokenBucket(self.settings.max_messages_per_s)

    async def refuse(self, ws: ServerWebSocket, err: ProtocolError, **context: Any) -> None:
        """Count, log and send ``err`` (closing the socket when it is fatal)."""
        self._metrics.bad_messages_total.labels(self.side, err.code).inc()
        event(log, f"{self.side}_error", code=err.code, fatal=err.fatal, message=err.message, **context)
        await send_error(ws, err)

    def decode(self, message: str | bytes) -> Any:
        """The one decode path (protocol.decode): size, then audio bytes or a typed message."""
        return decode(message, limit=self.settings.max_frame_bytes, parse=self.parse)

    async def first_message(self, ws: ServerWebSocket, peer: str,
                            accept: Callable[[Any], Awaitable[T]]) -> T | None:
        """Read frames until ``accept`` takes one (``session_init``, ``register``).

        Each frame is decoded (:meth:`decode`: audio bytes or a typed message); ``accept``
        checks it, raising :class:`ProtocolError` to refuse it: a non-fatal refusal leaves
        the socket open for a corrected frame, a fatal one closes it. A connection that has
        not been accepted ``init_timeout_ms`` after its handshake gets ``INIT_TIMEOUT``
        (fatal, 1008). Returns None when the connection ended instead.
        """
        timeout_ms = self.settings.init_timeout_ms
        with trio.move_on_after(timeout_ms / 1000):
            return await self._first_message(ws, peer, accept)
        first = "session_init" if self.side == "client" else "register"
        await self.refuse(ws, ProtocolError(INIT_TIMEOUT, f"no valid {first} within {timeout_ms} ms", fatal=True,
                                            close_code=CLOSE_POLICY), peer=peer)
        return None

    async def _first_message(self, ws: ServerWebSocket, peer: str, accept: Callable[[Any], Awaitable[T]]) -> T | None:
        bucket = self.rate_limit()
        while True:
            try:
                await bucket.take()
                return await accept(self.decode(await ws.get_message()))
            except ProtocolError as err:
                await self.refuse(ws, err, peer=peer)
                if err.fatal:
                    return None
            except ConnectionClosed:
                return None

    async def read_frames(self, ws: ServerWebSocket, handlers: Mapping[type, Handler], *,
                          on_bytes: Callable[[bytes], Awaitable[str | None]], on_frame: Callable[[], None] | None = None,
                          **context: Any) -> str:
        """The read loop of a connection after its first message (trio-websocket's
        ``_reader_task`` is the model): take a rate token, read a frame, decode it
        (:meth:`decode`), then hand audio bytes to ``on_bytes`` and a typed message to the handler for its
        type (a type with no handler is refused ``BAD_MESSAGE``). A handler returns None to
        read on, or the reason to stop. A :class:`ProtocolError` from parsing or a handler is
        counted, logged with ``context`` and answered; a fatal one ends the loop with its
        code. Returns why the loop ended: ``"disconnected"`` when the peer went away."""
        bucket = self.rate_limit()
        try:
            while True:
                await bucket.take()
                message = await ws.get_message()
                if on_frame is not None:
                    on_frame()
                try:
                    msg = self.decode(message)
                    if isinstance(msg, bytes):
                        stop = await on_bytes(msg)
                    else:
                        handler = handlers.get(type(msg))
                        if handler is None:
                            raise ProtocolError(BAD_MESSAGE, f"{msg.TYPE} is not expected now")
                        stop = await handler(msg)
                    if stop is not None:
                        return stop
                except ProtocolError as err:
                    await self.refuse(ws, err, **context)
                    if err.fatal:
                        return err.code
        except (ConnectionClosed, trio.BrokenResourceError):
            return "disconnected"
