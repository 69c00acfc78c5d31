"""The server side of one WebSocket: the upgrade request, then messages both ways.

The upgrade is wsproto's (its ``H11Handshake``, over h11: the same checks and answers as
before, 426 for a version it does not speak), read here with a limit of our own. After the
``101``, frames go through :mod:`scheduler.edge.wscodec`, read by the one task that asks
for a message: no reader task and no queue between it and the socket. The interface is
the part of trio-websocket's that the gateways use (``get_message``, ``send_message``,
``aclose``, ``closed``, ``remote``), with its exceptions (``ConnectionClosed``,
``CloseReason``), so client code and tests read the same either way.

Close semantics
    ``get_message`` answers pings and the peer's close (echoing its code, as RFC 6455 asks)
    itself, and raises ``ConnectionClosed`` once the connection is closed: after the peer's
    close (its code), the end of the stream (1006), or bytes that break the protocol (the
    connection is failed with 1002, 1007 or 1009 and its transport closed; see wscodec).
    ``aclose`` sends our close frame and waits for the peer's, reading the socket itself
    when no ``get_message`` is in progress (callers bound it in time). A message that
    arrives after our close frame went out is dropped. ``send_message`` on a closed or
    closing connection, or a broken transport, raises ``ConnectionClosed``.

Only one task may be receiving at a time: ``get_message`` is called by the connection's
reader task, and ``aclose`` reads only while it is not (:attr:`_receiving`), so neither
takes a lock or a checkpoint of its own per frame.
"""

from __future__ import annotations

import collections

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from scheduler.edge import wscodec
from scheduler.edge.frames import BROKEN, MAX_REQUEST_BYTES, RECEIVE_BYTES, REQUEST_TOO_LARGE, FrameGuard

CLOSE_ABNORMAL = 1006
EOF = 0
"""The event for the end of the stream (wscodec's kinds are all other numbers)."""
_END_OF_REQUEST = b"\r\n\r\n"


class ServerRequest:
    """An upgrade request the handler accepts or rejects (``path``, ``headers`` with
    lower-case names, ``proposed_subprotocols``)."""

    def __init__(self, guard: FrameGuard, shake: H11Handshake, request: Request, rest: bytes, limit: int) -> None:
        self._guard = guard
        self._shake = shake
        self._request = request
        self._rest = rest  # frames that came with the request
        self._limit = limit

    @property
    def path(self) -> str:
        return self._request.target

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self._request.extra_headers)

    @property
    def proposed_subprotocols(self) -> tuple[str, ...]:
        return tuple(self._request.subprotocols)

    async def accept(self, subprotocol: str | None = None) -> ServerWebSocket:
        await self._guard.send_all(self._shake.send(AcceptConnection(subprotocol=subprotocol)))
        ws = ServerWebSocket(self._guard, wscodec.FrameReader(self._limit))
        ws.received(self._rest)
        return ws

    async def reject(self, status: int, *, body: bytes = b"") -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        data = self._shake.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        await self._guard.send_all(data + self._shake.send(RejectData(data=body, body_finished=True)))


async def read_request(guard: FrameGuard, limit: int) -> ServerRequest | None:
    """Read the upgrade request (at most :data:`MAX_REQUEST_BYTES`, else HTTP 431). A request
    wsproto refuses is answered with its status (400, or 426 with the version it speaks) and
    None returned, as when the peer leaves first. ``limit``: the largest message after it."""
    head = b""
    while (end := head.find(_END_OF_REQUEST)) < 0:
        if len(head) > MAX_REQUEST_BYTES:
            await guard.fail(REQUEST_TOO_LARGE)
            return None
        try:
            data = await guard.receive_some(RECEIVE_BYTES)
        except BROKEN:
            return None
        if not data:
            return None
        head += data
    end += len(_END_OF_REQUEST)
    if end > MAX_REQUEST_BYTES:
        await guard.fail(REQUEST_TOO_LARGE)
        return None
    shake = H11Handshake(ConnectionType.SERVER)
    try:
        shake.receive_data(head[:end])  # a Host that is not IDNA raises UnicodeError: the boundary's (400)
        request = next((e for e in shake.events() if isinstance(e, Request)), None)
    except RemoteProtocolError as err:
        await _refuse(guard, shake, err.event_hint)
        return None
    if request is None:
        await guard.fail(400)
        return None
    return ServerRequest(guard, shake, request, head[end:], limit)


async def _refuse(guard: FrameGuard, shake: H11Handshake, hint: object) -> None:
    try:
        data = shake.send(hint) if isinstance(hint, RejectConnection) else None
    except LocalProtocolError:
        data = None
    if data is None:
        await guard.fail(400)
        return
    try:
        await guard.send_all(data)
    except BROKEN:
        pass


class ServerWebSocket:
    """One accepted WebSocket (see the module docstring for the close semantics)."""

    def __init__(self, guard: FrameGuard, reader: wscodec.FrameReader) -> None:
        self._guard = guard
        self._reader = reader
        self._events: collections.deque[tuple[int, object]] = collections.deque()
        self._receiving = False  # a task is reading the socket (get_message or aclose's drain)
        self._idle: trio.Event | None = None  # set when that task lets go
        self._close_sent: tuple[int, str | None] | None = None
        self.closed: CloseReason | None = None
        self.failed: tuple[int, str] | None = None  # the codec failed the connection: (close code, what was wrong)
        self.remote = guard.peer

    def received(self, data: bytes) -> None:
        if data:
            self._events.extend(self._reader.feed(data))

    async def get_message(self) -> str | bytes:
        """The next text (``str``) or binary (``bytes``) message."""
        while True:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            got = await self._next()
            if got is None:
                continue
            kind, value = got
            if 0 < kind <= wscodec.BINARY:
                if self._close_sent is None:
                    return value  # type: ignore[return-value]
                continue  # data after our close frame is dropped
            await self._control(kind, value)

    async def send_message(self, message: str | bytes) -> None:
        if self.closed is not None or self._close_sent is not None:
            raise ConnectionClosed(self.closed or CloseReason(*self._close_sent))
        text = isinstance(message, str)
        await self._send(wscodec.frame(wscodec.TEXT if text else wscodec.BINARY, message.encode() if text else bytes(message)))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with ``code``: our close frame, then the peer's answer (unbounded here:
        callers put a deadline on it, and close the transport after)."""
        if self.closed is not None:
            return
        if self._close_sent is None:
            self._close_sent = (code, reason)
            try:
                await self._send(wscodec.close_frame(code, reason or ""))
            except ConnectionClosed:
                return
        while self.closed is None:
            got = await self._next()
            if got is not None and not 0 < got[0] <= wscodec.BINARY:  # data after our close frame is dropped
                await self._control(*got)
        await trio.lowlevel.checkpoint()

    async def _next(self) -> tuple[int, object] | None:
        """The next event, parsed already or read now by this task; None after waiting for
        another task that was reading (get_message or aclose's drain): look again."""
        if self._receiving:
            await self._let_go()
            return None
        if self._events:
            got = self._events.popleft()
            await trio.lowlevel.checkpoint_if_cancelled()
            return got
        return await self._receive()

    async def _receive(self) -> tuple[int, object]:
        """Read the socket until there is an event (this task holds :attr:`_receiving`)."""
        self._receiving = True
        try:
            while not self._events:
                try:
                    data = await self._guard.receive_some(RECEIVE_BYTES)
                except BROKEN:
                    data = b""
                if not data:
                    return EOF, None
                self._events.extend(self._reader.feed(data))
            return self._events.popleft()
        finally:
            self._receiving = False
            if self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _let_go(self) -> None:
        if self._idle is None:
            self._idle = trio.Event()
        await self._idle.wait()

    async def _control(self, kind: int, value: object) -> None:
        """A control event, the end of the stream (kind 0) or a violation."""
        if kind == wscodec.PING:
            if self._close_sent is None:
                try:
                    await self._send(wscodec.frame(wscodec.PONG, value))  # type: ignore[arg-type]
                except ConnectionClosed:
                    pass
        elif kind == wscodec.CLOSE:
            code, reason = value  # type: ignore[misc]
            if self._close_sent is None:
                self._close_sent = (code, reason)
                try:
                    await self._send(wscodec.close_frame(code, reason))
                except ConnectionClosed:
                    pass
            self._set_closed(code, reason)
        elif kind == wscodec.FAIL:
            code, reason = value  # type: ignore[misc]
            self.failed = (code, reason)
            await self._guard.fail(code, reason)
            self._set_closed(code, reason)
        elif kind == EOF:
            self._set_closed(CLOSE_ABNORMAL, "the peer went away")

    def _set_closed(self, code: int, reason: str | None) -> None:
        if self.closed is None:
            self.closed = CloseReason(code, reason)

    async def _send(self, data: bytes) -> None:
        try:
            await self._guard.send_all(data)
        except BROKEN as exc:
            self._set_closed(CLOSE_ABNORMAL, "the transport broke")
            raise ConnectionClosed(self.closed) from exc
