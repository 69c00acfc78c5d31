"""Dispatcher: places session jobs on nodes through ``dispatch_task`` and hands them to nodes.

The session actor calls :meth:`Dispatcher.submit` and moves on; placement runs here, in
``workers`` tasks that share the batching Redis adapter. Outcomes that are not a node's
answer (no pool, nobody free before the deadline, node lost) go back to the session as a
``FAILED`` :class:`~scheduler.session.JobOutcome` through the session registry.

Full pool: a job that gets ``NO_AVAILABLE_NODE`` (or ``EMPTY_POOL``, or Redis unavailable)
waits, FIFO per (src, tgt), and is retried when a slot frees on this instance or every
``retry_interval`` seconds (slots freed by other instances), until its deadline; then the
translation is ``FAILED`` with that error. Scheduling policy stays in Lua; this module only
queues and retries.

Queue semantics: ``submit`` waits while ``queue_size`` jobs are queued (global backpressure
on finalizing sessions); :meth:`run` ends when cancelled.
"""

from __future__ import annotations

import base64
import collections
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from . import keys
from .logs import event
from .metrics import Metrics
from .protocol import JobAssign, JobCancel, Translation
from .redis_adapter import EmptyPool, NoAvailableNode, NoPoolForLangPair, RedisAdapter, RedisUnavailable, now_ms
from .session import JobOutcome, JobRequest

if TYPE_CHECKING:
    from .node_gateway import NodeRegistry
    from .registry import SessionRegistry

log = logging.getLogger("scheduler.dispatcher")


@attrs.define
class Placement:
    job_id: str
    node_id: str
    attempt: int
    request: JobRequest


class Dispatcher:
    def __init__(
        self,
        *,
        redis: RedisAdapter,
        nodes: NodeRegistry,
        sessions: SessionRegistry,
        metrics: Metrics,
        node_ttl_ms: int,
        workers: int = 32,
        queue_size: int = 4096,
        retry_interval: float = 0.25,
        rand: Callable[[], int] = lambda: random.getrandbits(30),
    ) -> None:
        self._redis = redis
        self._nodes = nodes
        self._sessions = sessions
        self._metrics = metrics
        self._node_ttl_ms = node_ttl_ms
        self._workers = workers
        self._retry_interval = retry_interval
        self._rand = rand
        self._send, self._receive = trio.open_memory_channel[JobRequest](queue_size)
        self._waiting: dict[tuple[str, str], collections.deque[tuple[JobRequest, str]]] = {}
        self._wakeup = trio.Event()
        self.placed: dict[str, Placement] = {}

    # ------------------------------------------------------------ the actor's port

    async def submit(self, request: JobRequest) -> None:
        await self._send.send(request)

    async def cancel(self, session_id: str, job_keys: list[str]) -> None:
        wanted = set(job_keys)
        for queue in self._waiting.values():
            for item in [i for i in queue if i[0].job_key in wanted]:
                queue.remove(item)
        for job_key in job_keys:
            placement = self.placed.pop(job_key, None)
            if placement is None:
                continue
            try:
                reply = await self._redis.script(
                    "cancel_task",
                    [keys.job(placement.job_id), keys.node_runtime(placement.node_id)],
                    [now_ms()],
                )
            except RedisUnavailable:
                continue
            if reply[0] == "OK":
                self._metrics.jobs_total.labels("cancelled").inc()
                self._metrics.jobs_in_flight.dec()
                node = self._nodes.get(placement.node_id)
                if node is not None:
                    node.send_nowait(JobCancel(job_id=placement.job_id, attempt=placement.attempt))
                self.slot_freed()
        self._update_waiting_gauge()

    # ------------------------------------------------------------ called by the node gateway

    def slot_freed(self) -> None:
        """A slot may have become free (answer, cancel, node joined): retry waiting jobs."""
        self._wakeup.set()

    def forget(self, job_key: str) -> Placement | None:
        """The job was answered: stop tracking it."""
        placement = self.placed.pop(job_key, None)
        if placement is not None:
            self._metrics.jobs_in_flight.dec()
        return placement

    def placements_on(self, node_id: str) -> list[Placement]:
        return [p for p in self.placed.values() if p.node_id == node_id]

    async def node_lost(self, node_id: str, reason: str) -> None:
        """The node's socket closed with jobs on it: release them and fail their translations."""
        for placement in self.placements_on(node_id):
            await self.node_lost_job(placement, reason)

    # ------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._retry_loop)
            task_status.started()

    async def _worker(self) -> None:
        async for request in self._receive:
            await self._place(request)

    async def _retry_loop(self) -> None:
        while True:
            with trio.move_on_after(self._retry_interval):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            now = trio.current_time()
            for queue in list(self._waiting.values()):
                # FIFO per lang pair: retry from the head, stop at the first that still waits
                while queue:
                    request, last_error = queue[0]
                    if request.deadline <= now:
                        queue.popleft()
                        self._fail(request, last_error)
                        continue
                    if not await self._try_place(request, parked=True):
                        break
                    queue.popleft()
            self._update_waiting_gauge()

    # ------------------------------------------------------------ placement

    async def _place(self, request: JobRequest) -> None:
        pair = (request.src_lang, request.tgt_lang)
        if self._waiting.get(pair):
            self._park(request, "NO_AVAILABLE_NODE")  # keep FIFO order behind earlier waiters
            return
        await self._try_place(request, parked=False)

    def _park(self, request: JobRequest, code: str) -> None:
        self._waiting.setdefault((request.src_lang, request.tgt_lang), collections.deque()).append((request, code))
        self._update_waiting_gauge()

    def _update_waiting_gauge(self) -> None:
        self._metrics.jobs_waiting.set(sum(len(q) for q in self._waiting.values()))

    async def _try_place(self, request: JobRequest, *, parked: bool) -> bool:
        """One dispatch_task call. Returns False when the job must (keep) wait(ing)."""
        if request.deadline <= trio.current_time():
            self._fail(request, "NO_AVAILABLE_NODE")
            return True
        ms = now_ms()
        lease_ms = max(1000, int((request.deadline - trio.current_time()) * 1000))
        try:
            reply = await self._redis.script(
                "dispatch_task",
                [
                    keys.jobkey(request.job_key),
                    keys.job_id_seq(),
                    keys.session(request.session_id),
                    keys.turn(request.turn_id),
                    keys.lang_pools(request.src_lang, request.tgt_lang),
                ],
                [
                    request.job_key, request.session_id, request.utterance_index, request.src_lang,
                    request.tgt_lang, request.turn_id, request.turn_action, ms, lease_ms,
                    self._node_ttl_ms, keys.KEY_TTL_S, self._rand(), request.turn_jobs, keys.PREFIX,
                ],
            )
        except (NoAvailableNode, EmptyPool, RedisUnavailable) as exc:
            code = getattr(exc, "code", "REDIS_UNAVAILABLE")
            self._metrics.dispatch_errors_total.labels(code).inc()
            if not parked:
                self._park(request, code)
            return False
        except NoPoolForLangPair as exc:
            self._metrics.dispatch_errors_total.labels(exc.code).inc()
            self._fail(request, exc.code)
            return True

        status, job_id, node_id, attempt = reply[0], str(reply[1]), reply[2], int(reply[3])
        if status == "EXISTS":
            self._metrics.duplicate_job_blocked_total.inc()
            event(log, "duplicate_job_blocked", logging.WARNING, job_key=request.job_key, job_id=job_id)
            return True
        placement = Placement(job_id=job_id, node_id=node_id, attempt=attempt, request=request)
        self.placed[request.job_key] = placement
        self._metrics.jobs_in_flight.inc()
        node = self._nodes.get(node_id)
        deadline_ms = int((time.time() + (request.deadline - trio.current_time())) * 1000)
        assign = JobAssign(
            job_id=job_id,
            attempt=attempt,
            job_key=request.job_key,
            session_id=request.session_id,
            utterance_index=request.utterance_index,
            job_type=request.job_type,
            src_lang=request.src_lang,
            tgt_lang=request.tgt_lang,
            turn_id=request.turn_id,
            sample_rate=request.sample_rate,
            audio=base64.b64encode(request.audio).decode("ascii"),
            deadline_ms=deadline_ms,
        )
        if node is None or not node.send_nowait(assign):
            # The node left (or is not reading) between placement and hand-over.
            await self.node_lost_job(placement, "NODE_UNREACHABLE")
        return True

    async def node_lost_job(self, placement: Placement, code: str) -> None:
        self.placed.pop(placement.request.job_key, None)
        self._metrics.jobs_in_flight.dec()
        try:
            await self._redis.script(
                "cancel_task", [keys.job(placement.job_id), keys.node_runtime(placement.node_id)], [now_ms()]
            )
        except RedisUnavailable:
            pass
        self._fail(placement.request, code)

    def _fail(self, request: JobRequest, code: str) -> None:
        self._metrics.jobs_total.labels("failed").inc()
        event(log, "job_failed", logging.INFO, job_key=request.job_key, error=code)
        self._sessions.deliver(
            request.session_id,
            JobOutcome(
                utterance_index=request.utterance_index,
                tgt_lang=request.tgt_lang,
                translation=Translation(status="FAILED", error=code),
            ),
        )
