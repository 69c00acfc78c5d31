"""Hostile input stays inside its own connection (docs/security.md). A real daemon on loopback,
real Valkey, hostile bytes from raw sockets (tests/rawws.py); after each attack a witness
session that was open throughout must still be served, in order."""

from __future__ import annotations

import pytest
import trio

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
    counted = daemon.metrics.websocket_protocol_errors_total.labels(path.rsplit("/", 1)[1], str(expected))
    before = counted._value.get()
    raw = await RawPeer.connect(daemon.ws_port)
    await raw.upgrade(path)
    await raw.send(bytes_)
    with trio.fail_after(3):
        code, _ = await raw.close_code()
    assert code == expected
    await raw.aclose()
    with trio.fail_after(3):  # counted once the connection's handler is done
        while counted._value.get() == before:
            await trio.sleep(0.01)
    assert counted._value.get() == before + 1


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


async def test_log_lines_name_the_peer_by_address(daemon, nursery, caplog):
    """The gateways log ``peer`` from the connection (the guard's name for it): it must read
    ``address:port``."""
    import logging
    import re

    caplog.set_level(logging.INFO)
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon):
        pass
    peers = [r.fields["peer"] for r in caplog.records if getattr(r, "event", None) in ("session_started", "node_joined")]
    assert len(peers) == 2 and all(re.fullmatch(r"127\.0\.0\.1:\d+", p) for p in peers), peers
