"""Node heartbeats, written to Redis in batches: one ``heartbeats.lua`` call per node shard per
batch, instead of one call per heartbeat (docs/redis.md, "Heartbeats, batched").

A node's reader hands each heartbeat over with :meth:`HeartbeatWriter.due` (never blocks, never
waits for Redis); the newest load and load score of every node with a heartbeat due are written
together, at most ``window_s`` (a quarter of ``--heartbeat-interval-ms``) after the first of them
arrived; after a batch Redis did not take (an outage), the next one goes as soon as a heartbeat
is due, so that the nodes do not look silent any longer than the outage made them. What a
write says back (written, another connection's, Redis lost the node, Redis out) goes to
``settle`` per node, in the writer's task. A node whose connection closed meanwhile is
left out (its close took it offline; a late heartbeat would only be refused).

:meth:`run` is the writer's task (the daemon starts it beside the dispatcher); it ends when
cancelled. An unexpected error costs one batch (logged ``heartbeat_batch_failed``, ERROR):
the nodes' next heartbeats are written again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from scheduler.ops.logs import event
from scheduler.placement.nodes import NodeConnection
from scheduler.store import lua
from scheduler.store.scheduling import SchedulingClient

log = logging.getLogger("scheduler.node_gateway")  # (the heartbeats' events are the node gateway's)


class HeartbeatWriter:
    def __init__(self, scheduling: SchedulingClient, window_s: float, beat: Callable[[NodeConnection], lua.Beat],
                 settle: Callable[[NodeConnection, lua.Beat, Any], Awaitable[None]],
                 live: Callable[[NodeConnection], bool]) -> None:
        """``beat``: what to write for a node now; ``settle``: what to do with a node's reply
        (or the exception its call raised), given what was written; ``live``: whether the
        connection is still the node's here."""
        self._scheduling = scheduling
        self.window_s = window_s
        self._beat = beat
        self._settle = settle
        self._live = live
        self._due: dict[int, NodeConnection] = {}  # id(conn) -> conn, each at most once per batch
        self._wake = trio.Event()
        self._overdue = False  # the last batch was not written (Redis out): the next goes without waiting
        self.on_written: Callable[[int], None] = lambda count: None  # a batch written, with this many heartbeats Redis
        # took (the metrics)

    def due(self, conn: NodeConnection) -> None:
        """``conn`` sent a heartbeat: write its newest values with the next batch."""
        self._due[id(conn)] = conn
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            if not self._overdue:
                await trio.sleep(self.window_s)  # the heartbeats that come within the window join this batch
            self._wake = trio.Event()
            batch, self._due = [c for c in self._due.values() if self._live(c)], {}
            self._overdue = False
            try:
                if batch:
                    await self.write(batch)
            except Exception:  # a bug here must cost one batch of heartbeats (the next ones write again), never the daemon
                event(log, "heartbeat_batch_failed", logging.ERROR, exc_info=True, nodes=len(batch))

    async def write(self, conns: list[NodeConnection]) -> None:
        """Write these nodes' heartbeats now (one call per node shard) and settle each reply."""
        beats = [self._beat(c) for c in conns]
        replies = await self._scheduling.heartbeats(beats)
        failed = sum(isinstance(r, BaseException) for r in replies)
        self._overdue = failed > 0
        if failed < len(conns):
            self.on_written(len(conns) - failed)
        for conn, beat, reply in zip(conns, beats, replies, strict=True):
            if self._live(conn):
                await self._settle(conn, beat, reply)
