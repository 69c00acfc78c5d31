"""Node gateway: one ``/v1/node`` WebSocket -> one registered worker node.

Per connection: the first message must be ``register`` (token checked in constant time when
``--node-token`` is set; a node id already connected here is refused with
``DUPLICATE_NODE_ID``); then four tasks run in the connection's nursery:

* the reader: reads and parses frames and never waits for Redis, so the node's liveness is
  measured from frames arriving at its socket, not from the daemon's own Redis work. A
  heartbeat only records the node's load and load score and tells the heartbeat writer
  (edge/heartbeats.py: the nodes' heartbeats are written in batches, one Redis call per node
  shard, with each node's newest values); ``job_result`` and ``drain`` go to the worker's queue (capacity
  ``2 * max_jobs + 16``; when it is full the reader waits, and that wait is the daemon's,
  not the node's silence);
* the worker: does the Redis work of those messages in order. An answer is kept until
  ``complete_task`` gave its outcome: a call that timed out or found Redis unavailable
  (stalled, full, failing over) is repeated with a bounded backoff for up to twice
  ``result_deadline_ms``, the longest its session waits for it (``resilient.until_known``;
  the repeat is idempotent), so a Redis stall delays answers and loses none;
* the writer (``job_assign`` / ``job_cancel`` from the node's outbox);
* a liveness watchdog that closes a node silent for ``node_ttl_ms``.

Answers are accepted only through ``complete_task`` (right node, current attempt, once) and
then routed to their session. When the socket closes, the answers it delivered are stored
first (bounded by the same budget), then the node is marked offline and its jobs are
dispatched again to other nodes (attempt + 1) by the dispatcher.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import trio

from scheduler.cluster.relay import encode_answer
from scheduler.edge import wsutil
from scheduler.edge.heartbeats import HeartbeatWriter
from scheduler.edge.wsconn import ServerWebSocket
from scheduler.jobs import JobOutcome
from scheduler.ops import secrets
from scheduler.ops.logs import event
from scheduler.placement.nodes import NodeConnection, NodeRegistry
from scheduler.protocol import (
    BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    DUPLICATE_NODE_ID,
    NOT_REGISTERED,
    UNAUTHORIZED,
    Drain,
    Heartbeat,
    JobResult,
    ProtocolError,
    Register,
    Registered,
    Translation,
    parse_node,
    redis_unavailable,
)
from scheduler.store import lua
from scheduler.store.redis_adapter import RedisUnavailable, ScriptError, UnknownJob
from scheduler.store.resilient import until_known

log = logging.getLogger("scheduler.node_gateway")

ANSWER_KEEP_EXTRA_S = 60  # an answer is kept this long past the result deadline (complete_task)


class NodeGateway(wsutil.Gateway):
    side = "node"
    parse = staticmethod(parse_node)

    def __init__(self, *, nodes: NodeRegistry, **deps: Any) -> None:
        super().__init__(**deps)
        self._nodes = nodes
        # per node id: its registration's Redis writes and an old connection's clean-up run one
        # at a time, and the clean-up knows whether a newer connection registered meanwhile
        self._locks: dict[str, trio.Lock] = {}
        self._latest: dict[str, str] = {}  # node id -> conn_id of the last registration written here
        self.heartbeats = HeartbeatWriter(self._scheduling, self.settings.heartbeat_interval_ms / 4000, self._beat,
                                          self._heartbeat_written, lambda conn: self._nodes.get(conn.node_id) is conn)
        self.heartbeats.on_written = self._count_heartbeats

    async def handle(self, ws: ServerWebSocket) -> None:
        peer = wsutil.peer(ws)
        conn_id = uuid.uuid4().hex[:16]
        reg = await self.first_message(ws, peer, lambda message: self._accept_register(message, conn_id))
        if reg is None:
            return
        conn = NodeConnection(reg.node_id, reg.max_jobs, reg, conn_id)
        # Close semantics: the reader owns the send side and closes it when it ends; the
        # worker then finishes what is queued (the node's last answers) and returns.
        work_send, work = trio.open_memory_channel[JobResult | Drain](2 * reg.max_jobs + 16)
        self._nodes.add(conn)
        event(log, "node_joined", node_id=reg.node_id, peer=peer, max_jobs=reg.max_jobs,
              pools=",".join(sorted({p for p, _, _ in reg.pool_pairs()})))
        reason = "disconnected"
        try:
            await wsutil.send(ws, Registered(node_id=reg.node_id, heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
                                             node_ttl_ms=self.settings.node_ttl_ms))
            self._dispatcher.slot_freed()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wsutil.pump, ws, conn.outbox, peer)
                nursery.start_soon(self._watchdog, ws, conn, nursery.cancel_scope)
                worker_done = trio.Event()
                nursery.start_soon(self._worker, ws, conn, work, worker_done)
                async with work_send:
                    reason = await self._reader(ws, conn, work_send)
                with trio.move_on_after(self._answer_budget_s):  # the answers it delivered, stored before its jobs move
                    await worker_done.wait()
                nursery.cancel_scope.cancel()
            reason = conn.end_reason or reason
        finally:
            with trio.CancelScope(shield=True):
                self._nodes.remove(conn)
                conn.outbox_send.close()
                await self._leave(conn, reason)

    async def _leave(self, conn: NodeConnection, reason: str) -> None:
        """The node's socket closed: its owner record goes, it is marked offline, its jobs move.
        Not when it registered here again on a newer connection (a quick reconnect, handled
        before this close): the node's state is that connection's now (its owner record, the
        same instance's, would go too); the jobs this instance placed on the old connection
        move at once (``NODE_RECONNECTED``), other instances' at their remote watch. The
        offline mark names this connection besides (node_state.lua)."""
        lock = self._locks.setdefault(conn.node_id, trio.Lock())
        async with lock:
            if self._latest.get(conn.node_id) != conn.conn_id:
                # back here on a newer connection already: the jobs of this one move now
                # (those of another instance's newer connection: at the remote watch)
                await self._dispatcher.recovery.node_lost(conn.node_id, "NODE_RECONNECTED", conn_id=conn.conn_id)
                event(log, "node_left", node_id=conn.node_id, reason=reason, replaced=True)
                return
            with trio.move_on_after(5):
                await self._ownership.release_node(conn.node_id)
                try:
                    await self._scheduling.node_state([conn.node_id], self.settings.instance_id, online=False, draining=False,
                                                      conn_id=conn.conn_id)
                except RedisUnavailable:
                    pass
                await self._dispatcher.recovery.node_lost(conn.node_id, "NODE_LOST")
            del self._latest[conn.node_id]
        if not lock.locked() and lock.statistics().tasks_waiting == 0:
            self._locks.pop(conn.node_id, None)
        event(log, "node_left", node_id=conn.node_id, reason=reason)

    async def _accept_register(self, msg: object, conn_id: str) -> Register:
        """The first frame must be a register with the right token and a node id not connected here."""
        if isinstance(msg, bytes):
            raise ProtocolError(BAD_MESSAGE, "nodes send text frames only")
        if not isinstance(msg, Register):
            raise ProtocolError(NOT_REGISTERED, f"send register first, got {msg.TYPE}")
        accepted = self.settings.node_tokens
        if accepted and not secrets.matches(msg.token, accepted):
            raise ProtocolError(UNAUTHORIZED, "register token missing or wrong", fatal=True, close_code=CLOSE_POLICY)
        if msg.node_id in self._nodes:
            raise ProtocolError(DUPLICATE_NODE_ID, f"node {msg.node_id} is already connected",
                                fatal=True, close_code=CLOSE_POLICY)
        await self._write_registration(msg, conn_id)
        return msg

    async def _write_registration(self, reg: Register, conn_id: str) -> None:
        """Register the node in Redis on connection ``conn_id`` and claim it for this instance:
        after an old connection's clean-up (``_leave``) or before it, never in its middle."""
        async with self._locks.setdefault(reg.node_id, trio.Lock()):
            try:
                await self._scheduling.register_node(reg, self.settings.instance_id, conn_id)
                previous = await self._ownership.claim_node(reg.node_id)
            except RedisUnavailable as exc:
                raise redis_unavailable(exc) from None
            self._latest[reg.node_id] = conn_id
        if previous and previous != self.settings.instance_id:
            event(log, "node_taken_over", node_id=reg.node_id, previous_owner=previous)

    async def _watchdog(self, ws: ServerWebSocket, conn: NodeConnection, scope: trio.CancelScope) -> None:
        """Close the node when nothing arrived from it for ``node_ttl_ms``. While the reader
        waits for room in the worker's queue (``conn.held``), the node is not silent: the
        daemon is not reading it."""
        ttl = self.settings.node_ttl_ms / 1000
        while True:
            deadline = (trio.current_time() if conn.held else conn.last_seen) + ttl
            if trio.current_time() >= deadline:
                event(log, "node_heartbeat_timeout", logging.WARNING, node_id=conn.node_id)
                await wsutil.send_error(ws, ProtocolError("HEARTBEAT_TIMEOUT", f"no message for {self.settings.node_ttl_ms} ms",
                                                          fatal=True, close_code=CLOSE_POLICY))
                scope.cancel()
                return
            await trio.sleep_until(deadline)

    async def _reader(self, ws: ServerWebSocket, conn: NodeConnection,
                      work: trio.MemorySendChannel[JobResult | Drain]) -> str:
        """Node frames, until the node goes away or is refused fatally. No Redis here: the
        Redis work goes to :meth:`_worker` (module docstring)."""

        async def heartbeat(msg: Heartbeat) -> None:
            conn.load, conn.load_score = msg.load, msg.load_score
            self.heartbeats.due(conn)

        async def queued(msg: JobResult | Drain) -> None:
            conn.held = True
            try:
                await work.send(msg)
            finally:
                conn.held = False
                conn.last_seen = trio.current_time()

        async def register_again(_: Register) -> None:
            raise ProtocolError(BAD_MESSAGE, "already registered")

        async def binary(_: bytes) -> None:
            raise ProtocolError(BAD_MESSAGE, "nodes send text frames only")

        def seen() -> None:
            conn.last_seen = trio.current_time()

        handlers = {Heartbeat: heartbeat, JobResult: queued, Drain: queued, Register: register_again}
        return await self.read_frames(ws, handlers, on_bytes=binary, on_frame=seen, node_id=conn.node_id)

    async def _worker(self, ws: ServerWebSocket, conn: NodeConnection,
                      work: trio.MemoryReceiveChannel[JobResult | Drain], done: trio.Event) -> None:
        """The Redis work of the node's messages, in order; closes a drained node."""
        try:
            async for msg in work:
                if isinstance(msg, JobResult):
                    await self._job_result(conn, msg)
                else:
                    await self._drain(conn)
                conn.end_reason = await self._drained(ws, conn)
                if conn.end_reason is not None:
                    return
        finally:
            done.set()

    async def _drained(self, ws: ServerWebSocket, conn: NodeConnection) -> str | None:
        """A draining node that holds no job of this instance is closed: reason ``drained``."""
        if conn.draining and not self._dispatcher.placements_on(conn.node_id):
            await wsutil.close(ws, CLOSE_GOING_AWAY, "drained")
            return "drained"
        return None

    def _count_heartbeats(self, count: int) -> None:
        self._metrics.node_heartbeats_written_total.inc(count)
        self._metrics.node_heartbeat_batches_total.inc()

    def _beat(self, conn: NodeConnection) -> lua.Beat:
        """What a node's heartbeat writes: its newest load and load score. A score above
        ``--node-load-threshold`` makes the node saturated: no instance places new jobs on it
        (choose_node.lua). A draining node's heartbeat writes its drain again (a drain sent
        while Redis was out)."""
        score = conn.load_score
        saturated = score is not None and score > self.settings.node_load_threshold
        return lua.Beat(conn.node_id, conn.load, score, saturated, conn.draining, conn.conn_id)

    async def _heartbeat_written(self, conn: NodeConnection, beat: lua.Beat, reply: Any) -> None:
        """A node's heartbeat reply (HeartbeatWriter): a node no longer saturated makes this
        instance's waiting lanes try again at once (others at their next retry); a heartbeat
        on a connection Redis does not know as the node's is counted; a node Redis lost is
        registered again."""
        if reply == "STALE_CONN":
            self._metrics.node_heartbeats_stale_total.inc()
            if not conn.heartbeat_stale:
                conn.heartbeat_stale = True
                event(log, "node_heartbeat_stale", logging.WARNING, node_id=conn.node_id)
        elif reply == "OK":
            if self._nodes.note_load(conn, beat.load_score, beat.saturated):
                event(log, "node_saturated" if beat.saturated else "node_unsaturated",
                      logging.WARNING if beat.saturated else logging.INFO,
                      node_id=conn.node_id, load_score=beat.load_score, threshold=self.settings.node_load_threshold)
                if not beat.saturated:
                    self._dispatcher.slot_freed()
        elif reply == "UNKNOWN_NODE":
            # Redis lost the node (restarted without its data): register it again, as it is
            if conn.registration is not None:
                event(log, "node_registered_again", logging.WARNING, node_id=conn.node_id)
                try:
                    await self._write_registration(conn.registration, conn.conn_id)
                    self._dispatcher.slot_freed()
                except ProtocolError as exc:
                    event(log, "heartbeat_not_stored", logging.WARNING, node_id=conn.node_id, error=exc.message)
                except ScriptError as exc:
                    event(log, "heartbeat_not_stored", logging.WARNING, node_id=conn.node_id, error=str(exc))
        else:  # (RedisUnavailable, ScriptError: the next heartbeat writes again)
            event(log, "heartbeat_not_stored", logging.WARNING, node_id=conn.node_id, error=str(reply))

    async def _drain(self, conn: NodeConnection) -> None:
        conn.draining = True
        try:
            await self._scheduling.node_state([conn.node_id], self.settings.instance_id, online=True, draining=True)
        except RedisUnavailable:
            pass
        event(log, "node_draining", node_id=conn.node_id, jobs=len(self._dispatcher.placements_on(conn.node_id)))

    async def _job_result(self, conn: NodeConnection, msg: JobResult) -> None:
        node_s = conn.answered(msg.job_id)  # (before the Redis work below: that is the daemon's share)
        ok = msg.status == "ok"
        translation = Translation(
            status="SUCCESS" if ok else "FAILED",
            text=msg.text if ok else None,
            node_id=conn.node_id,
            error=None if ok else (msg.error or "NODE_ERROR"),
        )
        source_text = msg.source_text if ok else None
        answer = encode_answer(translation, source_text)
        retried = 0

        async def store(again: bool) -> Any:
            # complete_task declares the job key too; jobs placed elsewhere (or before a restart
            # of this instance's memory) are looked up in the job hash
            job_key = await self._dispatcher.job_key_of(msg.job_id)
            if job_key is None:
                raise UnknownJob(f"UNKNOWN_JOB {msg.job_id}")
            return await self._scheduling.complete(msg.job_id, job_key, conn.node_id, msg.attempt, ok, answer=answer,
                                                   answer_ttl_s=self._answer_ttl_s, again=again)

        def retrying(exc: RedisUnavailable) -> None:
            nonlocal retried
            if not retried:
                event(log, "answer_retrying", logging.WARNING, node_id=conn.node_id, job_id=msg.job_id, reply=exc.reply)
            retried += 1
            self._metrics.redis_retries_total.labels("answer").inc()

        try:
            reply = await until_known(store, budget_s=self._answer_budget_s, on_retry=retrying)
        except ScriptError as exc:
            self._metrics.stale_answers_dropped_total.labels(exc.code).inc()
            event(log, "answer_dropped", node_id=conn.node_id, job_id=msg.job_id, attempt=msg.attempt, code=exc.code)
            return
        except RedisUnavailable as exc:
            event(log, "answer_not_stored", logging.ERROR, node_id=conn.node_id, job_id=msg.job_id, reply=exc.reply,
                  retries=retried, budget_ms=round(self._answer_budget_s * 1000))
            return
        if retried:
            event(log, "answer_stored", node_id=conn.node_id, job_id=msg.job_id, retries=retried)
        _, session_id, job_key, utterance_index, tgt_lang = reply
        self._dispatcher.answered(job_key, freed_here=True)  # (a slot of a node here is free, whoever placed the job)
        self._metrics.jobs_total.labels("finished" if ok else "failed").inc()
        await self._router.to_session(session_id, JobOutcome(int(utterance_index), tgt_lang, translation, source_text,
                                                             node_s=node_s))

    @property
    def _answer_budget_s(self) -> float:
        """How long an answer is kept and retried while Redis cannot store it: twice the result
        deadline, the longest its session waits for it (a result deadline, held at most as
        long again by a Redis outage: jobs.outage_postponement); past that the session has
        resolved the translation without it."""
        return 2 * self.settings.result_deadline_ms / 1000

    @property
    def _answer_ttl_s(self) -> int:
        """How long complete_task keeps an answer: past any result deadline it could still meet
        (twice the result deadline at most, when a Redis outage held it)."""
        deadline_s = -(-self.settings.result_deadline_ms // 1000)
        return max(deadline_s + ANSWER_KEEP_EXTRA_S, 2 * deadline_s)
