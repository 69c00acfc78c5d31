"""The daemon's WebSocket frames, sans-IO: client frames in (RFC 6455 section 5), server frames out.

Only the server side, and only what this daemon speaks: no extensions (none is ever
negotiated, so every RSV bit is an error), client frames always masked, messages at most
``limit`` payload bytes. :class:`FrameReader` takes the bytes after the upgrade request,
split anywhere, and turns them into events, each a tuple ``(kind, value)``:

- ``(TEXT, str)`` and ``(BINARY, bytes)``: one whole message (fragments joined, text
  decoded as strict UTF-8);
- ``(PING, bytes)``, ``(PONG, bytes)``: control frames, also between the fragments of a message;
- ``(CLOSE, (code, reason))``: the peer's close frame (1005 when it carries no code); the
  reader reads nothing after it;
- ``(FAIL, (code, reason))``: the bytes broke the protocol: 1002 (RSV bits, an unmasked
  frame, a reserved opcode, a fragmented or long control frame, a continuation out of
  place, a length not in its shortest form, a close code RFC 6455 does not allow), 1007
  (invalid UTF-8 in a text message or a close reason), 1009 (a data frame, or the message it
  belongs to, announcing more than ``limit`` bytes: refused at its header, before its payload
  is read). The reader is spent after it: the connection is to be failed with that code.

Why our own (docs/performance.md, "A frame codec of our own"): trio-websocket's server
reads through wsproto into a message queue read by another task; parsing here is a few
integer operations per frame and the message goes straight to the one task that reads it.
The checks are the ones wsproto made (tests/test_hostile.py and the fuzzers pin them).
"""

from __future__ import annotations

import codecs
import struct

import numpy as np

from scheduler.protocol import CLOSE_TOO_BIG

TEXT, BINARY, CLOSE, PING, PONG, FAIL = 1, 2, 8, 9, 10, -1
_CONTINUATION = 0

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_DATA = 1007
_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))
"""Close codes a peer may send below 3000 (wsproto's list: 1004-1006 and 1015 are never sent)."""
MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON_BYTES = 120


_NUMPY_FROM = 256
"""Payloads from this size are unmasked with numpy (6,400 bytes: 2.6 us against 13 us with Python
integers); smaller ones with integers (100 bytes: 0.7 us against 2.2 us)."""


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask repeated."""
    n = len(payload)
    if n < _NUMPY_FROM:
        key = (mask * ((n >> 2) + 1))[:n]
        return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    words = n >> 2
    out = (np.frombuffer(payload, dtype=np.uint32, count=words) ^ np.frombuffer(mask, dtype=np.uint32)[0]).tobytes()
    tail = n & 3
    if tail:
        out += bytes(b ^ k for b, k in zip(payload[n - tail:], mask, strict=False))
    return out


class FrameReader:
    """Client frames to events (see the module docstring). ``feed`` never raises on what a
    peer sends: a violation is the event ``(FAIL, (code, reason))``, the last one."""

    __slots__ = ("limit", "_pending", "_need", "_fragments", "_message_op", "_message_len", "_utf8", "done")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._pending = bytearray()  # the start of a frame not complete yet
        self._need = 0  # bytes _pending must hold before parsing again (0: unknown, try at once)
        self._fragments = bytearray()  # the message being received, fragments joined as they come (one buffer, not
        # one object per fragment: a peer's 1-byte fragments would otherwise cost ~40 bytes of memory each)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # a fragmented text message is checked fragment by fragment
        self._message_op = _CONTINUATION  # TEXT or BINARY while a fragmented message is open
        self._message_len = 0
        self.done = False  # after a CLOSE or a FAIL event nothing more is read

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        if self.done:
            return []
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._need:
                return []
            data = bytes(pending)
            pending.clear()
        events: list[tuple[int, object]] = []
        off = self._frames(data, events)
        if off < len(data) and not self.done:
            pending += data[off:] if off else data
        return events

    def _frames(self, data: bytes, events: list[tuple[int, object]]) -> int:
        """Parse whole frames from ``data`` into ``events``; returns where the first
        incomplete one starts (and notes how many bytes it needs)."""
        n, off = len(data), 0
        while n - off >= 2:
            b0, b1 = data[off], data[off + 1]
            length, head = b1 & 0x7F, off + 6
            if length == 126:
                if n - off < 8:
                    self._need = 8
                    return off
                length, head = (data[off + 2] << 8) | data[off + 3], off + 8
                if length < 126:
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, "length not in its shortest form")
            elif length == 127:
                if n - off < 14:
                    self._need = 14
                    return off
                length, head = struct.unpack_from("!Q", data, off + 2)[0], off + 14
                if length < 65536 or length >> 63:
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, "bad 64-bit length")
            refused = self._check(b0, b1, length)
            if refused is not None:
                return self._fail(events, *refused)
            end = head + length
            if end > n:
                self._need = end - off
                return off
            payload = data[head:end]
            if length:
                payload = _unmask(payload, data[head - 4:head])
            off = end
            self._frame(b0, payload, events)
            if self.done:
                return n
        self._need = 2
        return off

    def _check(self, b0: int, b1: int, length: int) -> tuple[int, str] | None:
        """What is wrong with a frame, from its header alone (None: nothing)."""
        if b0 & 0x70:
            return CLOSE_PROTOCOL_ERROR, "reserved bits set"
        if not b1 & 0x80:
            return CLOSE_PROTOCOL_ERROR, "client frame not masked"
        op = b0 & 0x0F
        if op >= CLOSE:
            if op > PONG:
                return CLOSE_PROTOCOL_ERROR, "reserved opcode"
            if not b0 & 0x80:
                return CLOSE_PROTOCOL_ERROR, "fragmented control frame"
            if length > MAX_CONTROL_PAYLOAD:
                return CLOSE_PROTOCOL_ERROR, "control frame too long"
            return None
        if op > BINARY:
            return CLOSE_PROTOCOL_ERROR, "reserved opcode"
        if op == _CONTINUATION:
            if self._message_op == _CONTINUATION:
                return CLOSE_PROTOCOL_ERROR, "continuation without a message"
        elif self._message_op != _CONTINUATION:
            return CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one"
        if (self._message_len if op == _CONTINUATION else 0) + length > self.limit:
            return CLOSE_TOO_BIG, "message too large"
        return None

    def _frame(self, b0: int, payload: bytes, events: list[tuple[int, object]]) -> None:
        """One whole frame that passed :meth:`_check`."""
        op = b0 & 0x0F
        if op >= CLOSE:
            if op == CLOSE:
                self._close(payload, events)
            else:
                events.append((op, payload))
            return
        fin = b0 & 0x80
        if op != _CONTINUATION:
            if fin:
                self._message(op, payload, events)
                return
            self._message_op, self._message_len = op, 0
            if op == TEXT:
                self._utf8.reset()
        else:
            op = self._message_op
        self._message_len += len(payload)
        self._fragments += payload
        if op == TEXT:
            try:
                self._utf8.decode(payload, bool(fin))  # checked fragment by fragment, as wsproto does
            except UnicodeDecodeError:
                self._fail(events, CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")
                return
        if fin:
            whole = bytes(self._fragments)
            self._message_op, self._message_len, self._fragments = _CONTINUATION, 0, bytearray()
            events.append((op, whole.decode() if op == TEXT else whole))

    def _message(self, op: int, payload: bytes, events: list[tuple[int, object]]) -> None:
        if op == BINARY:
            events.append((BINARY, payload))
            return
        try:
            events.append((TEXT, payload.decode()))
        except UnicodeDecodeError:
            self._fail(events, CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")

    def _close(self, payload: bytes, events: list[tuple[int, object]]) -> None:
        if not payload:
            events.append((CLOSE, (CLOSE_NO_STATUS, "")))
            self.done = True
            return
        if len(payload) == 1:
            self._fail(events, CLOSE_PROTOCOL_ERROR, "close payload of one byte")
            return
        code = (payload[0] << 8) | payload[1]
        if not (code in _VALID_CLOSE_CODES or 3000 <= code <= 4999):
            self._fail(events, CLOSE_PROTOCOL_ERROR, "close code not allowed")
            return
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            self._fail(events, CLOSE_INVALID_DATA, "invalid UTF-8 in a close reason")
            return
        events.append((CLOSE, (code, reason)))
        self.done = True

    def _fail(self, events: list[tuple[int, object]], code: int, reason: str) -> int:
        events.append((FAIL, (code, reason)))
        self.done = True
        self._pending.clear()
        return 0


def frame(op: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | op, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | op, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | op, 127, n) + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A server close frame; the reason is cut to fit a control frame, at a character
    boundary (a cut inside a UTF-8 sequence would itself be invalid data). ``None`` or 1005
    as the code: an empty close frame."""
    if code is None or code == CLOSE_NO_STATUS:
        return frame(CLOSE, b"")
    cut = reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore").encode()
    return frame(CLOSE, struct.pack("!H", code) + cut)
