"""The daemon's own WebSocket frames (scheduler/edge/wscodec.py) and connection
(scheduler/edge/wsconn.py), without a daemon.

The codec is checked against wsproto, which the daemon used before: Hypothesis builds
streams of client frames, valid and not (RSV bits, unmasked frames, reserved opcodes,
fragments in and out of place, control frames between fragments, close codes, broken
UTF-8, lengths not in their shortest form), cuts them anywhere, and both must read the same
messages, pings and pongs, and end with the same close or failure code. The connection is
driven over an in-memory stream pair: pings answered, the close handshake both ways, a
close while nobody reads, a close racing the reader.
"""

from __future__ import annotations

import functools
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import memory_stream_pair
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from scheduler.edge import wscodec
from scheduler.edge.frames import FrameGuard
from scheduler.edge.wsconn import ServerWebSocket, read_request

from .rawws import frame, request

BIG = 1 << 30


def _ours(data: bytes, cuts: list[int], limit: int = BIG) -> list[tuple]:
    reader = wscodec.FrameReader(limit)
    events: list[tuple] = []
    at = 0
    for cut in [*sorted(cuts), len(data)]:
        events += reader.feed(data[at:cut])
        at = max(at, cut)
    out = []
    for kind, value in events:
        if kind == wscodec.TEXT:
            out.append(("text", value))
        elif kind == wscodec.BINARY:
            out.append(("bytes", value))
        elif kind in (wscodec.PING, wscodec.PONG):
            out.append(("ping" if kind == wscodec.PING else "pong", value))
        elif kind == wscodec.CLOSE:
            out.append(("close", *value))
        else:
            out.append(("fail", value[0]))
    return out


def _wsproto(data: bytes) -> list[tuple]:
    conn = Connection(ConnectionType.SERVER)
    conn.receive_data(data)
    out, parts = [], []
    for ev in conn.events():
        if isinstance(ev, TextMessage | BytesMessage):
            parts.append(ev.data)
            if ev.message_finished:
                out.append(("text", "".join(parts)) if isinstance(ev, TextMessage) else ("bytes", b"".join(parts)))
                parts = []
        elif isinstance(ev, Ping | Pong):
            out.append(("ping" if isinstance(ev, Ping) else "pong", bytes(ev.payload)))
        elif isinstance(ev, CloseConnection):
            closed = conn.state is ConnectionState.REMOTE_CLOSING
            out.append(("close", ev.code, ev.reason or "") if closed else ("fail", ev.code))
            break
    return out


_masks = st.binary(min_size=4, max_size=4)
_codes = st.sampled_from([0, 999, 1000, 1001, 1003, 1004, 1005, 1006, 1007, 1011, 1013, 1014, 1015, 2999, 3000, 4999, 5000,
                          65535])
_close_payloads = st.one_of(
    st.just(b""), st.binary(min_size=1, max_size=1),
    st.tuples(_codes, st.sampled_from([b"", b"bye", "é".encode(), b"\xff", "é".encode()[:1]])).map(
        lambda t: struct.pack("!H", t[0]) + t[1]))


@st.composite
def _payload(draw, text: bool) -> bytes:
    """Text: UTF-8, sometimes spoiled (a byte that is never valid, or a character cut short)."""
    if not text:
        return draw(st.binary(max_size=300))
    data = draw(st.text(max_size=30)).encode()
    spoil = draw(st.sampled_from(["none", "none", "none", "ff", "cut"]))
    if spoil == "ff":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff" + data[at:]
    elif spoil == "cut" and data:
        data = data + "é".encode()[:1]
    return data


@st.composite
def _message(draw) -> bytes:
    """One data message, whole or in fragments (cut anywhere, even inside a character),
    with pings and pongs between them."""
    text = draw(st.booleans())
    data = draw(_payload(text))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    parts = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out = b""
    for i, part in enumerate(parts):
        out += frame((0x1 if text else 0x2) if i == 0 else 0x0, part, fin=i == len(parts) - 1, mask=draw(_masks))
        if i < len(parts) - 1 and draw(st.integers(0, 3)) == 0:
            out += frame(draw(st.sampled_from([0x9, 0xA])), draw(st.binary(max_size=125)), mask=draw(_masks))
    return out


@st.composite
def _odd(draw) -> bytes:
    """Any header: reserved opcodes, RSV bits, no mask, control frames fragmented or long,
    continuations out of place."""
    op = draw(st.sampled_from([0, 1, 2, 3, 7, 8, 9, 10, 11, 15]))
    fin, rsv = draw(st.booleans()), draw(st.sampled_from([0, 0, 0, 1, 2, 4, 7]))
    mask = draw(st.sampled_from([None, b"\x01\x02\x03\x04", b"\0\0\0\0"]))
    return frame(op, draw(st.binary(max_size=200)), fin=fin, rsv=rsv, mask=mask)


_streams = st.tuples(st.lists(st.one_of(_message(), _message(), _odd()), max_size=5),
                     st.one_of(st.just(b""), _close_payloads.map(lambda p: frame(0x8, p)))).map(
    lambda t: b"".join(t[0]) + t[1])


@settings(max_examples=1000, deadline=None)
@given(_streams, st.lists(st.integers(0, 2000), max_size=6))
def test_the_codec_reads_what_wsproto_reads(data, cuts):
    assert _ours(data, cuts) == _wsproto(data)


def test_the_length_must_be_in_its_shortest_form():
    head = bytes([0x82, 0x80 | 126]) + struct.pack("!H", 125) + b"\0" * 4 + b"x" * 125
    assert _ours(head, []) == [("fail", 1002)] == _wsproto(head)
    head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 300) + b"\0" * 4 + b"x" * 300
    assert _ours(head, []) == [("fail", 1002)] == _wsproto(head)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 64])
def test_an_oversized_message_is_refused_at_its_header_split_anywhere(cut):
    data = frame(0x1, b"x" * 300) + frame(0x9, b"p") + frame(0x2, b"y" * 3000) + frame(0x2, b"", length=5000)
    assert _ours(data, list(range(cut, len(data), cut)), limit=4096) == [
        ("text", "x" * 300), ("ping", b"p"), ("bytes", b"y" * 3000), ("fail", 1009)]
    assert _ours(frame(0x2, b"", length=2 ** 40), [], limit=4096) == [("fail", 1009)]


def test_fragments_add_up_and_a_ping_between_them_does_not_count():
    ok = b"".join(frame(0x1 if i == 0 else 0x0, b"z" * 400, fin=(i == 2)) for i in range(3)) + frame(0x1, b"z" * 1000)
    assert _ours(ok, [], limit=1200) == [("text", "z" * 1200), ("text", "z" * 1000)]
    assert _ours(ok, [], limit=1199) == [("fail", 1009)]
    interleaved = frame(0x1, b"z" * 800, fin=False) + frame(0x9, b"p" * 125) + frame(0x0, b"z" * 300)
    assert _ours(interleaved, [], limit=1100) == [("ping", b"p" * 125), ("text", "z" * 1100)]


def test_tiny_fragments_cost_their_bytes_not_an_object_each():
    """A peer that sends a message as 100,000 one-byte fragments holds 100 KB of it, not
    100,000 objects (about 4 MB): the fragments go into one buffer as they come."""
    import tracemalloc

    reader = wscodec.FrameReader(BIG)
    first = frame(0x2, b"a", fin=False, mask=b"\1\2\3\4")
    more = frame(0x0, b"b", fin=False, mask=b"\1\2\3\4") * 10_000
    tracemalloc.start()
    try:
        assert reader.feed(first) == []
        for _ in range(10):
            assert reader.feed(more) == []
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, held
    assert reader.feed(frame(0x0, b"c", mask=b"\1\2\3\4")) == [(wscodec.BINARY, b"a" + b"b" * 100_000 + b"c")]


def test_a_large_frame_in_many_reads_is_buffered_not_reparsed():
    reader = wscodec.FrameReader(BIG)
    data = frame(0x2, bytes(range(256)) * 4000, mask=b"\x01\x02\x03\x04")
    events = []
    for at in range(0, len(data), 1000):
        events += reader.feed(data[at:at + 1000])
    assert events == [(wscodec.BINARY, bytes(range(256)) * 4000)]


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_unmasking_is_the_xor_of_the_mask_repeated(payload, mask):
    assert wscodec._unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_nothing_is_read_after_a_close_or_a_failure():
    reader = wscodec.FrameReader(BIG)
    assert reader.feed(frame(0x8, struct.pack("!H", 1000) + b"bye") + frame(0x1, b"late")) == [(wscodec.CLOSE, (1000, "bye"))]
    assert reader.feed(frame(0x1, b"later")) == []


def test_server_frames_and_close_reasons_cut_at_a_character():
    assert wscodec.frame(wscodec.TEXT, b"hi") == b"\x81\x02hi"
    assert wscodec.frame(wscodec.BINARY, b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"
    assert wscodec.frame(wscodec.BINARY, b"x" * 70000)[:10] == b"\x82\x7f" + struct.pack("!Q", 70000)
    cut = wscodec.close_frame(1008, "é" * 100)
    assert len(cut) <= 2 + 125 and cut[4:].decode() == "é" * 60
    assert wscodec.close_frame(1005) == b"\x88\x00"


# ---------------------------------------------------------------- the connection


async def _accepted(extra: bytes = b"") -> tuple[ServerWebSocket, trio.testing.MemoryStapledStream]:
    client, server = memory_stream_pair()
    await client.send_all(request() + extra)
    req = await read_request(FrameGuard(server, "peer:1"), limit=1 << 20)
    assert req is not None and req.path == "/v1/session"
    ws = await req.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += await client.receive_some()
    assert head.startswith(b"HTTP/1.1 101")
    return ws, client


async def test_messages_pings_and_the_peers_close():
    ws, client = await _accepted(frame(0x1, b'{"a":1}'))
    assert await ws.get_message() == '{"a":1}'
    await client.send_all(frame(0x9, b"hey") + frame(0x2, b"\x00\x01"))
    assert await ws.get_message() == b"\x00\x01"
    assert await client.receive_some() == b"\x8a\x03hey"  # the pong
    await ws.send_message("out")
    assert await client.receive_some() == b"\x81\x03out"
    await client.send_all(frame(0x8, struct.pack("!H", 1001) + b"going"))
    with pytest.raises(ConnectionClosed) as info:
        await ws.get_message()
    assert info.value.reason.code == 1001 and ws.closed.reason == "going"
    assert await client.receive_some() == b"\x88\x07\x03\xe9going"  # the echo
    with pytest.raises(ConnectionClosed):
        await ws.send_message("late")


async def test_a_protocol_error_fails_the_connection_with_its_code():
    ws, client = await _accepted()
    await client.send_all(frame(0x1, b"\xff"))
    with pytest.raises(ConnectionClosed) as info:
        await ws.get_message()
    assert info.value.reason.code == 1007
    assert (await client.receive_some())[:4] == b"\x88\x21\x03\xef"
    assert await client.receive_some() == b""  # and the transport is closed


async def test_aclose_reads_the_answer_itself_when_nobody_reads():
    ws, client = await _accepted()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.aclose, 1000, "done")
        assert await client.receive_some() == b"\x88\x06\x03\xe8done"
        await client.send_all(frame(0x1, b"dropped") + frame(0x8, struct.pack("!H", 1000)))
    assert ws.closed.code == 1000


async def _read_until_closed(ws: ServerWebSocket, seen: list[int]) -> None:
    """A reader task: one get_message, which must end in ConnectionClosed (its code into ``seen``)."""
    try:
        await ws.get_message()
    except ConnectionClosed as exc:
        seen.append(exc.reason.code)


async def test_aclose_while_the_reader_waits_lets_the_reader_take_the_answer():
    ws, client = await _accepted()
    seen: list[int] = []
    reader = functools.partial(_read_until_closed, ws, seen)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ws.aclose, 1001)
        await trio.testing.wait_all_tasks_blocked()
        assert (await client.receive_some())[:4] == b"\x88\x02\x03\xe9"
        await client.send_all(frame(0x8, struct.pack("!H", 1001)))
    assert seen == [1001]


async def test_a_reader_that_comes_back_while_aclose_drains_waits_for_it():
    ws, client = await _accepted()
    seen: list[int] = []
    reader = functools.partial(_read_until_closed, ws, seen)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.aclose, 1000)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []  # it waits for aclose's read instead of reading beside it
        await client.send_all(frame(0x8, struct.pack("!H", 1000)))
    assert seen == [1000] and ws.closed.code == 1000


async def test_the_end_of_the_stream_is_1006():
    ws, client = await _accepted()
    await client.aclose()
    with pytest.raises(ConnectionClosed) as info:
        await ws.get_message()
    assert info.value.reason.code == 1006


@pytest.mark.parametrize(("data", "status"), [
    (request(version="12"), b"426"), (request(key=None), b"400"), (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n", b"431"), (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
])
async def test_a_bad_upgrade_request_gets_its_status(data, status):
    client, server = memory_stream_pair()
    await client.send_all(data)
    assert await read_request(FrameGuard(server, "peer:1"), limit=1000) is None
    assert (await client.receive_some()).split(b" ")[1] == status


# ---------------------------------------------------------------- the transport's reads


async def test_a_plain_socket_is_read_by_descriptor_waiting_only_once_it_is_empty():
    """FrameGuard reads a plain socket itself (frames.py ``_read``): what was sent comes in
    order across short reads, a read after an empty one waits for the peer, the end is b"",
    and a socket closed under a waiting or a later read raises, never reads a reused fd."""
    a, b = trio.socket.socketpair()
    guard, peer = FrameGuard(trio.SocketStream(a), "peer:1"), trio.SocketStream(b)
    await peer.send_all(b"0123456789")
    await trio.testing.wait_all_tasks_blocked()
    assert [await guard.receive_some(4) for _ in range(3)] == [b"0123", b"4567", b"89"]
    assert guard._drained

    async def late():
        await trio.sleep(0.05)
        await peer.send_all(b"late")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late)
        assert await guard.receive_some() == b"late"  # (waited for readability first)
    await peer.aclose()
    assert await guard.receive_some() == b""

    c, d = trio.socket.socketpair()
    guard, stream = FrameGuard(trio.SocketStream(c), "peer:2"), trio.SocketStream(c)
    async with trio.open_nursery() as nursery:
        async def waiting():
            with pytest.raises(trio.ClosedResourceError):
                await guard.receive_some()
        nursery.start_soon(waiting)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()  # closed by another task while the read waits
    with pytest.raises(trio.ClosedResourceError):
        await guard.receive_some()
    d.close()
