"""Lists of browser origins: who may open a WebSocket path (edge/handshake.py) or read the
admin JSON cross-site (ops/admin.py, CORS); and the request-header lookups both use
(``header``, and ``bearer_header`` for an API key in the handshake or the admin token)."""

from __future__ import annotations


class OriginPolicy:
    """A comma list of origins (``scheme://host[:port]``), ``*`` for any, empty for none."""

    def __init__(self, spec: str | None) -> None:
        items = [_normal(o) for o in (spec or "").split(",") if o.strip()]
        self.any = "*" in items
        self.origins = frozenset(o for o in items if o != "*")

    def allows(self, origin: str) -> bool:
        return self.any or _normal(origin) in self.origins

    def __repr__(self) -> str:
        return "OriginPolicy(*)" if self.any else f"OriginPolicy({sorted(self.origins)})"


def _normal(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value of request header ``name`` (lower-case bytes), if present: from a WebSocket
    handshake or an h11 request alike."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def bearer_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, if any."""
    value = header(headers, b"authorization")
    if value is not None and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None
