"""The transport under each WebSocket connection: one stream wrapper that serialises the
connection's writes and knows how to end it with a code.

- **Writes are serialised** by one lock, so a close frame never lands inside another frame
  (the reader's pongs and close answers, the gateways' writer tasks and a failure share the
  socket).
- **A failed connection is closed with a code.** :meth:`FrameGuard.fail` writes a close
  frame (unless one went out already) and closes the transport: the codec uses it for bytes
  that break the protocol (1002, 1007, 1009: edge/wscodec.py) and the per-connection error
  boundary after an exception (1011). Before the upgrade it answers an HTTP refusal
  instead (400, 431 for a request over :data:`MAX_REQUEST_BYTES`, 503 when the listener is
  full).
- Every write of its own is bounded in time. ``repr()`` and ``peer`` are the peer's
  ``address:port`` (the gateways log it).

Until 2026-12-07 this sat below trio-websocket and closed three holes the library left
(docs/security.md): frame headers announcing more than the limit, protocol errors closed
without a close frame, library exceptions. The daemon's own codec (edge/wscodec.py,
edge/wsconn.py) now refuses those itself.
"""

from __future__ import annotations

import os

import trio

from scheduler.edge.wscodec import close_frame

RECEIVE_BYTES = 65536
"""What one read from the socket may return: a 200 ms frame of 16 kHz audio (6,400 bytes) is one
read (trio-websocket asked for 4 KiB: two reads and two trips through its parser)."""

BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What a transport raises when it is gone (the peer left, or it was closed here)."""
GUARD_WRITE_TIMEOUT_S = 2.0
MAX_REQUEST_BYTES = 16384
"""The upgrade request, headers included; past it: HTTP 431 (edge/wsconn.py reads it)."""
REQUEST_TOO_LARGE = 431
SERVICE_UNAVAILABLE = 503
RETRY_AFTER_S = 5
_HTTP_REFUSALS = {400: b"400 Bad Request", REQUEST_TOO_LARGE: b"431 Request Header Fields Too Large",
                  SERVICE_UNAVAILABLE: b"503 Service Unavailable\r\nRetry-After: %d" % RETRY_AFTER_S}


class FrameGuard(trio.abc.Stream):
    """The transport of one connection, wrapped (see the module docstring)."""

    def __init__(self, inner: trio.abc.Stream, peer: str = "unknown") -> None:
        self.inner = inner
        self.peer = peer
        self._lock = trio.StrictFIFOLock()
        self._upgraded = False  # the 101 response went out: what follows are frames
        self._answered = False  # some response (101 or a refusal) went out
        self._close_sent = False
        self._closed = False
        # plain TCP is read by its descriptor (_read); TLS and other streams by their own receive_some
        self._sock = inner.socket if isinstance(inner, trio.SocketStream) else None
        self._drained = False  # the last read left the socket empty

    def __repr__(self) -> str:
        return self.peer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the guard closed this connection")
        if self._sock is None:
            return await self.inner.receive_some(max_bytes or RECEIVE_BYTES)
        return await self._read(self._sock, max_bytes or RECEIVE_BYTES)

    async def _read(self, sock: trio.socket.SocketType, max_bytes: int) -> bytes:
        """One read of a plain TCP socket. Trio's ``recv`` tries the socket first and waits
        for it only after a failed try; a client sends a frame every 100-200 ms, so nearly
        every read after a frame failed once (a system call, an exception and a checkpoint
        per frame). Here a read that returned less than asked left the socket empty, and the
        next one waits for it first. Read by descriptor: looked up at every try (-1 once
        closed), with no await between the look-up and the read."""
        if self._drained:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the socket was closed")
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"read failed: {exc}") from exc
            self._drained = len(data) < max_bytes
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        lock = self._lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()  # the usual case: no second scheduler trip (the send checkpoints)
        try:
            if not self._upgraded:
                self._upgraded = bytes(data[:12]) == b"HTTP/1.1 101"
                self._answered = True
            elif data and data[0] & 0x0F == 0x8:
                self._close_sent = True  # the connection's own close frame (wsconn.py)
            await self.inner.send_all(data)
        finally:
            lock.release()

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
            elif not self._answered:
                status = _HTTP_REFUSALS.get(code, _HTTP_REFUSALS[400])
                last_words = b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                self._answered = True
            if last_words is not None and not self._closed:
                with trio.move_on_after(GUARD_WRITE_TIMEOUT_S):
                    async with self._lock:
                        try:
                            await self.inner.send_all(last_words)
                        except BROKEN:
                            pass
            await self._close_inner()

    async def aclose(self) -> None:
        await self._close_inner()

    async def _close_inner(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(GUARD_WRITE_TIMEOUT_S):
            try:
                await self.inner.aclose()
            except BROKEN:
                pass
