"""Recovery: what the dispatcher does when something it relied on is gone.

The dispatcher (dispatcher.py) places jobs and keeps the books of where each runs; this
module takes its jobs back when the world changed under them, in a task of its own
(:meth:`Recovery.run`, inside the dispatcher's nursery):

- **lease expiry** (every second): a job whose lease (``job_lease_ms``) ran out moves to
  another node as attempt + 1; time Redis was out does not count;
- **node loss** (:meth:`Recovery.node_lost`, from the node gateway): the jobs of a node whose
  socket closed, or that came back on a new connection, move;
- **the remote watch** (every ``watch_interval``): jobs placed here on nodes held by other
  instances. A job answered or cancelled meanwhile leaves the books at once; a job whose
  node is offline, whose node's connection is not the one that got the job (``conn_id``), or
  whose node's instance is not alive (store/liveness.py) moves from here: this instance holds
  its audio. So a job moves within ``watch_interval`` of a disconnect and within
  ``owner_ttl_ms`` + ``watch_interval`` of an instance's death, never waiting for its lease;
- **the orphan sweep** (every 2 s): leases expired for longer than ``orphan_grace_ms`` of jobs
  whose placing instance is dead, or is this one's previous life (same id, restarted):
  nobody holds their audio, so their slot is released (cancel_task) and their node told
  ``job_cancel``;
- **adoption** (:meth:`Recovery.adopt`, when a session resumes here): the jobs its previous
  owner placed come onto this instance's books;
- **Redis data loss** (:meth:`Recovery.redis_data_lost`): jobs Redis no longer knows are placed
  again afresh.

Nothing is swept, and no instance counts as dead, while Redis is out or within one liveness
TTL after it came back (``OutageClock.recent``): an outage lapses every instance's liveness.
"""

from __future__ import annotations

import base64
import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from scheduler.jobs import JobRequest, job_key_for
from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.placement.books import Books, Placement
from scheduler.store import liveness
from scheduler.store.redis_adapter import RedisAdapter, ScriptError, now_ms
from scheduler.store.resilient import every

if TYPE_CHECKING:
    from scheduler.placement.nodes import NodeRegistry
    from scheduler.store.scheduling import SchedulingClient

log = logging.getLogger("scheduler.dispatcher")  # (its events are the dispatcher's, as before the split)


class Recovery:
    """Takes the dispatcher's jobs back when their node, lease, instance or data is gone."""

    def __init__(self, books: Books, *, redis: RedisAdapter, scheduling: SchedulingClient, nodes: NodeRegistry,
                 metrics: Metrics, instance_id: str, orphan_grace_ms: int, watch_interval: float) -> None:
        self._books = books  # the placements and how to move, release or cancel one (dispatcher.py)
        self._redis = redis
        self._scheduling = scheduling
        self._nodes = nodes
        self._metrics = metrics
        self._instance_id = instance_id
        self._orphan_grace_ms = orphan_grace_ms
        self._watch_interval = watch_interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The periodic recoveries, until cancelled; no Redis error ends them (resilient.every)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(every, 1.0, self._expire_leases, name="lease_expiry", log=log))
            nursery.start_soon(partial(every, 2.0, self._sweep_orphans, name="orphan_sweep", log=log))
            nursery.start_soon(partial(every, self._watch_interval, self._watch_remote, name="remote_watch", log=log))
            task_status.started()

    async def adopt(self, session_id: str, epoch: int | None, missing: list[tuple[int, str]]) -> int:
        """A session resumed here still misses these (utterance index, target language)
        answers, and its previous owner (dead, or taken over) placed their jobs. Each job
        still dispatched or waiting in Redis, with its audio (``keep_audio``), comes onto
        this instance's books as if placed here: a dispatched one is watched (and moved, by
        this instance, when its node or node connection or node instance is gone), a
        waiting one is placed again. ``placed_by`` becomes this instance, so the orphan sweep
        leaves it alone. Returns how many were adopted."""
        index_of = {job_key_for(session_id, index, tgt): index for index, tgt in missing}
        found = await self._scheduling.claimed_jobs(session_id, [k for k in index_of if not self._books.holds(k)])
        adopted = []
        for job_key, job_id, job in found:
            index = index_of[job_key]
            if self._books.holds(job_key) or job.get("status") not in ("dispatched", "waiting") or not job.get("audio"):
                continue
            placement = self._adopted(job_key, job_id, index, session_id, epoch, job)
            self._books.placed[job_key] = placement
            self._metrics.jobs_in_flight.inc()
            if job["status"] == "waiting":
                self._books.move(placement, "ADOPTED_WAITING")
            adopted.append(job_id)
        if adopted:
            await self._scheduling.set_placed_by(adopted, self._instance_id)
            event(log, "jobs_adopted", session_id=session_id, jobs=len(adopted))
        return len(adopted)

    def _adopted(self, job_key: str, job_id: str, index: int, session_id: str, epoch: int | None, job: dict) -> Placement:
        """The placement a job hash describes (every field read here is written by
        dispatch_task), with the request rebuilt from what it kept; no turn action (the turn
        was its old owner's)."""
        now, now_wall = trio.current_time(), now_ms()
        request = JobRequest(
            job_key=job_key, session_id=session_id, utterance_index=index, src_lang=job["src_lang"], tgt_lang=job["tgt_lang"],
            turn_id=job["turn_id"], turn_action="none", turn_jobs=1, sample_rate=int(job["sample_rate"]),
            audio=base64.b64decode(job["audio"]), deadline=now + (int(job["deadline_ms"]) - now_wall) / 1000, epoch=epoch)
        lease = now + (int(job["lease_deadline_ts"]) - now_wall) / 1000
        return Placement(job_id=job_id, node_id=job["node_id"], attempt=int(job["attempt"]), request=request,
                         lease_deadline=lease, conn_id=job["conn_id"], outage_at=self._redis.outage.elapsed(now))

    async def node_lost(self, node_id: str, reason: str, *, conn_id: str = "") -> None:
        """The node's socket closed with jobs on it: dispatch each again elsewhere. With
        ``conn_id``, only the jobs placed on that connection (the node is back on a newer one)."""
        for placement in self._books.placements_on(node_id):
            if not conn_id or placement.conn_id == conn_id:
                self._books.move(placement, reason)

    async def _expire_leases(self) -> None:
        """This instance's jobs whose lease ran out move to another node.

        The lease deadline of each placement is kept here too, so the check costs no Redis
        call (the leases set in Redis is for other instances and for recovery). Time Redis
        was unavailable does not count (``Placement.lease_due``): while it is out nothing
        expires, and a lease set before an outage runs out that much later. Each node is
        told ``job_cancel``, here or over the relay."""
        now = trio.current_time()
        outage = self._redis.outage.elapsed(now)
        await self._take_back([p for p in self._books.placed.values() if p.lease_due(outage) <= now], "LEASE_EXPIRED")

    async def _take_back(self, placements: list[Placement], reason: str) -> None:
        """Move each placement on (attempt + 1), then tell its node ``job_cancel`` for the
        attempt it holds. Every move is made before the first await, so the placements
        (read from ``placed`` by the caller just before) are all still on the books."""
        for placement in placements:
            self._books.move(placement, reason)
        for placement in placements:
            await self._books.send_cancel(placement.node_id, placement.job_id, placement.attempt)

    async def _watch_remote(self) -> None:
        """Jobs placed here on nodes held by other instances: forget the answered ones, move
        those whose node or node connection or node instance is gone; and jobs on nodes here
        that came back on a new connection (module docstring).

        Two pipelined round trips per tick, only while there are jobs on other instances'
        nodes: the jobs' status and attempt with each node's state, then whether each node's
        instance is alive."""
        for placement in list(self._books.placed.values()):  # a node back here on a new connection lost its old jobs
            conn = self._nodes.get(placement.node_id)
            if conn is not None and placement.conn_id and conn.conn_id != placement.conn_id:
                self._books.move(placement, "NODE_RECONNECTED")
        remote = [p for p in self._books.placed.values() if p.node_id not in self._nodes]
        if not remote:
            return
        node_ids = sorted({p.node_id for p in remote})
        holding = {p.node_id: p.job_id for p in remote}  # (a job of each node: it names the node's shard)
        jobs, node_infos = await self._scheduling.watch([p.job_id for p in remote], [(n, holding[n]) for n in node_ids])
        infos = dict(zip(node_ids, node_infos, strict=True))
        owners = sorted({str(info[1]) for info in infos.values() if info[1]})
        lapsed_by_outage = self._liveness_unsure()
        alive = await liveness.alive(self._redis, owners, unsure=lapsed_by_outage)
        lost: list[Placement] = []
        for placement, (status, attempt) in zip(remote, jobs, strict=True):
            if self._books.placed.get(placement.request.job_key) is not placement:
                continue  # answered or moved while we looked
            online, owner, conn_id = infos[placement.node_id]
            if status is None:  # Redis lost it: redispatch finds no job and places it afresh; its node stops it
                lost.append(placement)
            elif status != "dispatched" or int(attempt or 0) != placement.attempt:
                self._books.answered(placement.request.job_key)  # answered or cancelled: off the books, nothing to move
            elif online != "1":
                self._books.move(placement, "NODE_LOST")
            elif owner not in alive:
                if not lapsed_by_outage:  # (its liveness may have lapsed in the outage: one more TTL to refresh it)
                    self._books.move(placement, "NODE_INSTANCE_LOST")
            elif placement.conn_id and conn_id != placement.conn_id:
                self._books.move(placement, "NODE_RECONNECTED")
        await self._take_back(lost, "JOB_LOST")

    async def redis_data_lost(self) -> None:
        """Redis restarted without its data (the health check saw its data marker change):
        every job placed here that Redis no longer knows is placed again (as a new job, under
        a new id), and its node is told ``job_cancel`` for the old one (Redis no longer counts
        it in the node's slots)."""
        placed = list(self._books.placed.values())
        replies = await self._scheduling.jobs_exist([p.job_id for p in placed])
        await self._take_back([p for p, exists in zip(placed, replies, strict=True)  # (unless answered meanwhile)
                               if exists == 0 and self._books.placed.get(p.request.job_key) is p], "JOB_LOST")

    async def _sweep_orphans(self, limit: int = 100) -> None:
        """Release the jobs whose placing instance is gone.

        Each instance moves its own jobs when their lease runs out (:meth:`_expire_leases`).
        A job whose instance died (kill -9) has nobody to do that: its lease stays in
        ``{scheduler}:leases`` and its slot stays taken on its node, even after the node
        reconnects here. So any instance looks at leases expired for longer than
        ``orphan_grace_ms``; a job not placed here whose placing instance (``placed_by``) is
        not alive is cancelled (cancel_task: slot released once), and its node gets
        ``job_cancel`` (here, or over the relay); nobody else holds its audio to place it again. (A resumed
        session resolves that utterance SKIPPED at its deadline.) Jobs of live instances are
        left to them, but for this instance's own id: a job placed under it that this process
        does not hold was placed by its previous life (the process was killed and started again
        under the same id, as ``--workers`` restarts a worker), whose id is alive again, so no
        other instance releases it. Nothing is swept while Redis is out, or within ``orphan_grace_ms`` (the
        instances' liveness TTL) after it came back: a long outage lets every instance's
        liveness lapse, because their refreshes failed (``OutageClock.recent``; the look at the
        leases is still made: it is how this instance sees Redis come back)."""
        expired = await self._scheduling.expired_leases(now_ms() - self._orphan_grace_ms, limit)
        if self._liveness_unsure():
            return
        for job_id in expired:
            if job_id in self._books.placed.job_keys:
                continue
            try:
                await self._release_orphan(str(job_id))
            except ScriptError as exc:  # one odd job must not stop the sweep of the others
                event(log, "orphan_release_refused", logging.WARNING, job_id=str(job_id), code=exc.code)

    def _liveness_unsure(self) -> bool:
        """Whether a lapsed instance may just not have refreshed its liveness yet: Redis is out,
        or came back less than one liveness TTL (``orphan_grace_ms``) ago (OutageClock.recent)."""
        return self._redis.outage.recent(trio.current_time(), self._orphan_grace_ms / 1000)

    async def _release_orphan(self, job_id: str) -> None:
        job_key, session_id, node_id, attempt, placed_by = await self._scheduling.orphan(job_id)
        if job_key is None:  # the job hash is gone: only the lease entry is left
            await self._scheduling.drop_lease(job_id)
            return
        previous_life = placed_by == self._instance_id
        if previous_life:
            if self._books.holds(job_key):
                return  # placed (or being moved) by this very process
        elif await liveness.alive(self._redis, [placed_by], unsure=self._liveness_unsure()):
            return  # its instance is alive and handles its leases
        reply = await self._books.release(job_id, job_key, node_id, int(attempt))
        if reply is not None and reply[0] == "OK":
            event(log, "orphan_job_released", job_id=job_id, job_key=job_key, node_id=node_id, session_id=session_id,
                  previous_life=previous_life)
