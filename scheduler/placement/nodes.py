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

ASSIGNED_KEPT = 2  # NodeConnection.assigned keeps at most this many times max_jobs stamps


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
        self.heartbeat_stale = False  # Redis said this is not the node's connection (logged once)
        self.end_reason: str | None = None  # set by the worker when it closed the node ("drained")
        self.outbox_send, self.outbox = trio.open_memory_channel(2 * max_jobs + 16)
        # job_id -> when its job_assign was queued for this node (trio clock); popped by its
        # answer or its job_cancel. Its size is the jobs this connection sees at the node (free
        # slots), and the answer's time at the node is now minus the stamp (overhead metric).
        self.assigned: dict[str, float] = {}

    def send_nowait(self, msg: Any) -> bool:
        try:
            self.outbox_send.send_nowait(msg)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        job_id = getattr(msg, "job_id", "")
        if job_id and msg.TYPE == JobAssign.TYPE:
            self.assigned[job_id] = trio.current_time()
            if len(self.assigned) > ASSIGNED_KEPT * self.max_jobs:  # a job whose lease ran out and was never answered
                del self.assigned[next(iter(self.assigned))]
        elif job_id:
            self.assigned.pop(job_id, None)
        return True

    def answered(self, job_id: str) -> float | None:
        """The node answered ``job_id``: seconds since its job_assign was queued (None if this
        connection did not assign it)."""
        sent = self.assigned.pop(job_id, None)
        return None if sent is None else trio.current_time() - sent


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

    def slots_by_pair(self) -> dict[tuple[str, str], dict[str, int]]:
        """Per language pair the nodes here serve: their ``slots`` (max_jobs) and the ``free``
        ones as their connections see them (none on a draining or saturated node); read by the scrape (ops/metrics.py)."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for conn in self._nodes.values():
            if conn.registration is None:
                continue
            free = 0 if conn.draining or conn.saturated else max(0, conn.max_jobs - len(conn.assigned))
            for src, tgt in {(src, tgt) for src, tgt in conn.registration.lang_pairs}:
                numbers = out.setdefault((src, tgt), {"slots": 0, "free": 0})
                numbers["slots"] += conn.max_jobs
                numbers["free"] += free
        return out

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
