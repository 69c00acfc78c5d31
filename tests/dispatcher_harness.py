"""The real :class:`Dispatcher` on a real Valkey, with scripted nodes, under a manual MockClock.

What is real: the dispatcher (lanes, batches, moves, lease expiry, releases), the Redis
adapter and its Lua scripts, the scheduling client, the node registry and the router, and
the node gateway's own handlers for what a node does (``_write_registration``,
``_job_result``, ``_leave``): only the WebSocket is left out. A node here is its
:class:`NodeConnection` outbox, read by the test. Sessions are a recording inbox.

Quiet: :meth:`DispatcherHarness.settle` returns when every task is blocked and no Redis call
is in flight, so a rule's effects are complete before the checks read anything.
"""

from __future__ import annotations

import functools
import logging

import attrs
import trio
import trio.testing

from scheduler.cluster.ownership import Ownership
from scheduler.cluster.routing import Router
from scheduler.edge.node_gateway import NodeGateway
from scheduler.jobs import JobOutcome, JobRequest, JobWaiting, job_key_for
from scheduler.ops.config import Settings
from scheduler.ops.metrics import Metrics
from scheduler.placement.dispatcher import Dispatcher
from scheduler.placement.nodes import NodeConnection, NodeRegistry
from scheduler.placement.redis_adapter import RedisAdapter
from scheduler.placement.scheduling import SchedulingClient
from scheduler.protocol import JobAssign, JobCancel, JobResult, Register

INSTANCE = "i1"
PAIRS = (("zh", "en"), ("zh", "de"))
LEASE_MS = 3000
RETRY_S = 0.25


class Inbox:
    """The sessions: every outcome and waiting notice, in order (a SessionInbox)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, JobOutcome | JobWaiting]] = []

    def __contains__(self, session_id: str) -> bool:
        return True

    def deliver(self, session_id: str, outcome: JobOutcome | JobWaiting) -> bool:
        self.got.append((session_id, outcome))
        return True

    def take_over(self, session_id: str) -> None:
        pass


@attrs.define
class Held:
    """A job as its node sees it: assigned, not cancelled, not answered."""

    job_key: str
    attempt: int


class ErrorLog(logging.Handler):
    """Any ERROR from the scheduler's loggers (a crashed lane, a periodic task that raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class DispatcherHarness:
    """Owns the parts inside a Trio run; every method runs there."""

    def __init__(self, url: str, *, queue_size: int, place_batch: int) -> None:
        self.url = url
        self.queue_size = queue_size
        self.place_batch = place_batch
        self.inbox = Inbox()
        self.metrics = Metrics()
        self.nodes = NodeRegistry(self.metrics)
        self.held: dict[str, dict[str, Held]] = {}  # node id -> job id -> what it holds
        self.old: dict[str, list[tuple[str, int]]] = {}  # node id -> (job id, attempt) it got and lost
        self._inflight = 0
        self.handed: list[tuple[str, str, int, str]] = []  # (job key, job id, attempt, node id) as jobs are handed over
        self.queued_since: dict[str, float] = {}  # job key -> when it last entered a lane (submitted, or moved)
        self._moving: dict[str, int] = {}  # job key -> the placement it is moving from (by identity)
        self._quiet = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with RedisAdapter(self.url, pool_size=1) as redis:  # one batcher: Redis sees the calls in Trio's order
            self._count_calls(redis)
            settings = Settings(instance_id=INSTANCE, result_deadline_ms=30_000)
            scheduling = SchedulingClient(redis)
            ownership = Ownership(redis, INSTANCE, 60_000)
            await ownership.refresh()  # this instance is alive (the orphan sweep leaves its jobs alone)
            router = Router(instance_id=INSTANCE, url=self.url, redis=redis, metrics=self.metrics, nodes=self.nodes,
                            sessions=self.inbox, ownership=ownership, answered=lambda key: self.dispatcher.answered(key),
                            waiting_sessions=dict)
            self.dispatcher = Dispatcher(redis=redis, nodes=self.nodes, sessions=self.inbox, router=router, metrics=self.metrics,
                                         node_ttl_ms=600_000, job_lease_ms=LEASE_MS, queue_size=self.queue_size,
                                         retry_interval=RETRY_S, place_batch=self.place_batch, instance_id=INSTANCE,
                                         scheduling=scheduling)
            self.gateway = NodeGateway(nodes=self.nodes, settings=settings, redis=redis, scheduling=scheduling,
                                       dispatcher=self.dispatcher, router=router, sessions=self.inbox, metrics=self.metrics,
                                       ownership=ownership)
            self._record_placements(router)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.dispatcher.run)
                task_status.started()

    def _record_placements(self, router: Router) -> None:
        """Jobs handed to nodes, in the order the dispatcher hands them over."""
        to_node_here = router.to_node_here

        def recorded(node_id: str, assign: JobAssign) -> bool:
            self.handed.append((assign.job_key, assign.job_id, assign.attempt, node_id))
            return to_node_here(node_id, assign)

        router.to_node_here = recorded

    def _count_calls(self, redis: RedisAdapter) -> None:
        """Every adapter call counts as in flight until it returns (see :meth:`settle`)."""
        for name in ("_submit", "_run_group"):
            call = getattr(redis, name)

            @functools.wraps(call)
            async def counted(*args, _call=call, **kwargs):
                self._inflight += 1
                try:
                    return await _call(*args, **kwargs)
                finally:
                    self._inflight -= 1
                    if self._inflight == 0:
                        self._quiet.set()
                        self._quiet = trio.Event()

            setattr(redis, name, counted)

    async def settle(self) -> None:
        """Until every task is blocked and no Redis call is in flight; then the nodes read."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if self._inflight == 0:
                break
            await self._quiet.wait()
        self._read_outboxes()
        moving = {key: id(p) for key, p in self.dispatcher._moving.items()}
        for job_key, placement in moving.items():  # moved off its node since the last settle: now
            if self._moving.get(job_key) != placement:
                self.queued_since[job_key] = trio.current_time()
        self._moving = moving

    async def advance(self, seconds: float) -> None:
        """Move the clock in steps of at most the retry interval, settling after each."""
        clock = trio.lowlevel.current_clock()
        end = trio.current_time() + seconds
        while trio.current_time() < end - 1e-9:
            clock.jump(min(RETRY_S, end - trio.current_time()))
            await self.settle()

    # ------------------------------------------------------------ what nodes do

    async def connect(self, node_id: str, max_jobs: int, pairs: list[tuple[str, str]]) -> None:
        """As the node gateway does on a node's register: Redis, the registry, the lanes told."""
        reg = Register(node_id=node_id, lang_pairs=[list(p) for p in pairs], max_jobs=max_jobs)
        conn = NodeConnection(node_id, max_jobs, reg, conn_id=f"{node_id}-{len(self.handed)}-{trio.current_time()}")
        await self.gateway._write_registration(reg, conn.conn_id)
        self.nodes.add(conn)
        self.held[node_id] = {}
        self.dispatcher.slot_freed()

    async def disconnect(self, node_id: str) -> None:
        """As the node gateway does when a node's socket closes."""
        conn = self.nodes.get(node_id)
        self.nodes.remove(conn)
        conn.outbox_send.close()
        self.old.setdefault(node_id, []).extend((job_id, h.attempt) for job_id, h in self.held.pop(node_id).items())
        await self.gateway._leave(conn, "disconnected")

    async def answer(self, node_id: str, job_id: str, attempt: int, ok: bool) -> None:
        held = self.held.get(node_id, {})
        if job_id in held and held[job_id].attempt == attempt:
            del held[job_id]
        result = JobResult(job_id=job_id, attempt=attempt, status="ok" if ok else "error",
                           source_text="src" if ok else None, text=f"{job_id}:{attempt}" if ok else None)
        await self.gateway._job_result(self.nodes.get(node_id), result)

    def _read_outboxes(self) -> None:
        for conn in self.nodes.all():
            while True:
                try:
                    msg = conn.outbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                held = self.held[conn.node_id]
                if isinstance(msg, JobAssign):
                    assert msg.job_id not in held, f"{conn.node_id} got job {msg.job_id} again while holding it"
                    held[msg.job_id] = Held(msg.job_key, msg.attempt)
                elif isinstance(msg, JobCancel):
                    h = held.get(msg.job_id)
                    if h is not None and h.attempt == msg.attempt:
                        del held[msg.job_id]
                        self.old.setdefault(conn.node_id, []).append((msg.job_id, msg.attempt))
                else:
                    raise AssertionError(f"node {conn.node_id} got {msg!r}")

    # ------------------------------------------------------------ what sessions do

    def submit(self, session_id: str, index: int, pair: tuple[str, str], ttl_s: float) -> str | None:
        request = JobRequest(job_key=job_key_for(session_id, index, pair[1]), session_id=session_id, utterance_index=index,
                             src_lang=pair[0], tgt_lang=pair[1], turn_id=f"{session_id}:t", turn_action="none", turn_jobs=1,
                             sample_rate=16000, audio=bytes(320), deadline=trio.current_time() + ttl_s)
        self.queued_since[request.job_key] = trio.current_time()
        return self.dispatcher.submit_nowait(request)

    async def cancel(self, session_id: str, job_keys: list[str]) -> None:
        await self.dispatcher.cancel(session_id, job_keys)
