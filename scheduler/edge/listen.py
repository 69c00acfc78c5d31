"""The WebSocket listener's sockets.

Without ``reuse_port`` this is what ``trio.open_tcp_listeners`` makes. With it, each socket
is bound with ``SO_REUSEPORT`` as well, so several daemon processes on one box can listen on
the same port and the kernel spreads new connections over them (Linux: by a hash of the
peer's address and port). A process that dies takes only its own connections with it; its
clients resume on a sibling (docs/protocol.md, "Resume").
"""

from __future__ import annotations

import socket

import trio


async def open_listeners(host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> list[trio.SocketListener]:
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("SO_REUSEPORT is not available on this system")
    listeners = []
    for family, kind, proto, _, address in await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                          flags=socket.AI_PASSIVE):
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind(address)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        listeners.append(trio.SocketListener(sock))
    return listeners
