"""A TCP relay that can hold back what one side sends: replication lag on demand.

Replicas follow the primary through :class:`HeldLink` (``REPLICAOF 127.0.0.1 <link port>``).
While :meth:`hold` is on, what the primary sends is kept here instead of forwarded (the
replicas fall behind and cannot acknowledge it: ``WAIT`` times out). When the primary dies,
what was kept is dropped with the connection: the writes a failover loses under
asynchronous replication. Threads, because the servers on either side are other processes.
"""

from __future__ import annotations

import socket
import threading


class HeldLink:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.held = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.held.set()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(upstream, downstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(downstream, upstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_primary: bool) -> None:
        kept = bytearray()
        try:
            while data := source.recv(65536):
                if from_primary and self.held.is_set():
                    kept += data  # never sent on: lost when the primary dies
                    continue
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
