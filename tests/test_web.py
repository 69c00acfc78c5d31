"""Web apps as clients: the handshake policy (browser Origin, subprotocols, a key in the
handshake), TLS on both listeners, and CORS on the admin JSON. Real daemon, real sockets."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request

import pytest
import trio
from trio_websocket import ConnectionRejected, HandshakeError, open_websocket_url

from scheduler.edge import handshake
from scheduler.edge.handshake import Accept, Policy, Refuse
from scheduler.protocol import bearer_subprotocol

from .helpers import Peer

EVIL, APP = "https://evil.example", "https://app.example"
DEFAULT = Policy.from_settings("*", None)
KEY = (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")  # RFC 6455's example: 16 bytes


def negotiate(path, headers, offers, policy):
    """The decision for a request that carries a valid Sec-WebSocket-Key besides ``headers``."""
    return handshake.negotiate(path, [*headers, KEY], offers, policy)


# ---------------------------------------------------------------- the decision, case by case


def test_no_origin_no_offer_is_accepted_as_before():
    assert negotiate("/v1/session", [], (), DEFAULT) == Accept("/v1/session", None, None)
    assert negotiate("/v1/node?x=1", [], (), DEFAULT) == Accept("/v1/node", None, None)


def test_a_browser_never_opens_the_node_path_by_default():
    decision = negotiate("/v1/node", [(b"Origin", EVIL.encode())], (), DEFAULT)
    assert isinstance(decision, Refuse) and decision.status == 403 and decision.reason == "origin"
    allowed = Policy.from_settings("*", APP)
    assert isinstance(negotiate("/v1/node", [(b"origin", APP.encode())], (), allowed), Accept)


def test_session_origins_are_a_list_or_any():
    policy = Policy.from_settings(f"{APP}, http://localhost:3000", None)
    assert isinstance(negotiate("/v1/session", [(b"origin", b"HTTPS://APP.example/")], (), policy), Accept)
    assert isinstance(negotiate("/v1/session", [(b"origin", b"http://localhost:3000")], (), policy), Accept)
    assert negotiate("/v1/session", [(b"origin", EVIL.encode())], (), policy).status == 403
    assert negotiate("/v1/session", [(b"origin", b"null")], (), policy).status == 403
    assert isinstance(negotiate("/v1/session", [(b"origin", EVIL.encode())], (), DEFAULT), Accept)


def test_subprotocols_and_the_bearer_key():
    key = "k3y/with+odd=chars"
    decision = negotiate("/v1/session", [], ("scheduler.v1", bearer_subprotocol(key)), DEFAULT)
    assert decision == Accept("/v1/session", "scheduler.v1", key)
    assert negotiate("/v1/session", [], ("scheduler.v1",), DEFAULT) == Accept("/v1/session", "scheduler.v1", None)
    assert negotiate("/v1/session", [(b"Authorization", b"Bearer abc")], (), DEFAULT).api_key == "abc"
    for offers in (("chat",), (bearer_subprotocol(key),)):
        refused = negotiate("/v1/session", [], offers, DEFAULT)
        assert refused.status == 400 and refused.reason == "subprotocol"
    assert negotiate("/v1/session", [], ("scheduler.v1", "bearer.%%%"), DEFAULT).reason == "bad_bearer"
    assert handshake.shown(["scheduler.v1", bearer_subprotocol(key)]) == ["scheduler.v1", "bearer.***"]


def test_a_malformed_websocket_key_is_400():
    for keys in ([], [(b"sec-websocket-key", b"short")], [(b"sec-websocket-key", b"AAAAAAAAAAAAAAAAAAAAAAAAAAAA")],
                 [(b"sec-websocket-key", b"not base64 at all!!!!!!!")], [KEY, KEY]):
        refused = handshake.negotiate("/v1/session", keys, (), DEFAULT)
        assert isinstance(refused, Refuse) and refused.status == 400 and refused.reason == "bad_key", keys
    assert isinstance(handshake.negotiate("/v1/session", [KEY], (), DEFAULT), Accept)


def test_unknown_path_is_404():
    assert negotiate("/v2/x", [], (), DEFAULT).status == 404


# ---------------------------------------------------------------- over real sockets


async def _refused(url: str, **kwargs) -> int:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, **kwargs):
            pass
    return info.value.status_code


async def test_cross_site_hijacking_is_refused_and_logged(start_daemon, caplog):
    daemon = await start_daemon(allowed_origins=APP)
    url = daemon.ws_url
    assert await _refused(url + "/v1/node", extra_headers=[(b"Origin", APP.encode())]) == 403
    assert await _refused(url + "/v1/session", extra_headers=[(b"Origin", EVIL.encode())]) == 403
    async with open_websocket_url(url + "/v1/session", extra_headers=[(b"Origin", APP.encode())]) as ws:
        await Peer(ws).send(type="session_init", src_lang="zh", tgt_langs=["en"])
        reply = await Peer(ws).recv()
        assert reply["type"] == "error" and reply["code"] == "UNSUPPORTED_LANG_PAIR"  # accepted: past the handshake
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "handshake_refused" or "handshake_refused" in r.getMessage()]
    assert len(refusals) == 2, [r.getMessage() for r in caplog.records]
    assert daemon.metrics.handshakes_refused_total.labels("origin")._value.get() == 2


async def test_subprotocol_answered_and_the_key_travels_in_it(start_daemon, nursery):
    from .helpers import start_node

    daemon = await start_daemon(client_api_keys="secret-1,secret-2")
    await start_node(nursery, daemon, node_id="n1")
    offers = ["scheduler.v1", bearer_subprotocol("secret-2")]
    async with open_websocket_url(daemon.ws_url + "/v1/session", subprotocols=offers) as ws:
        assert ws.subprotocol == "scheduler.v1"  # the key is never echoed
        await Peer(ws).send(type="session_init", src_lang="zh", tgt_langs=["en"])
        assert (await Peer(ws).recv())["type"] == "session_ready"
    async with open_websocket_url(daemon.ws_url + "/v1/session", subprotocols=["scheduler.v1", bearer_subprotocol("nope")]) as ws:
        await Peer(ws).send(type="session_init", src_lang="zh", tgt_langs=["en"])
        assert (await Peer(ws).recv())["code"] == "UNAUTHORIZED"
    assert await _refused(daemon.ws_url + "/v1/session", subprotocols=["chat"]) == 400


async def test_tls_serves_wss_and_https(start_daemon, nursery, tls_certs):
    from .helpers import start_node

    cert, key, client = tls_certs
    daemon = await start_daemon(tls_cert=cert, tls_key=key)
    assert daemon.ws_url.startswith("wss://")
    await start_node(nursery, daemon, node_id="n1", ssl_context=client)
    async with open_websocket_url(daemon.ws_url + "/v1/session", ssl_context=client) as ws:
        await Peer(ws).send(type="session_init", src_lang="zh", tgt_langs=["en"])
        assert (await Peer(ws).recv())["type"] == "session_ready"

    def get(path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"https://127.0.0.1:{daemon.admin_port}{path}", context=client, timeout=5) as resp:
            return resp.status, resp.read()

    assert await trio.to_thread.run_sync(get, "/healthz") == (200, b"ok\n")
    # a cleartext client gets no WebSocket from the TLS port (the server drops it after its
    # handshake timeout; the client here gives up first)
    opened = False
    with trio.move_on_after(2), contextlib.suppress(HandshakeError, trio.BrokenResourceError):
        async with open_websocket_url(daemon.ws_url.replace("wss://", "ws://") + "/v1/session"):
            opened = True
    assert not opened


async def test_admin_json_is_readable_cross_site_only_for_listed_origins(start_daemon):
    daemon = await start_daemon(admin_cors_origins="https://dash.example")

    def request(path: str, origin: str | None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{daemon.admin_port}{path}", method=method,
                                     headers={"Origin": origin} if origin else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    status, headers, body = await trio.to_thread.run_sync(request, "/status", "https://dash.example")
    assert status == 200 and headers["access-control-allow-origin"] == "https://dash.example" and json.loads(body)
    assert "vary" in headers
    status, headers, _ = await trio.to_thread.run_sync(request, "/status", EVIL)
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = await trio.to_thread.run_sync(request, "/healthz", "https://dash.example", "OPTIONS")
    assert status == 204 and "GET" in headers["access-control-allow-methods"]
    _, headers, _ = await trio.to_thread.run_sync(request, "/metrics", "https://dash.example")
    assert "access-control-allow-origin" not in headers  # metrics are for Prometheus, not pages
