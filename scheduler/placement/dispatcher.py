"""Dispatcher: places session jobs on nodes through ``dispatch_task`` and hands them to nodes.

The session actor calls :meth:`Dispatcher.submit` and moves on; placement runs here. Jobs
go into one *lane* per (src, tgt) language pair; each lane is one task that places its jobs
in turn over sessions (fairqueue.py: moves first, then one job of each session with work in
the lane in turn, each session's own jobs in submission order), so one session's burst
waits behind its own jobs only; lanes run in parallel, sharing the batching Redis adapter.
A lane places up to ``place_batch`` jobs from its head at once: their dispatch_task calls go
to Redis as one ordered group in one pipeline
(``RedisAdapter.script_many``), so Redis places them in queue order, and a lane is not
limited to one job per Redis round trip (that capped it at a few hundred jobs/s under load,
bench/load.py). A freed slot goes to the next job in that order.

Full pool: when the head of a lane gets ``NO_AVAILABLE_NODE`` (or ``EMPTY_POOL``, or Redis
is unavailable), the lane waits until a slot frees on this instance, or ``retry_interval``
passes (slots freed by other instances), then retries the head. Every job queued behind a
blocked head is told to its session as waiting (:class:`~scheduler.jobs.JobWaiting`):
if its deadline passes before it is placed, the session resolves it ``FAILED`` with that
error; the lane drops it at the same deadline. Both count Redis outages out by one rule (a
deadline is held while Redis is out and moves later once it is back: ``deadlines.py``), so a
job blocked by an outage is still placed when Redis answers again, while its session waits.

Lost nodes, expired leases, other instances' nodes, dead instances, adopted sessions and
Redis data loss are the dispatcher's recovery (recovery.py, its own task): a placed job is
dispatched again through ``redispatch_task`` as attempt + 1 on another node, ahead of the
jobs queued in its lane (:meth:`Dispatcher.move`), while its result deadline allows; the old
node gets ``job_cancel`` when it is still connected, and answers of the old attempt are
refused by ``complete_task``. An accepted answer leaves the books through
:meth:`Dispatcher.answered` only, whoever saw it.

Redis outages: no task here ends on a Redis error. A lane that cannot reach Redis waits and
retries its head; a slot release (``cancel_task``) that fails is kept and retried every
second until Redis answers, and its node is told ``job_cancel`` once it went through; a
``job_cancel`` for another instance's node that cannot be sent (the relay needs Redis) is
kept and sent again the same way; the periodic tasks log and retry (``resilient.every``).

Outcomes that are not a node's answer (no pool, nowhere to send it) go back to the session
as a ``FAILED`` :class:`~scheduler.jobs.JobOutcome` through the session registry.

Journal: the first job of an utterance (``JobRequest.finalize_reason``) writes the
utterance's resume-journal entry with its claim; after its first placement try the
dispatcher tells the session (``SessionInbox.journaled``) whether it did, so that the
session's writer journals the utterance itself only when not (cluster/journal.py).

Bounds: at most ``queue_size`` jobs wait in all lanes together; past that
:meth:`submit_nowait` refuses with ``OVERLOADED`` (the session records the translation as
FAILED at once: an overloaded scheduler never stalls a session). :meth:`run` ends when cancelled.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from scheduler.jobs import JobOutcome, JobRequest, JobWaiting, SessionInbox, StoreOutage, owed_entry
from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.placement.books import Placed, Placement
from scheduler.placement.deadlines import JobDeadlines
from scheduler.placement.fairqueue import FairQueue
from scheduler.placement.recovery import Recovery
from scheduler.protocol import JobAssign, JobCancel, Translation
from scheduler.store import placing
from scheduler.store.redis_adapter import (
    EmptyPool,
    Fenced,
    JobIdTaken,
    NoAvailableNode,
    NoPoolForLangPair,
    RedisAdapter,
    RedisUnavailable,
    StaleCandidates,
    UnknownJob,
    now_ms,
)
from scheduler.store.resilient import every
from scheduler.store.scheduling import SchedulingClient

if TYPE_CHECKING:
    from scheduler.placement.nodes import NodeRegistry, NodeRoute

log = logging.getLogger("scheduler.dispatcher")


@attrs.define(eq=False)
class _Lane:
    """Jobs of one language pair, placed in order by one task."""

    pair: tuple[str, str]
    queue: FairQueue = attrs.Factory(FairQueue)  # moves first, then sessions in turn (fairqueue.py)
    wake: trio.Event = attrs.Factory(trio.Event)
    blocked_code: str | None = None  # set while the head cannot be placed
    told: set[str] = attrs.Factory(set)  # job keys whose session was told "waiting"


class Dispatcher:
    def __init__(
        self,
        *,
        redis: RedisAdapter,
        nodes: NodeRegistry,
        sessions: SessionInbox,
        router: NodeRoute,
        metrics: Metrics,
        node_ttl_ms: int,
        job_lease_ms: int,
        orphan_grace_ms: int,
        instance_id: str,
        scheduling: SchedulingClient,
        queue_size: int = 4096,
        retry_interval: float = 0.25,
        place_batch: int = 32,
        watch_interval: float = 1.0,
        keep_audio: bool = True,
        locality_slack: float = 0.0,
        outage_hold: float = 30.0,
        rand: Callable[[], int] = lambda: random.getrandbits(30),
    ) -> None:
        self._redis = redis
        self._quiet = StoreOutage()  # the last "no outage" answer of outage(), handed out again while it holds
        self._nodes = nodes
        self._router = router  # a job to its node: here, or over the relay (cluster/routing.py)
        self._sessions = sessions
        self._metrics = metrics
        self._node_ttl_ms = node_ttl_ms
        self._job_lease_ms = job_lease_ms
        self._retry_interval = retry_interval
        self._place_batch = place_batch
        self._keep_audio = keep_audio  # dispatch_task keeps each job's audio until answered (for adopt)
        self._instance_id = instance_id
        self._rand = rand
        self._queue_size = queue_size
        self._queued = 0
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._slot_freed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scheduling = scheduling
        self._locality_slack = locality_slack  # this instance's nodes first, within this much load (choose_node.lua)
        self.placed = Placed()  # job key -> where it runs now (this instance's jobs)
        self.deadlines = JobDeadlines(redis.outage, outage_hold)  # job deadlines, Redis outages counted out
        self._moving: dict[str, Placement] = {}  # job key -> placement left behind, awaiting redispatch
        self._tried: dict[str, tuple[JobRequest, str]] = {}  # job key -> (request, job id) of a dispatch whose reply
        # was lost (a timeout): it is repeated under the same id, and undone if the request is dropped (_abandon_tried)
        self._owed_releases: dict[str, tuple[str, str, int | None, bool]] = {}  # job id -> (job key, node id,
        # attempt to cancel on its node once released or None, counted): cancel_task to retry
        self._lost_releases: set[str] = set()  # owed releases of which one try may have gone through (a timeout)
        self.recovery = Recovery(self, redis=redis, scheduling=scheduling, nodes=nodes, metrics=metrics, instance_id=instance_id,
                                 orphan_grace_ms=orphan_grace_ms, watch_interval=watch_interval)
        self._owed_cancels: dict[tuple[str, int], str] = {}  # (job id, attempt) -> node id: job_cancel to send again

    # ------------------------------------------------------------ the actor's port

    def submit_nowait(self, request: JobRequest) -> str | None:
        if self._queued >= self._queue_size:
            self._metrics.dispatch_errors_total.labels("OVERLOADED").inc()
            if _journals(request):
                self._sessions.journaled(request.session_id, request.utterance_index, False)
            return "OVERLOADED"
        self._queued += 1
        lane = self._lane(request)
        lane.queue.append(request)
        if lane.blocked_code is not None:
            self._tell_waiting(lane, request, lane.blocked_code)
        lane.wake.set()
        self._update_waiting_gauge()
        return None

    def _lane(self, request: JobRequest) -> _Lane:
        pair = (request.src_lang, request.tgt_lang)
        lane = self._lanes.get(pair)
        if lane is None:
            lane = self._lanes[pair] = _Lane(pair)
            assert self._nursery is not None, "Dispatcher.run() is not running"
            self._nursery.start_soon(self._run_lane, lane)
        return lane

    async def cancel(self, session_id: str, job_keys: list[str]) -> None:
        wanted, withdrawn = set(job_keys), []
        for lane in self._lanes.values():  # no await in here: a lane may be made, or place, meanwhile
            for request in [r for r in lane.queue if r.job_key in wanted]:
                self._remove(lane, request)
                withdrawn.append(request)
        for request in withdrawn:
            await self._abandon_move(request.job_key)
            await self._abandon_tried(request)
        for job_key in job_keys:
            placement = self.placed.pop(job_key, None)
            if placement is None:
                continue
            self._metrics.jobs_in_flight.dec()
            await self.release(placement.job_id, job_key, placement.node_id, placement.attempt)

    async def send_cancel(self, node_id: str, job_id: str, attempt: int) -> None:
        """``job_cancel`` to the node (here, or over the relay); kept and sent again every
        second while Redis is unavailable (:meth:`_retry_releases`)."""
        try:
            await self._router.to_node(node_id, JobCancel(job_id=job_id, attempt=attempt))
        except RedisUnavailable:
            self._owed_cancels[(job_id, attempt)] = node_id

    # ------------------------------------------------------------ called by the node gateway

    def slot_freed(self) -> None:
        """A slot may have become free (answer, cancel, node joined): blocked lanes retry now."""
        self._slot_freed.set()
        self._slot_freed = trio.Event()

    def _forget(self, job_key: str) -> Placement | None:
        """The job was answered: stop tracking it. That may be a job on its way to another
        node (its node reconnected and answered the attempt it held before the move was
        made): it leaves its lane too, instead of waiting there for a NOOP redispatch."""
        placement = self.placed.pop(job_key, None)
        if placement is not None:
            self._metrics.jobs_in_flight.dec()
            return placement
        moving = self._moving.pop(job_key, None)
        if moving is not None:
            self._remove(self._lane(moving.request), moving.request)
        return moving

    def answered(self, job_key: str, *, freed_here: bool = False) -> None:
        """``job_key`` was answered: the one way an accepted answer leaves the books, whoever
        saw it (the node gateway, for a node here: ``freed_here``; the router, when the answer
        reached its session here through the relay; the remote watch, when it saw the job
        done). If this instance placed the job, it leaves the books now, so it is never moved,
        cancelled or counted failed later; a lane waiting for a slot retries."""
        if self._forget(job_key) is not None or freed_here:
            self.slot_freed()

    def holds(self, job_key: str) -> bool:
        """Whether the job is on this instance's books (placed, or on its way to another node)."""
        return job_key in self.placed or job_key in self._moving

    def outage(self, now: float) -> StoreOutage:
        """Redis' outage as of ``now``, from the adapter's outage clock."""
        clock = self._redis.outage
        since = clock.since(now)
        if since is None and clock.last is self._quiet.last:  # (the common answer, asked at every session wake)
            return self._quiet
        outage = StoreOutage(since, clock.last)
        if since is None:
            self._quiet = outage
        return outage

    async def job_key_of(self, job_id: str) -> str | None:
        """The job key of a job: from the books when this instance placed it, else from its
        job hash in Redis (placed by another instance, or before a restart); None if unknown."""
        return self.placed.job_keys.get(job_id) or await self._scheduling.job_key_of(job_id)

    def placements_on(self, node_id: str) -> list[Placement]:
        return [p for p in self.placed.values() if p.node_id == node_id]

    def move(self, placement: Placement, reason: str) -> None:
        """Dispatch a placed job again (attempt + 1) on another node, ahead of its lane."""
        request = placement.request
        if self.placed.pop(request.job_key, None) is None:
            return  # already answered, cancelled or moving
        self._metrics.jobs_in_flight.dec()
        self._moving[request.job_key] = placement
        self._queued += 1
        lane = self._lane(request)
        lane.queue.appendleft(request)
        lane.wake.set()
        self._update_waiting_gauge()
        event(log, "job_moving", job_key=request.job_key, job_id=placement.job_id, from_node=placement.node_id,
              attempt=placement.attempt, reason=reason)

    # ------------------------------------------------------------ tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the lane tasks (one per language pair seen) and the periodic ones. Runs until
        cancelled; no Redis error ends it."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.recovery.run)  # lease expiry, orphan sweep, remote watch (recovery.py)
            nursery.start_soon(partial(every, 1.0, self._retry_releases, name="release_retry", log=log))
            self._redis.outage.on_end.append(self._outage_ended)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._redis.outage.on_end.remove(self._outage_ended)

    def _outage_ended(self, _length: float) -> None:
        """A Redis outage ended: the deadlines of the jobs held here move later, as their
        sessions' do (deadlines.py)."""
        held = [r for lane in self._lanes.values() for r in lane.queue]
        self.deadlines.count([*held, *(p.request for p in self.placed.values()), *(p.request for p in self._moving.values())])

    async def _retry_releases(self) -> None:
        """cancel_task calls and ``job_cancel`` messages that failed (Redis unavailable),
        until each got through."""
        for job_id, (job_key, node_id, attempt, counted) in list(self._owed_releases.items()):
            self._owed_releases.pop(job_id, None)
            await self.release(job_id, job_key, node_id, attempt, counted=counted)
        for (job_id, attempt), node_id in list(self._owed_cancels.items()):
            self._owed_cancels.pop((job_id, attempt), None)
            await self.send_cancel(node_id, job_id, attempt)

    async def _run_lane(self, lane: _Lane) -> None:
        """Run :meth:`_lane_step` until cancelled. An unexpected error costs a pause of
        ``retry_interval``, never the daemon (the lane's queue is kept and retried)."""
        while True:
            try:
                await self._lane_step(lane)
            except Exception:
                event(log, "lane_failed", logging.ERROR, exc_info=True, src_lang=lane.pair[0], tgt_lang=lane.pair[1])
                await trio.sleep(self._retry_interval)

    async def _lane_step(self, lane: _Lane) -> None:
        """Place the lane's jobs, oldest first, up to ``place_batch`` at a time in one ordered
        pipeline. When one cannot be placed, the lane waits (until a slot is freed or
        ``retry_interval``) and retries from its head."""
        if not lane.queue:
            lane.wake = trio.Event()
            await lane.wake.wait()
            return
        now = trio.current_time()
        for request in [r for r in lane.queue if self.deadlines.due(r, now) <= now]:  # the whole queue, not just the
            # batch; never placed: the session resolves it FAILED(blocked code) at this same deadline (outages counted out)
            self._remove(lane, request)
            self._metrics.jobs_total.labels("failed").inc()
            if self._moving_of(request) is not None:  # (not a copy of a moving job's key: the move is the original's)
                await self._abandon_move(request.job_key)
            await self._abandon_tried(request)
        batch = list(itertools.islice(lane.queue, self._place_batch))
        if not batch:
            return
        freed = self._slot_freed  # taken before the round: a slot freed while it is in flight wakes the lane at once
        codes = await self._place(lane, batch)
        blocked: tuple[str, JobRequest] | None = None
        for request, code in zip(batch, codes, strict=True):
            if code is None:
                was_told = request.job_key in lane.told
                self._remove(lane, request)  # (cancel() may have removed it meanwhile)
                if was_told:
                    self._tell_waiting(lane, request, None)
            elif blocked is None:
                blocked = (code, request)
        if blocked is None:
            if lane.blocked_code is not None:
                event(log, "dispatch_unblocked", src_lang=lane.pair[0], tgt_lang=lane.pair[1], waiting=len(lane.queue))
            lane.blocked_code = None
            return
        code, request = blocked
        if code != lane.blocked_code:  # once per blocked episode, not per retry
            event(log, "dispatch_blocked", logging.WARNING, src_lang=lane.pair[0], tgt_lang=lane.pair[1], code=code,
                  job_key=request.job_key, waiting=len(lane.queue))
        lane.blocked_code = code
        for waiting in lane.queue:
            if waiting.job_key not in lane.told:
                self._tell_waiting(lane, waiting, code)
        now = trio.current_time()
        with trio.move_on_at(min([now + self._retry_interval, *(self.deadlines.due(r, now) for r in lane.queue)])):
            await freed.wait()

    async def _place(self, lane: _Lane, batch: list[JobRequest]) -> list[str | None]:
        """Place ``batch`` (oldest first) with one ordered pipeline of dispatch_task /
        redispatch_task calls. Per job: None when it is done with (placed, duplicate or failed
        for good), or the error code when it must wait for a node."""
        movings = [self._moving_of(r) for r in batch]
        tried = [None if m else self._tried_id(r) for r, m in zip(batch, movings, strict=True)]
        ids: list[str | None] = [None] * len(batch)
        try:
            fresh_ids = iter(await self._scheduling.job_ids(sum(m is None and t is None for m, t in zip(movings, tried, strict=True))))
            ids = [None if m else t or next(fresh_ids) for m, t in zip(movings, tried, strict=True)]
            items = [self._item(r, m, i) for r, m, i in zip(batch, movings, ids, strict=True)]
            ctx = placing.Context(now_ms(), self._job_lease_ms, self._node_ttl_ms, self._instance_id, self._locality_slack)
            replies = await self._scheduling.place_many(lane.pair[0], lane.pair[1], items, ctx)
        except RedisUnavailable as exc:
            replies = [exc] * len(batch)
        for moving in movings:  # (layout 2: a job that moved across shards has a new id there; placing.py)
            if moving is not None and (new_id := self._scheduling.relocated(moving.job_id)) is not None:
                moving.job_id = new_id
        replies = [self._resolve(r, m, i, reply) for r, m, i, reply in zip(batch, movings, ids, replies, strict=True)]
        for request, moving, reply in zip(batch, movings, replies, strict=True):
            if moving is None and _journals(request):  # its session's writer waits for this word (journal.py)
                self._sessions.journaled(request.session_id, request.utterance_index,
                                         isinstance(reply, list) and reply[0] == "OK")
        codes: list[str | None] = []
        remote: list[tuple[Placement, JobAssign]] = []  # placed on nodes of other instances
        crashed: list[tuple[str, str, str, int | None]] = []  # what Redis holds for jobs whose handling crashed
        for request, moving, reply in zip(batch, movings, replies, strict=True):
            try:
                codes.append(self._placed_or_code(request, moving, reply, remote))
            except Exception:  # a bug here must cost one job, never the daemon
                event(log, "placement_crashed", logging.ERROR, exc_info=True, job_key=request.job_key)
                self._drop_crashed(request, moving, reply, remote, crashed)
                codes.append(None)
        for placement, assign in remote:
            await self._relay_job(placement, assign)
        for job_id, job_key, node_id, attempt in crashed:  # its slot back; its node (if handed it) told job_cancel
            await self.release(job_id, job_key, node_id, attempt, counted=False)
        return codes

    def _tried_id(self, request: JobRequest) -> str | None:
        entry = self._tried.get(request.job_key)
        return entry[1] if entry is not None and entry[0] is request else None

    def _resolve(self, request: JobRequest, moving: Placement | None, job_id: str | None, reply: Any) -> Any:
        """Ambiguous outcomes (Redis timed out: the call may have gone through). A dispatch is
        remembered and repeated under the same job id; a move is marked ``uncertain``. When the
        repeat finds what the lost call made (dispatch_task's long ``EXISTS``, redispatch_task's
        ``NOOP`` at attempt + 1), that is taken as this call's ``OK``: the job goes to the node
        Redis gave it, instead of being taken for a duplicate (and never sent) or for answered."""
        if isinstance(reply, RedisUnavailable):
            if reply.ambiguous and moving is None and job_id is not None:
                self._tried[request.job_key] = (request, job_id)
            elif reply.ambiguous and moving is not None:
                moving.uncertain = True
            return reply
        if moving is None:
            if self._tried_id(request) is None:
                return reply
            del self._tried[request.job_key]
            if isinstance(reply, list) and len(reply) == 7 and reply[0] == "EXISTS" and reply[4] == "dispatched" and int(reply[3]) == 1:
                event(log, "dispatch_outcome_recovered", job_key=request.job_key, job_id=str(reply[1]), node_id=reply[2])
                return ["OK", reply[1], reply[2], 1, reply[5], int(reply[6])]
            return reply
        if (moving.uncertain and isinstance(reply, list) and len(reply) == 6 and reply[0] == "NOOP" and reply[1] == "dispatched"
                and int(reply[2]) == moving.attempt + 1):
            event(log, "dispatch_outcome_recovered", job_key=request.job_key, job_id=moving.job_id, node_id=reply[3])
            return ["OK", moving.job_id, reply[3], int(reply[2]), reply[4], int(reply[5])]
        return reply

    async def _abandon_tried(self, request: JobRequest) -> None:
        """``request`` leaves the lane unplaced: a dispatch of it whose reply was lost may have
        placed it; if so, that job is cancelled (its slot released, its node never got it)."""
        job_id = self._tried_id(request)
        if job_id is None:
            return
        del self._tried[request.job_key]
        await self.release(job_id, request.job_key, "")  # (node unknown: release looks it up, or finds no job)

    def _drop_crashed(self, request: JobRequest, moving: Placement | None, reply: Any,
                      remote: list[tuple[Placement, JobAssign]], crashed: list[tuple[str, str, str, int | None]]) -> None:
        """Acting on a reply raised (a bug): the job fails INTERNAL and leaves the books and
        the relay list; what Redis holds for it is added to ``crashed``, to be released once
        the round is through: the placement Redis made (a slot would leak otherwise: no
        instance's books hold the job, so no lease expiry or sweep would ever free it), or
        else the job a move left (waiting, or on the node a move whose reply was lost put it:
        released from the node Redis names), or the job a dispatch whose reply was lost may
        have made (``_tried``)."""
        job_key = request.job_key
        if moving is not None:
            self._moving.pop(job_key, None)
        remote[:] = [(p, a) for p, a in remote if p.request is not request]
        placed = self.placed.get(job_key)
        if placed is not None and placed.request is request:  # (not the original of a copy: it runs on)
            del self.placed[job_key]
            self._metrics.jobs_in_flight.dec()
        self._fail(request, "INTERNAL")
        tried = self._tried_id(request)
        if tried is not None:  # (its repeat will not come)
            del self._tried[job_key]
        if isinstance(reply, list) and len(reply) >= 4 and reply[0] == "OK" and str(reply[3]).isdigit():
            crashed.append((str(reply[1]), job_key, str(reply[2]), int(reply[3])))
        elif moving is not None:  # its node as Redis has it: a move whose reply was lost may have put it on another
            crashed.append((moving.job_id, job_key, "", None))
        elif tried is not None:  # a dispatch whose reply was lost may have placed it: undone (its node never got it)
            crashed.append((tried, job_key, "", None))

    async def _relay_job(self, placement: Placement, assign: JobAssign) -> None:
        """The chosen node is held by another instance: the router sends the job over that
        instance's stream. A node with no live owner is gone: the job moves on (attempt + 1)."""
        if not await self._router.to_node(placement.node_id, assign):
            self.move(placement, "NODE_UNREACHABLE")

    def _item(self, request: JobRequest, moving: Placement | None, job_id: str | None) -> placing.Item:
        """What the store is asked to place: a new job under ``job_id``, or a move."""
        if moving is None:
            assert job_id is not None
            audio_b64 = request.audio_b64 if self._keep_audio else ""
            deadline_ms = _epoch_ms(request.deadline)
            entry = owed_entry(request.finalize_reason, request.turn_id, deadline_ms) if _journals(request) else ""
            return placing.NewJob(
                request.job_key, job_id, request.session_id, request.utterance_index, request.src_lang, request.tgt_lang,
                request.turn_id, request.turn_action, request.turn_jobs, self._epoch(request), audio_b64,
                request.sample_rate, deadline_ms, self._rand(), entry)
        return placing.MoveJob(moving.job_id, moving.node_id, moving.attempt, request.session_id, request.turn_id,
                               request.src_lang, request.tgt_lang, self._rand())

    def _epoch(self, request: JobRequest) -> int | None:
        """The epoch a job is placed under: its session's as held here now, when newer than
        the request's. A session resumed on this same instance (a new connection, a new
        epoch) owns the jobs its previous connection left waiting in the lanes: they are its
        utterances, and no other instance holds their audio. A session resumed elsewhere is
        not held here at a newer epoch: its jobs here fail FENCED."""
        here = self._sessions.epoch(request.session_id)
        if here is None or request.epoch is None:
            return request.epoch
        return max(here, request.epoch)

    def _moving_of(self, request: JobRequest) -> Placement | None:
        """The placement ``request`` is moving from, if it is a move. By identity: a copy of
        the job key (a session replaying after a resume) queued while the original moves is
        a fresh request (Redis answers it EXISTS), and its deadline is not the move's."""
        moving = self._moving.get(request.job_key)
        return moving if moving is not None and moving.request is request else None

    def _remove(self, lane: _Lane, request: JobRequest) -> None:
        """Take ``request`` out of the lane if it is still there (by identity; usually the head)."""
        if not lane.queue.remove(request):
            return
        lane.told.discard(request.job_key)
        self._queued -= 1
        self._update_waiting_gauge()

    def _tell_waiting(self, lane: _Lane, request: JobRequest, code: str | None) -> None:
        if code is not None:
            lane.told.add(request.job_key)
            if _journals(request) and self._moving_of(request) is None:  # its first try waits for the lane: its
                self._sessions.journaled(request.session_id, request.utterance_index, False)  # writer journals it now
        self._sessions.deliver(request.session_id, JobWaiting(request.utterance_index, request.tgt_lang, code))

    @property
    def waiting(self) -> int:
        """Jobs queued in the lanes (new, waiting for a node, or moving)."""
        return sum(len(lane.queue) for lane in self._lanes.values())

    def by_pair(self) -> dict[tuple[str, str], dict[str, int]]:
        """Per language pair: jobs ``waiting`` in its lane and ``in_flight`` (placed from here);
        read by the scrape (ops/metrics.py, ``watch_pairs``)."""
        out = {pair: {"waiting": len(lane.queue), "in_flight": 0} for pair, lane in self._lanes.items()}
        for placement in self.placed.values():
            pair = (placement.request.src_lang, placement.request.tgt_lang)
            out.setdefault(pair, {"waiting": 0, "in_flight": 0})["in_flight"] += 1
        return out

    def _update_waiting_gauge(self) -> None:
        self._metrics.jobs_waiting.set(self.waiting)

    # ------------------------------------------------------------ placement

    async def release(self, job_id: str, job_key: str, node_id: str, attempt: int | None = None, *,
                       counted: bool = True) -> list | None:
        """cancel_task: the job is no longer wanted; its slot (if it holds one) is released once,
        and lanes waiting for a slot retry; with ``attempt``, the node is told ``job_cancel``
        and (``counted``: not for a job already counted failed) the job counted cancelled.
        Redis unavailable: the release is owed and retried every second
        (:meth:`_retry_releases`); returns None then."""
        try:
            reply = await self._scheduling.cancel(job_id, job_key, node_id)  # (node '': a lost dispatch (_abandon_tried)
            if reply is None:  # whose node is not known yet; None: it never went through)
                return None
        except RedisUnavailable as exc:
            again = exc.ambiguous or job_id in self._lost_releases
            self._owed_releases[job_id] = (job_key, node_id, attempt, counted)
            if again:
                self._lost_releases.add(job_id)
            return None
        if job_id in self._lost_releases:  # a repeat of a release whose reply was lost: if that one went through,
            self._lost_releases.discard(job_id)  # it is done as it would have been (the node is still told)
            if reply[0] == "NOOP" and reply[1] == "cancelled":
                reply = ["OK", node_id, attempt]
        if reply[0] == "OK":
            self.slot_freed()
            if attempt is not None:
                if counted:
                    self._metrics.jobs_total.labels("cancelled").inc()
                await self.send_cancel(node_id, job_id, attempt)
        return reply

    async def _abandon_move(self, job_key: str) -> None:
        """A job that was leaving its node is no longer wanted: release what it still holds."""
        moving = self._moving.pop(job_key, None)
        if moving is not None:
            await self.release(moving.job_id, job_key, moving.node_id)

    def _refused(self, request: JobRequest, moving: Placement | None, reply: BaseException) -> str | None:
        """A dispatch_task / redispatch_task call refused: the code to wait with (the lane
        retries), or None when the job is done with. Anything unexpected is raised."""
        if isinstance(reply, NoAvailableNode | EmptyPool | NoPoolForLangPair | StaleCandidates | Fenced | RedisUnavailable):
            code = getattr(reply, "code", "REDIS_UNAVAILABLE")
            self._metrics.dispatch_errors_total.labels(code).inc()
            if isinstance(reply, Fenced):  # the session was resumed elsewhere: this owner places nothing more
                self._fail(request, code)
                return None
            # NO_POOL_FOR_LANG_PAIR too waits: session_init checked the pair, so Redis lost its
            # data and the nodes register again at their next heartbeat; STALE_CANDIDATES: the
            # pool tables changed again after every re-read of the candidates (nodes registering
            # in a burst, as after Redis lost its data)
            return code
        if isinstance(reply, JobIdTaken):
            # Redis lost its data and the id sequence started again: new ids, and try again
            self._scheduling.drop_job_ids()
            self._metrics.dispatch_errors_total.labels(reply.code).inc()
            return reply.code
        if moving is not None and isinstance(reply, UnknownJob):
            # Redis lost the job (restarted without its data): place it afresh, as a new job
            self._moving.pop(request.job_key, None)
            self._metrics.dispatch_errors_total.labels(reply.code).inc()
            return reply.code
        raise reply

    def _placed_or_code(self, request: JobRequest, moving: Placement | None, reply: Any,
                        remote: list[tuple[Placement, JobAssign]]) -> str | None:
        """Act on one dispatch_task / redispatch_task reply (or the exception it raised):
        hand the job to its node, or add it to ``remote`` when another instance holds the
        node. Returns None when the job is done with, or the error code when it must wait
        for a node."""
        if isinstance(reply, BaseException):
            return self._refused(request, moving, reply)
        if moving is not None:
            self._moving.pop(request.job_key, None)  # (cancel() may have taken it meanwhile)
            if reply[0] == "NOOP":  # answered or cancelled meanwhile: nothing to move
                return None
            self._metrics.redispatch_total.inc()
        if reply[0] == "EXISTS":
            self._metrics.duplicate_job_blocked_total.inc()
            event(log, "duplicate_job_blocked", logging.WARNING, job_key=request.job_key, job_id=str(reply[1]))
            return None
        job_id, node_id, attempt = str(reply[1]), reply[2], int(reply[3])
        lease_ms = self._job_lease_ms if len(reply) < 6 else int(reply[5]) - now_ms()  # (a lost call's lease: from when it ran)
        placement = Placement(job_id=job_id, node_id=node_id, attempt=attempt, request=request,
                              lease_deadline=trio.current_time() + lease_ms / 1000,
                              outage_at=self._redis.outage.elapsed(trio.current_time()),
                              conn_id=str(reply[4]) if len(reply) > 4 else "")
        self.placed[request.job_key] = placement
        self._metrics.jobs_in_flight.inc()
        assign = _assign(placement)
        if not self._router.node_is_here(node_id):
            remote.append((placement, assign))  # relayed by _place once the batch is through
            return None
        if not self._router.to_node_here(node_id, assign):
            # The node left (or is not reading) between placement and hand-over: the lane keeps
            # the job at its head and places it again, elsewhere, as attempt + 1.
            del self.placed[request.job_key]
            self._metrics.jobs_in_flight.dec()
            self._moving[request.job_key] = placement
            return "NODE_UNREACHABLE"
        return None

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


def _assign(placement: Placement) -> JobAssign:
    """The ``job_assign`` message for a placed job."""
    request = placement.request
    return JobAssign(
        job_id=placement.job_id, attempt=placement.attempt, job_key=request.job_key, session_id=request.session_id,
        utterance_index=request.utterance_index, job_type=request.job_type, src_lang=request.src_lang,
        tgt_lang=request.tgt_lang, turn_id=request.turn_id, sample_rate=request.sample_rate,
        audio=request.audio_b64, deadline_ms=_epoch_ms(request.deadline),
    )


def _journals(request: JobRequest) -> bool:
    """Whether placing ``request`` writes its utterance's resume-journal entry: the first job of
    an utterance, of a session whose journal is on (fenced by an epoch)."""
    return bool(request.finalize_reason) and request.epoch is not None


def _epoch_ms(deadline: float) -> int:
    """A Trio-clock deadline as wall-clock epoch milliseconds (what Redis and nodes see)."""
    return int((time.time() + (deadline - trio.current_time())) * 1000)
