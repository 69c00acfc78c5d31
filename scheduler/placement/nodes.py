"""The worker nodes connected to this instance: :class:`NodeConnection` (one socket, its
outbox) and :class:`NodeRegistry` (node id -> connection). The node gateway adds and removes
them; the router (``cluster/routing.py``) hands jobs to their outboxes, and
:class:`NodeRoute` is what the dispatcher needs of it."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import trio

from scheduler.ops.metrics import Metrics
from scheduler.protocol import JobAssign, Register


class NodeConnection:
    """A registered node on this instance. ``outbox`` holds messages for its writer.

    Capacity: ``2 * max_jobs + 16`` (every held job can get an assign and a cancel). When
    it is full the node is not reading: :meth:`send_nowait` returns False and the caller
    treats the node as unreachable for that job.
    """

    def __init__(self, node_id: str, max_jobs: int, registration: Register | None = None, conn_id: str = "") -> None:
        self.node_id = node_id
        self.conn_id = conn_id  # this socket; written by register_node, returned with each placement
        self.max_jobs = max_jobs
        self.registration = registration  # written again if Redis forgot the node (restart without data)
        self.draining = False
        self.last_seen = trio.current_time()  # the last frame from the node (its liveness)
        self.held = False  # the reader waits for room in the worker's queue: the daemon's wait, not the node's silence
        self.load: dict[str, Any] | None = None  # the newest heartbeat's load, written by the worker
        self.load_score: float | None = None  # ... and its load score (None: the node reports none)
        self.saturated = False  # its score above --node-load-threshold, as last written to Redis
        self.heartbeat_queued = False  # a heartbeat is in the worker's queue (one at a time)
        self.end_reason: str | None = None  # set by the worker when it closed the node ("drained")
        self.outbox_send, self.outbox = trio.open_memory_channel(2 * max_jobs + 16)

    def send_nowait(self, msg: object) -> bool:
        try:
            self.outbox_send.send_nowait(msg)
            return True
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False


class NodeRegistry:
    """node_id -> :class:`NodeConnection` held by this instance."""

    def __init__(self, metrics: Metrics) -> None:
        self._nodes: dict[str, NodeConnection] = {}
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._nodes

    def get(self, node_id: str) -> NodeConnection | None:
        return self._nodes.get(node_id)

    def all(self) -> list[NodeConnection]:
        return list(self._nodes.values())

    def add(self, conn: NodeConnection) -> None:
        self._nodes[conn.node_id] = conn
        self._metrics.nodes_online.set(len(self._nodes))

    def remove(self, conn: NodeConnection) -> None:
        if self._nodes.get(conn.node_id) is conn:
            del self._nodes[conn.node_id]
            self._show_score(conn.node_id, None)
        self._metrics.nodes_online.set(len(self._nodes))
        self._metrics.nodes_saturated.set(sum(c.saturated for c in self._nodes.values()))

    def note_load(self, conn: NodeConnection, score: float | None, saturated: bool) -> bool:
        """The node's load score and saturation as just written to Redis: the gauges follow.
        Returns whether its saturation changed."""
        self._show_score(conn.node_id, score)
        changed, conn.saturated = conn.saturated != saturated, saturated
        if changed:
            self._metrics.nodes_saturated.set(sum(c.saturated for c in self._nodes.values()))
        return changed

    def _show_score(self, node_id: str, score: float | None) -> None:
        if score is not None:
            self._metrics.node_load_score.labels(node_id).set(score)
        else:
            with contextlib.suppress(KeyError):  # (a node that reported none has no series)
                self._metrics.node_load_score.remove(node_id)


class NodeRoute(Protocol):
    """How the dispatcher hands a placed job to its node (the real one: ``cluster/routing.py``)."""

    def node_is_here(self, node_id: str) -> bool: ...

    def to_node_here(self, node_id: str, assign: JobAssign) -> bool:
        """To a node connected here; False if it is not, or is not reading."""

    async def to_node(self, node_id: str, assign: JobAssign) -> bool:
        """Here first, else over the relay to the instance holding the node; False: unreachable."""
