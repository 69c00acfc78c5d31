"""A guard on each WebSocket connection's byte stream, below trio-websocket.

trio-websocket (and wsproto under it) leave three holes that a hostile peer can use
(docs/security.md, "What the WebSocket library leaves to us"); this module closes them
without patching either library, with nothing but the public ``trio.abc.Stream`` interface:

- **Oversized frames are refused at their header.** The library reads a frame's payload
  until its message passes ``max_message_size``, so a header announcing 3 MB or 2^40
  bytes, followed by nothing, holds the connection open forever. :class:`FrameScanner`
  reads every client frame header (a few integer operations per received chunk) and the
  guard fails the connection with close code 1009 as soon as a data frame, or the message
  it belongs to, announces more than the limit. The library therefore never meets an
  oversized message, whose 1009 it would try to send in the ``LOCAL_CLOSING`` state, where
  wsproto raises ``LocalProtocolError`` (the issue-29 crash; tests/test_hostile.py pins it).
- **Protocol errors get their close frame.** wsproto detects invalid UTF-8 (1007) and
  protocol errors (1002: RSV bits, unmasked client frames, fragmented or long control
  frames, bad close codes), and trio-websocket then closes the TCP connection without the
  close frame RFC 6455 asks for. When the library closes the stream and its connection's
  close reason is 1002 or 1007 while no close frame went out, the guard sends that frame
  first.
- **A failed connection is closed with a code.** :meth:`FrameGuard.fail` writes a close
  frame (unless one went out already) and closes the transport: the per-connection error
  boundary uses it after a library exception (1011). Before the upgrade (a request the
  library choked on, such as a ``Host`` that is not valid IDNA) it answers HTTP 400 instead.

Sends from the library and the guard's own close frames are serialised by one lock, so a
close frame never lands inside another frame. Every guard write is bounded in time.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import trio

from scheduler.protocol import CLOSE_TOO_BIG

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
LIBRARY_CLOSES_WITHOUT_FRAME = (CLOSE_PROTOCOL_ERROR, CLOSE_INVALID_DATA)
"""Close codes that mean wsproto refused the peer's bytes (trio-websocket then sends no close frame)."""

RECEIVE_BYTES = 65536
"""What one read from the socket may return: trio-websocket asks for 4 KiB, so a 200 ms frame of
16 kHz audio (6,400 bytes) took two reads and two trips through the library's parser."""

GUARD_WRITE_TIMEOUT_S = 2.0
MAX_REQUEST_BYTES = 16384
"""The upgrade request, headers included; past it: HTTP 431 (h11 lets a request that arrives whole run past its own limit)."""
REQUEST_TOO_LARGE = 431
_END_OF_REQUEST = b"\r\n\r\n"
SERVICE_UNAVAILABLE = 503
RETRY_AFTER_S = 5
_HTTP_REFUSALS = {400: b"400 Bad Request", REQUEST_TOO_LARGE: b"431 Request Header Fields Too Large",
                  SERVICE_UNAVAILABLE: b"503 Service Unavailable\r\nRetry-After: %d" % RETRY_AFTER_S}


class FrameScanner:
    """Sans-IO reader of client frame headers (RFC 6455 section 5.2), no payload decoding.

    :meth:`feed` takes the bytes a server received, in order, first the HTTP upgrade request
    and then frames, split anywhere, and returns None while every data frame and the message
    it belongs to stays within ``limit`` payload bytes, or 1009 at the first header that
    announces more (after which it is spent: the connection is to be failed); 431 when the
    request runs past :data:`MAX_REQUEST_BYTES` without ending. Control frames are skipped
    by their announced length; whether they are valid is wsproto's business.
    """

    __slots__ = ("limit", "_in_request", "_request_bytes", "_tail", "_header", "_remaining", "_message", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_request = True
        self._request_bytes = 0
        self._tail = b""  # the last bytes of the request seen so far, to find its end across chunks
        self._header = bytearray()
        self._remaining = 0  # payload bytes of the current frame still to come
        self._message = 0  # payload bytes of the current data message so far (fragments added up)
        self.refused: int | None = None

    def feed(self, data: bytes) -> int | None:
        if self.refused is not None:
            return self.refused
        pos = 0
        if self._in_request:
            seen = self._tail + data
            end = seen.find(_END_OF_REQUEST)
            self._request_bytes += len(data) if end < 0 else end + len(_END_OF_REQUEST) - len(self._tail)
            if self._request_bytes > MAX_REQUEST_BYTES:
                self.refused = REQUEST_TOO_LARGE
                return self.refused
            if end < 0:
                self._tail = seen[-3:]
                return None
            self._in_request = False
            pos = end + len(_END_OF_REQUEST) - len(self._tail)
        n = len(data)
        while pos < n:
            if self._remaining:
                step = min(self._remaining, n - pos)
                self._remaining -= step
                pos += step
                continue
            take = self._needed() - len(self._header)
            self._header += data[pos:pos + take]
            pos += take
            if len(self._header) < self._needed():
                continue  # a header split across chunks; the length bytes may still be missing
            code = self._frame(bytes(self._header))
            self._header.clear()
            if code is not None:
                self.refused = code
                return code
        return None

    def _needed(self) -> int:
        """Bytes of the header being read: 2, then its extended length and mask once known."""
        if len(self._header) < 2:
            return 2
        short = self._header[1] & 0x7F
        return 2 + (2 if short == 126 else 8 if short == 127 else 0) + (4 if self._header[1] & 0x80 else 0)

    def _frame(self, header: bytes) -> int | None:
        opcode, short = header[0] & 0x0F, header[1] & 0x7F
        length = short if short < 126 else struct.unpack_from("!H" if short == 126 else "!Q", header, 2)[0]
        self._remaining = length
        if opcode >= 0x8:
            return None  # a control frame: wsproto checks it (at most 125 bytes, not fragmented)
        if opcode != 0x0:
            self._message = 0  # a new text or binary message (a continuation adds to the current one)
        self._message += length
        if self._message > self.limit:
            return CLOSE_TOO_BIG
        if header[0] & 0x80:
            self._message = 0  # FIN: the message is complete
        return None


def close_frame(code: int, reason: str = "") -> bytes:
    """An unmasked (server) close frame; the reason is cut to fit a control frame."""
    payload = struct.pack("!H", code) + reason.encode()[:120]
    return bytes((0x88, len(payload))) + payload


class FrameGuard(trio.abc.Stream):
    """The stream trio-websocket reads and writes, wrapped around the client's transport.

    ``connection`` is set once the handshake is accepted (the boundary does it), so that
    :meth:`aclose` can read the library's close reason. ``closed_with`` is the close code the
    guard itself sent, if any (for the connection's log line). ``repr()`` of the guard is the
    peer's ``address:port``: trio-websocket names a stream that is not a socket by ``repr()``
    (``WebSocketConnection.remote``), and the gateways log that."""

    def __init__(self, inner: trio.abc.Stream, limit: int, peer: str = "unknown") -> None:
        self.inner = inner
        self.peer = peer
        self.scanner = FrameScanner(limit)
        self.connection: WebSocketConnection | None = None
        self.closed_with: int | None = None
        self._lock = trio.StrictFIFOLock()
        self._upgraded = False  # the 101 response went out: what follows are frames
        self._answered = False  # some response (101 or a refusal) went out
        self._close_sent = False
        self._closed = False

    def __repr__(self) -> str:
        return self.peer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the guard closed this connection")
        data = await self.inner.receive_some(max(max_bytes or 0, RECEIVE_BYTES))
        if data and (code := self.scanner.feed(data)) is not None:
            await self.fail(code, "frame too large")
            return b""  # the library sees the end of the stream and stops reading
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._lock:
            if not self._upgraded:
                self._upgraded = bytes(data[:12]) == b"HTTP/1.1 101"
                self._answered = True
            elif data and data[0] & 0x0F == 0x8:
                self._close_sent = True  # the library's own close frame (a handshake, or its 1009)
            await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection (RFC 6455 7.1.7): send a close frame with ``code`` unless one
        went out already, then close the transport. Before the upgrade, answer an HTTP
        refusal instead (431 for :data:`REQUEST_TOO_LARGE`, 503 with ``Retry-After`` for
        :data:`SERVICE_UNAVAILABLE`, else 400). Bounded in time, safe under cancellation."""
        with trio.CancelScope(shield=True):
            last_words = None
            if self._upgraded and not self._close_sent:
                last_words = close_frame(code, reason)
                self._close_sent = True
                self.closed_with = code
            elif not self._answered:
                status = _HTTP_REFUSALS.get(code, _HTTP_REFUSALS[400])
                last_words = b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                self._answered = True
            if last_words is not None and not self._closed:
                with trio.move_on_after(GUARD_WRITE_TIMEOUT_S):
                    async with self._lock:
                        try:
                            await self.inner.send_all(last_words)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            pass
            await self._close_inner()

    async def aclose(self) -> None:
        """Close the transport; first send the close frame trio-websocket leaves out after
        wsproto refused the peer's bytes (1002, 1007)."""
        reason = self.connection.closed if self.connection is not None else None
        if reason is not None and reason.code in LIBRARY_CLOSES_WITHOUT_FRAME and not self._close_sent:
            await self.fail(reason.code, (reason.reason or "")[:60])
            return
        await self._close_inner()

    async def _close_inner(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(GUARD_WRITE_TIMEOUT_S):
            try:
                await self.inner.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
