"""Hostile input stays inside its own connection (docs/security.md). A real daemon on loopback,
real Valkey, hostile bytes from raw sockets (tests/rawws.py); after each attack a witness
session that was open throughout must still be served, in order."""

from __future__ import annotations

import pytest
import trio
from trio.testing import memory_stream_pair
from trio_websocket import wrap_server_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request, TextMessage
from wsproto.utilities import LocalProtocolError

from scheduler.edge.frames import FrameScanner
from scheduler.protocol import CLOSE_TOO_BIG

from .helpers import session, speak, start_node
from .rawws import RawPeer, close, frame, request

MB = 1_000_000


async def _served(witness) -> None:
    """The witness session still gets its next result, SUCCESS."""
    await speak(witness)
    await witness.send(type="finalize")
    result, _ = await witness.recv_until("result", timeout=10)
    assert result["status"] == "SUCCESS", result


def _failed(running, listener: str, reason: str) -> float:
    return running.metrics.connections_failed_total.labels(listener, reason)._value.get()


async def test_the_issue_29_sequence_ends_one_connection_not_the_daemon(daemon, nursery):
    """1.5 MB then, without reading, 3 MB on /v1/session before session_init: the daemon used
    to exit with status 1 (wsproto's LocalProtocolError inside trio-websocket's reader)."""
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon) as witness:
        for _ in range(3):
            raw = await RawPeer.connect(daemon.ws_port)
            await raw.upgrade()
            await raw.send(frame(0x1, b"a" * (3 * MB // 2)) + frame(0x1, b"b" * (3 * MB)))
            with trio.fail_after(10):
                code, _ = await raw.close_code()
            assert code == CLOSE_TOO_BIG
            await raw.aclose()
        await _served(witness)


@pytest.mark.parametrize("order", ["daemon_closing_then_oversized", "client_close_then_oversized",
                                   "oversized_header_then_client_close", "oversized_in_fragments"])
async def test_a_close_handshake_racing_an_oversized_message(daemon, nursery, order):
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon) as witness:
        raw = await RawPeer.connect(daemon.ws_port)
        await raw.upgrade()
        if order == "daemon_closing_then_oversized":
            await raw.send(frame(0x1, b"a" * (3 * MB // 2)))  # FRAME_TOO_LARGE: the daemon starts its 1009 close
            with trio.fail_after(10):
                code, texts = await raw.close_code()
            assert code == CLOSE_TOO_BIG and b"FRAME_TOO_LARGE" in texts[0]
            await raw.send(frame(0x2, b"b" * (3 * MB)))  # instead of answering the close
        elif order == "client_close_then_oversized":
            await raw.send(close(1000) + frame(0x2, b"b" * (3 * MB)))
        elif order == "oversized_header_then_client_close":
            await raw.send(frame(0x2, b"", length=3 * MB) + close(1000))
        else:
            await raw.send(b"".join(frame(0x2 if i == 0 else 0x0, b"c" * 900_000, fin=False) for i in range(3)))
        with trio.fail_after(10):
            code, _ = await raw.close_code()
            while await raw.next_frame() is not None:  # and then the daemon closes TCP
                pass
        assert code in {CLOSE_TOO_BIG, 1000, None} if order == "daemon_closing_then_oversized" else code in {CLOSE_TOO_BIG, 1000}
        await raw.aclose()
        await _served(witness)
    assert _failed(daemon, "session", "websocket_library") == 0


@pytest.mark.parametrize("path", ["/v1/session", "/v1/node"])
@pytest.mark.parametrize(("bytes_", "expected"), [
    (frame(0x1, b"\xff\xfe{}"), 1007),  # invalid UTF-8 in a text frame
    (frame(0x1, b"{}", rsv=4), 1002),  # an RSV bit without an extension
    (frame(0x1, b"{}", mask=None), 1002),  # an unmasked client frame
    (frame(0x9, b"x", fin=False), 1002),  # a fragmented control frame
    (frame(0x9, b"x" * 126), 1002),  # a control frame over 125 bytes
    (close(999), 1002),  # a close code RFC 6455 does not allow
    (frame(0x3, b"x"), 1002),  # a reserved opcode
    (frame(0x2, b"", length=3 * MB), CLOSE_TOO_BIG),  # a header announcing 3 MB, then nothing
    (frame(0x2, b"", length=2 ** 40), CLOSE_TOO_BIG),  # ... or 2^40 bytes
], ids=["bad_utf8", "rsv", "unmasked", "fragmented_control", "long_control", "bad_close_code", "reserved_opcode",
        "header_3mb", "header_2e40"])
async def test_protocol_errors_get_their_close_code(daemon, path, bytes_, expected):
    raw = await RawPeer.connect(daemon.ws_port)
    await raw.upgrade(path)
    await raw.send(bytes_)
    with trio.fail_after(3):
        code, _ = await raw.close_code()
    assert code == expected
    await raw.aclose()


@pytest.mark.parametrize(("kwargs", "status"), [
    (dict(key="c2hvcnQ="), 400),  # base64, but not 16 bytes
    (dict(key="%%%not-base64%%%%%%%%%%"), 400),
    (dict(key=None), 400),
    (dict(version="12"), 426),  # wsproto answers a version it does not speak itself
    (dict(host="xn--a"), 400),  # not IDNA: wsproto's decode raises inside trio-websocket's reader
])
async def test_malformed_handshakes_get_an_http_refusal(daemon, nursery, kwargs, status):
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon) as witness:
        raw = await RawPeer.connect(daemon.ws_port)
        await raw.send(request(**kwargs))
        with trio.fail_after(5):
            assert await raw.http_status() == status
        await raw.aclose()
        await _served(witness)
    if "host" in kwargs:  # the one case the error boundary had to contain: counted and logged once
        assert _failed(daemon, "websocket", "bad_encoding") == 1


async def test_the_admin_listener_contains_a_failing_request(daemon, monkeypatch):
    """An exception while answering one admin request ends that connection only."""
    import urllib.request

    from scheduler.ops.admin import AdminServer

    calls = []

    async def broken(self, method, path):
        calls.append(path)
        raise RuntimeError("boom")

    monkeypatch.setattr(AdminServer, "route", broken)
    with pytest.raises(Exception):  # noqa: B017 (the connection is cut: whatever urllib makes of it)
        await trio.to_thread.run_sync(lambda: urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin_port}/status", timeout=5))
    monkeypatch.undo()
    body = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin_port}/healthz", timeout=5).read())
    assert body == b"ok\n" and calls == ["/status"]
    assert _failed(daemon, "admin", "internal") == 1


async def test_trio_websocket_still_raises_on_an_oversized_message_while_closing():
    """Pins the library behaviour FrameGuard works around: a server connection that is
    closing (LOCAL_CLOSING) and meets a message over ``max_message_size`` tries to send a
    1009 close, which wsproto refuses with ``LocalProtocolError`` inside the library's own
    reader task. When this test fails, trio-websocket fixed it upstream: say so in
    docs/security.md (the guard's header check stays: it refuses before reading the payload)."""
    server, client_stream = memory_stream_pair()
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(client.send(Request(host="x", target="/")))
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            ws_request = await wrap_server_stream(nursery, server, max_message_size=100)
            ws = await ws_request.accept()
            client.receive_data(await client_stream.receive_some())
            nursery.start_soon(ws.aclose, 1000)
            await trio.testing.wait_all_tasks_blocked()
            await client_stream.send_all(client.send(TextMessage(data="x" * 200)))
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert info.group_contains(LocalProtocolError)


async def test_log_lines_name_the_peer_by_address(daemon, nursery, caplog):
    """The gateways log ``peer`` from the connection (trio-websocket asks the stream, which is
    our guard now): it must still read ``address:port``."""
    import logging
    import re

    caplog.set_level(logging.INFO)
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon):
        pass
    peers = [r.fields["peer"] for r in caplog.records if getattr(r, "event", None) in ("session_started", "node_joined")]
    assert len(peers) == 2 and all(re.fullmatch(r"127\.0\.0\.1:\d+", p) for p in peers), peers


# ---------------------------------------------------------------- the scanner alone


def _stream(*frames: bytes) -> bytes:
    return request() + b"".join(frames)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 64])
def test_the_scanner_reads_headers_split_anywhere(cut):
    data = _stream(frame(0x1, b"x" * 300), frame(0x9, b"p"), frame(0x2, b"y" * 70_000), frame(0x2, b"", length=5000))
    scanner = FrameScanner(limit=4096)
    results = [scanner.feed(data[i:i + cut]) for i in range(0, len(data), cut)]
    assert results[-1] == CLOSE_TOO_BIG and results.count(None) < len(results)
    assert FrameScanner(limit=100_000).feed(data) is None


def test_the_scanner_adds_up_fragments_and_resets_at_fin():
    ok = _stream(*(frame(0x1 if i == 0 else 0x0, b"z" * 400, fin=(i == 2)) for i in range(3)), frame(0x1, b"z" * 1000))
    assert FrameScanner(limit=1200).feed(ok) is None
    assert FrameScanner(limit=1199).feed(ok) == CLOSE_TOO_BIG
    interleaved = _stream(frame(0x1, b"z" * 800, fin=False), frame(0x9, b"p" * 125), frame(0x0, b"z" * 300))
    assert FrameScanner(limit=1100).feed(interleaved) is None  # a ping between fragments is not counted


async def test_the_guard_reads_a_whole_audio_frame_at_once():
    """trio-websocket asks its stream for 4 KiB at a time; the guard reads up to RECEIVE_BYTES,
    so a 200 ms frame (6,400 bytes of 16 kHz audio) is one read and one parse, not two
    (docs/performance.md: 11 % more frames per daemon CPU-second)."""
    from scheduler.edge.frames import RECEIVE_BYTES, FrameGuard

    client, server = memory_stream_pair()
    guard = FrameGuard(server, limit=1 << 20)
    await client.send_all(b"GET / HTTP/1.1\r\n\r\n" + frame(0x2, b"\x00" * 6400))
    got = await guard.receive_some(4096)
    assert len(got) > 6400 and RECEIVE_BYTES >= 65536
