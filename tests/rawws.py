"""A hostile WebSocket client on raw sockets: any handshake, any frame, byte for byte.

Used by tests/test_hostile.py and the black-box fuzzer (tests/fuzz/blackbox.py). Frames are
built by hand (:func:`frame`) so that anything RFC 6455 forbids can be sent: RSV bits,
unmasked client frames, fragmented control frames, lengths that lie.
"""

from __future__ import annotations

import base64
import os
import struct

import trio

GOOD_KEY = base64.b64encode(b"0123456789abcdef").decode()


def request(path: str = "/v1/session", *, key: str | None = GOOD_KEY, version: str = "13", host: str = "127.0.0.1",
            extra: str = "") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Version: {version}"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bytes | None = b"\0\0\0\0",
          length: int | None = None) -> bytes:
    """One frame. ``mask=None`` sends it unmasked; ``length`` announces another length than
    the payload's (the payload is sent as given). A zero mask key leaves the payload as is."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0x0F])
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    if mask != b"\0\0\0\0":
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + payload


def text(s: str | bytes) -> bytes:
    return frame(0x1, s.encode() if isinstance(s, str) else s, mask=os.urandom(4) if len(s) < 4096 else b"\0\0\0\0")


def close(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return frame(0x8, b"" if code is None else struct.pack("!H", code) + reason)


class RawPeer:
    """One raw connection: send bytes, read the HTTP answer, read frames until the close."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> bool:
        """False when the daemon already closed the connection."""
        try:
            await self.stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def _more(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.buffer += data
        return bool(data)

    async def http_status(self) -> int | None:
        """The status of the daemon's answer to the upgrade request (None: closed first)."""
        while b"\r\n\r\n" not in self.buffer:
            if not await self._more():
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.last_head = head
        if b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(self.buffer) < length:
                if not await self._more():
                    break
            self.buffer = self.buffer[length:]
        return int(head.split(b" ", 2)[1])

    async def upgrade(self, path: str = "/v1/session", **kwargs) -> None:
        await self.send(request(path, **kwargs))
        status = await self.http_status()
        assert status == 101, status

    async def next_frame(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next server frame; None at the end of the stream."""
        while True:
            if len(self.buffer) >= 2:
                n, at = self.buffer[1] & 0x7F, 2
                if n == 126 and len(self.buffer) >= 4:
                    n, at = struct.unpack_from("!H", self.buffer, 2)[0], 4
                elif n == 127 and len(self.buffer) >= 10:
                    n, at = struct.unpack_from("!Q", self.buffer, 2)[0], 10
                if ((self.buffer[1] & 0x7F) < 126 or at > 2) and len(self.buffer) >= at + n:
                    opcode, payload = self.buffer[0] & 0x0F, self.buffer[at:at + n]
                    self.buffer = self.buffer[at + n:]
                    return opcode, payload
            if not await self._more():
                return None

    async def close_code(self) -> tuple[int | None, list[bytes]]:
        """Read until the daemon's close frame: (its code, the text frames before it);
        code None when the stream ended without one."""
        texts = []
        while (got := await self.next_frame()) is not None:
            opcode, payload = got
            if opcode == 0x8:
                return (struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005), texts
            if opcode == 0x1:
                texts.append(payload)
        return None, texts

    async def aclose(self) -> None:
        await self.stream.aclose()
