"""The WebSocket handshake policy: path, browser ``Origin``, subprotocols, a key in the handshake.

A pure decision on the request (no I/O), so that every case is a plain unit test; the
server performs it (``server._router``). protocol.md "Handshake" is the contract:

- **Path**: ``/v1/session`` or ``/v1/node``; anything else is 404.
- **Origin** (cross-site WebSocket hijacking): a browser always sends ``Origin``; other
  clients usually send none and are not affected. ``/v1/session`` accepts an origin listed
  in ``allowed_origins`` (``*``: any; the default). ``/v1/node`` accepts one only if it is
  listed in ``node_allowed_origins`` (default: none), so a web page can never register as
  a worker and receive users' audio. A refusal is HTTP 403.
- **Subprotocols**: none offered, none answered (as before). An offer that includes
  ``scheduler.v1`` is answered ``scheduler.v1``. An offer ``bearer.<base64url(key)>`` next
  to it carries an API key (browsers cannot set ``Authorization``); it is never echoed and
  never logged. An offer without ``scheduler.v1`` is refused with HTTP 400 (a browser would
  otherwise drop the connection with 1006 and nobody would know why).
- **Sec-WebSocket-Key** (RFC 6455 4.2.1): base64 of exactly 16 bytes, or HTTP 400 (wsproto
  only checks that the header is there; a wrong ``Sec-WebSocket-Version`` it answers itself,
  426 with the version it speaks).
- **API key**: ``Authorization: Bearer KEY`` or the bearer subprotocol; ``session_init``
  may still carry ``api_key`` (the client gateway checks whichever came).
"""

from __future__ import annotations

import base64
import binascii

import attrs

from scheduler.ops.origins import OriginPolicy, bearer_header, header
from scheduler.protocol import BEARER_PREFIX, SUBPROTOCOL

SESSION_PATH, NODE_PATH = "/v1/session", "/v1/node"


@attrs.frozen
class Accept:
    path: str
    subprotocol: str | None  # what to answer (None: the client offered none)
    api_key: str | None  # presented in the handshake (Authorization or bearer subprotocol)


@attrs.frozen
class Refuse:
    status: int
    body: str  # for the peer
    reason: str  # for the log line (never a key)


@attrs.frozen
class Policy:
    sessions: OriginPolicy
    nodes: OriginPolicy

    @classmethod
    def from_settings(cls, allowed_origins: str | None, node_allowed_origins: str | None) -> Policy:
        return cls(OriginPolicy(allowed_origins), OriginPolicy(node_allowed_origins))


def _key_of(offer: str) -> str | None:
    """The key carried by one ``bearer.`` offer; None if it does not decode."""
    raw = offer[len(BEARER_PREFIX):]
    try:
        return base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def shown(offers: tuple[str, ...] | list[str]) -> list[str]:
    """The offers as they may be logged: a bearer offer's key is hidden."""
    return [BEARER_PREFIX + "***" if o.startswith(BEARER_PREFIX) else o[:40] for o in offers]


def valid_key(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the one ``Sec-WebSocket-Key`` header is base64 of exactly 16 bytes."""
    keys = [value for name, value in headers if name.lower() == b"sec-websocket-key"]
    if len(keys) != 1:
        return False
    try:
        return len(base64.b64decode(keys[0].strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def negotiate(path: str, headers: list[tuple[bytes, bytes]], offers: tuple[str, ...] | list[str], policy: Policy) -> Accept | Refuse:
    if not valid_key(headers):
        return Refuse(400, "Sec-WebSocket-Key must be base64 of 16 bytes\n", "bad_key")
    path = path.split("?", 1)[0]
    if path not in (SESSION_PATH, NODE_PATH):
        return Refuse(404, f"unknown path; use {SESSION_PATH} or {NODE_PATH}\n", "unknown_path")
    origin = header(headers, b"origin")
    if origin is not None:
        allowed = policy.sessions if path == SESSION_PATH else policy.nodes
        if not allowed.allows(origin):
            return Refuse(403, f"origin {origin[:100]} is not allowed on {path}\n", "origin")
    key = bearer_header(headers)
    if not offers:
        return Accept(path, None, key)
    if SUBPROTOCOL not in offers:
        return Refuse(400, f"no supported subprotocol offered; offer {SUBPROTOCOL}\n", "subprotocol")
    for offer in offers:
        if offer.startswith(BEARER_PREFIX):
            key = _key_of(offer)
            if key is None:
                return Refuse(400, "the bearer subprotocol does not hold a base64url key\n", "bad_bearer")
    return Accept(path, SUBPROTOCOL, key)
