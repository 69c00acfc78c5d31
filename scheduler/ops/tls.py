"""TLS for both listeners: ``--tls-cert`` / ``--tls-key`` turn ws:// into wss:// and the
admin's http:// into https://, with :class:`trio.SSLListener` over the same sockets."""

from __future__ import annotations

import ssl
from collections.abc import Sequence

import trio


def server_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server context for the PEM chain and key, or None when TLS is off. Modern defaults
    (TLS 1.2 and up, the default ciphers); ALPN offers http/1.1 only."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def wrap(listeners: Sequence[trio.SocketListener], context: ssl.SSLContext | None) -> list:
    """The listeners as they are (no TLS), or each behind an SSLListener."""
    if context is None:
        return list(listeners)
    return [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]
