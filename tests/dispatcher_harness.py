"""The real :class:`Dispatcher` of two instances on a real Valkey, with scripted nodes and
sessions, under a manual MockClock.

What is real, per instance: the dispatcher (lanes, batches, moves, lease expiry, the remote
watch, the orphan sweep, adopt), the Redis adapter and its Lua scripts, the scheduling
client, ownership records, the node registry and the router, and the node gateway's own
handlers for what a node does (``_write_registration``, ``_job_result``, ``_leave``).
Left out: the WebSockets (a node is its :class:`NodeConnection` outbox, read by the test)
and the relay's transport (Redis Streams and Pub/Sub read by threads, tested across real
daemons in ``test_ownership.py``): a job or an answer for another instance is handed to
that instance's router at the next settle, as its relay reader would. Sessions are a recording inbox.

Time: Redis timestamps (leases, liveness, the orphan grace) come from :class:`VirtualWall`,
the MockClock from a fixed start, so leases run out as the test moves the clock.

Quiet: :meth:`DispatcherHarness.settle` returns when every task is blocked, no Redis call is
in flight and nothing waits in the relay, so a rule's effects are complete before the checks
read anything.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import logging
import time as real_time

import attrs
import redis.exceptions as redis_errors
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
from scheduler.protocol import Encoded, JobAssign, JobCancel, JobResult, Register, encode, parse_from_daemon
from scheduler.store import keys, liveness
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import RedisAdapter, connect, now_ms
from scheduler.store.scheduling import SchedulingClient

INSTANCES = ("i1", "i2")
SESSIONS = {"s0": "i1", "s1": "i1", "s3": "i1", "s2": "i2"}  # where each session starts (three share i1's lanes)
PAIRS = (("zh", "en"), ("zh", "de"))
LEASE_MS = 3000
RETRY_S = 0.25  # the Dispatcher's default retry_interval (the harness leaves it to the default)
ORPHAN_GRACE_MS = 1000
FOREVER_MS = 10**9  # liveness of an instance until the test kills it
SAMPLE_RATES = {"s0": 16000, "s1": 8000, "s2": 24000, "s3": 48000}  # per session, so a rate taken from the wrong place shows


def job_audio(job_key: str) -> bytes:
    """Each job's own 320 bytes of audio, so audio handed to the wrong job shows."""
    return hashlib.sha256(job_key.encode()).digest() * 10


class VirtualWall:
    """``time.time()`` for the code under test: the MockClock from a fixed start (real time
    outside the Trio run)."""

    def __init__(self) -> None:
        self.base = real_time.time()

    def time(self) -> float:
        try:
            return self.base + trio.current_time()
        except RuntimeError:
            return real_time.time()

    perf_counter = staticmethod(real_time.perf_counter)
    monotonic = staticmethod(real_time.monotonic)


class Inbox:
    """The sessions one instance holds; every outcome and waiting notice goes to ``got``,
    shared by the instances, in order (a SessionInbox)."""

    def __init__(self, got: list, sessions: set[str], instance_id: str, words: list) -> None:
        self.got = got
        self.sessions = sessions
        self.instance_id = instance_id
        self.epochs: dict[str, int] = {}  # the epoch of each session resumed here (as its actor's)
        self.words = words  # the dispatcher's words for the journal writers, shared by the instances, in order

    def epoch(self, session_id: str) -> int | None:
        return self.epochs.get(session_id) if session_id in self.sessions else None

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions

    def deliver(self, session_id: str, outcome: JobOutcome | JobWaiting) -> bool:
        if session_id not in self.sessions:
            return False
        self.got.append((session_id, outcome, self.instance_id))
        return True

    def take_over(self, session_id: str) -> None:
        self.sessions.discard(session_id)

    def journaled(self, session_id: str, utterance_index: int, written: bool) -> None:
        self.words.append((session_id, utterance_index, written))


@attrs.define
class Held:
    """A job as its node sees it: assigned, not cancelled, not answered."""

    job_key: str
    attempt: int


class Journal(logging.Handler):
    """Every record of the scheduler's loggers at INFO and above, each stamped ``at`` with the
    MockClock's time when it was logged inside the Trio run."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.at = trio.current_time()
        except RuntimeError:
            record.at = None
        self.records.append(record)


class Instance:
    """One scheduler instance's parts. ``alive`` until the test kills it (kill -9: nothing
    is cleaned up, its memory stays for the checks to read)."""

    def __init__(self, h: DispatcherHarness, instance_id: str, *, restarted: bool = False) -> None:
        self.h = h
        self.id = instance_id
        self.alive = True
        self.restarted = restarted  # started again under the id of a killed one: no session, and what
        # its previous life left is dropped first (Ownership.drop_previous_life)
        self.metrics = Metrics()
        self.nodes = NodeRegistry(self.metrics)
        self.inbox = Inbox(h.got, set() if restarted else {s for s, i in SESSIONS.items() if i == instance_id}, instance_id,
                           h.words)
        self.scope = trio.CancelScope()
        self.crash_next = self.crashed = 0  # placement rounds to crash, and crashed so far (_inject_crash)
        self.crashed_at = float("-inf")
        self.act_crash: tuple[int, bool] = (0, False)  # placements whose handling raises, and after acting? (_inject_crash)
        self.act_crashed_at = float("-inf")

    async def run(self, redis: RedisAdapter, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        h = self.h
        settings = Settings(instance_id=self.id, result_deadline_ms=30_000)
        scheduling = SchedulingClient(redis)
        self.ownership = Ownership(redis, self.id, FOREVER_MS, grace_ms=ORPHAN_GRACE_MS)  # (the TTL it stands for)
        if self.restarted:
            await self.ownership.drop_previous_life()
        await self.ownership.refresh()
        for session_id in self.inbox.sessions:
            await self.ownership.claim_session(session_id)
        self.router = Router(instance_id=self.id, url=h.url, redis=redis, metrics=self.metrics, nodes=self.nodes,
                             sessions=self.inbox, ownership=self.ownership,
                             answered=lambda key: self.dispatcher.answered(key), waiting_sessions=dict)
        self.dispatcher = Dispatcher(redis=redis, nodes=self.nodes, sessions=self.inbox, router=self.router,
                                     metrics=self.metrics, node_ttl_ms=600_000, job_lease_ms=LEASE_MS,
                                     queue_size=h.queue_size, place_batch=h.place_batch,  # (retry: the default)
                                     orphan_grace_ms=ORPHAN_GRACE_MS, instance_id=self.id, scheduling=scheduling,
                                     outage_hold=settings.result_deadline_ms / 1000)
        self.gateway = NodeGateway(nodes=self.nodes, settings=settings, redis=redis, scheduling=scheduling,
                                   dispatcher=self.dispatcher, router=self.router, sessions=self.inbox,
                                   metrics=self.metrics, ownership=self.ownership)
        self._wire_relay()
        self._inject_crash()
        with self.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.dispatcher.run)
                task_status.started()

    def _inject_crash(self) -> None:
        """While ``crash_next`` > 0, the next placement rounds raise (a bug in a lane). Every
        round places at most ``place_batch`` jobs in one pipeline."""
        place, place_many = self.dispatcher._place, self.dispatcher._scheduling.place_many

        async def bounded(src, tgt, items, ctx):
            assert len(items) <= self.h.place_batch, f"{len(items)} placements in one round"
            return await place_many(src, tgt, items, ctx)

        self.dispatcher._scheduling.place_many = bounded

        async def crashing(lane, batch):
            if self.crash_next > 0:
                self.crash_next -= 1
                self.crashed += 1
                self.crashed_at = trio.current_time()
                raise RuntimeError("a bug in a placement round (injected by the test)")
            return await place(lane, batch)

        self.dispatcher._place = crashing
        act = self.dispatcher._placed_or_code

        def acting(request, moving, reply, remote):
            """While ``act_crash`` counts, acting on a placement Redis made raises: before the
            books and the hand-over, or after them; or acting on a refusal (before: after it,
            a refusal may have resolved the job already, which acting never does before raising)."""
            left, after = self.act_crash
            placed = isinstance(reply, list) and reply[0] == "OK"
            if placed:  # (the order the dispatcher acts on placements: its lane's order, also for an id it reused)
                self.h.placed_seq.setdefault(str(reply[1]), len(self.h.placed_seq))
            if left > 0 and (placed or isinstance(reply, BaseException) and not after):
                self.act_crash = (left - 1, after)
                self.act_crashed_at = trio.current_time()
                self.h.acts_crashed.append(request.job_key)
                if after:
                    relayed = len(remote)
                    act(request, moving, reply, remote)
                    if len(remote) > relayed:  # counted a redispatch (if a move), but never relayed: dropped
                        self.h.unrelayed.append((request.job_key, str(reply[1]), int(reply[3])))
                raise RuntimeError("a bug acting on a placement (injected by the test)")
            return act(request, moving, reply, remote)

        self.dispatcher._placed_or_code = acting

    def _wire_relay(self) -> None:
        """Every placement the dispatcher hands on is recorded (to a node here, or towards
        another instance); what goes to another instance waits in the harness's relay until
        the next settle."""
        h, router = self.h, self.router
        to_node_here, to_node = router.to_node_here, router.to_node

        def record(node_id: str, assign: JobAssign) -> None:
            h.handed.append((assign.job_key, assign.job_id, assign.attempt, node_id, self.id))

        def handed_here(node_id: str, assign: JobAssign | Encoded) -> bool:
            if node_id in h.not_reading and router.node_is_here(node_id):
                return False  # its outbox is full: send_nowait refuses
            if isinstance(assign, JobAssign) and router.node_is_here(node_id):  # (relayed ones: below)
                record(node_id, assign)
            return to_node_here(node_id, assign)

        async def handed_on(node_id: str, msg: JobAssign | JobCancel) -> bool:
            if isinstance(msg, JobAssign):
                record(node_id, msg)
            return await to_node(node_id, msg)

        async def send_job(owner: str, node_id: str, msg: JobAssign | JobCancel) -> None:
            h.relay.append((msg.TYPE, owner, node_id, encode(msg)))

        async def send_outcome(owner: str, session_id: str, outcome: JobOutcome) -> int:
            if not h.instances[owner].alive:
                return 0
            if h.lose_outcomes > 0:  # a Pub/Sub message lost on its way (the answer stays stored in Redis)
                h.lose_outcomes -= 1
                h.unheard.add(job_key_for(session_id, outcome.utterance_index, outcome.tgt_lang))
                return 1
            h.relay.append(("outcome", owner, session_id, outcome))
            return 1

        router.to_node_here, router.to_node = handed_here, handed_on
        router.relay.send_job = send_job
        router.relay.send_outcome = send_outcome


class SpaceKeys:
    """The keys the checks read, with the tags of the harness' key space (layout 1 or 2)."""

    def __init__(self, space: KeySpace) -> None:
        self.space = space

    def job(self, job_id: str) -> str:
        return self.space.job_key(job_id)

    def node_info(self, node_id: str) -> str:
        return keys.node_info(node_id, tag=self.space.node_tag(node_id))

    def node_jobs(self, node_id: str) -> str:
        return keys.node_jobs(node_id, tag=self.space.node_tag(node_id))

    def node_runtime(self, node_id: str) -> str:
        """The runtime table of the node's shard (its fields: keys.runtime_field)."""
        return keys.nodes_runtime(tag=self.space.node_tag(node_id))

    def session(self, session_id: str) -> str:
        return self.space.session_key(session_id)

    def jobkey(self, job_key: str) -> str:
        return self.space.jobkey_key(keys.session_of(job_key), job_key)

    def lease_ids(self, r, low="-inf", high="+inf") -> list[str]:
        """Ids of the jobs with a lease between ``low`` and ``high``, in every shard."""
        return [j for key in self.space.all_leases() for j in r.zrangebyscore(key, low, high)]

    def lease_of(self, r, job_id: str) -> float | None:
        return r.zscore(keys.leases(tag=self.space.job_tag(job_id)), job_id)


class DispatcherHarness:
    """Owns the parts inside a Trio run; every method runs there."""

    def __init__(self, url: str, *, queue_size: int, place_batch: int, wall_base: float, shards: int = 1) -> None:
        self.url = url
        self.space = KeySpace(shards)  # layout 1, or layout 2 with this many shards
        self.wall_base = wall_base  # VirtualWall.base: Trio time 0 in epoch seconds
        self.queue_size = queue_size
        self.place_batch = place_batch
        self.got: list[tuple[str, JobOutcome | JobWaiting, str]] = []  # (session, outcome, delivered by)
        self.words: list[tuple[str, int, bool]] = []  # (session, index, written): Inbox.journaled, every instance
        self.instances = {i: Instance(self, i) for i in INSTANCES}
        self.killed_at: dict[str, float] = {}  # instance id -> when it was last killed
        self.restarted_at: dict[str, float] = {}  # ... and started again
        self.past: list[Instance] = []  # killed instances started again since: their memory, for the checks
        self.where: dict[str, str] = {}  # node id -> the instance it is connected to
        self.held: dict[str, dict[str, Held]] = {}  # node id -> job id -> what it holds (on this connection)
        self.old: dict[str, list[tuple[str, int]]] = {}  # node id -> (job id, attempt) it got and lost
        self.relay: list[tuple] = []  # (message type, owner, node id, text) | ("outcome", owner, session id, outcome)
        self._inflight = 0
        self.handed: list[tuple[str, str, int, str, str]] = []  # placements: (job key, job id, attempt, node id, by instance)
        self.flushes: list[int] = []  # len(handed) each time Redis lost its data
        self.placed_seq: dict[str, int] = {}  # job id -> when the dispatcher acted on its placement (0, 1, ...)
        self.lose_outcomes = 0  # relayed answers to lose (Pub/Sub drops a message)
        self.not_reading: set[str] = set()  # nodes whose outbox is full: a hand-over here fails
        self.acts_crashed: list[str] = []  # job keys whose placement's handling raised (Instance.act_crash)
        self.unrelayed: list[tuple[str, str, int]] = []  # (job key, job id, attempt) of those bound for a relay
        self.unheard: set[str] = set()  # job keys whose relayed answer was lost: their placer learns it from Redis
        self.queued_since: dict[str, float] = {}  # job key -> when it last entered a lane (submitted, or moved)
        self._moving: dict[str, int] = {}  # job key -> the placement it is moving from (by identity)
        self.requests: dict[str, list[JobRequest]] = {}  # job key -> what the session submitted (each copy)
        self._conn_ids = itertools.count(1)
        self.dropped: dict[str, tuple[float, str]] = {}  # node connection id -> (when it dropped, its instance)
        self._quiet = trio.Event()
        self.down = False  # a Redis outage: every adapter call fails
        self.replies_lost = False  # Redis times out: every call runs, and its reply is lost
        self.pools_churn = False  # the pool tables change before every placement (nodes registering in a burst)
        self._churned = itertools.count(1)
        self.up_since = 0.0  # when the last outage ended

    def __getitem__(self, instance_id: str) -> Instance:
        return self.instances[instance_id]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with RedisAdapter(self.url, pool_size=1, space=self.space) as redis:  # one batcher: Redis sees the calls in
            # Trio's order
            self.redis = redis
            self._count_calls(redis)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for instance in self.instances.values():
                    await nursery.start(instance.run, redis)
                task_status.started()

    def _count_calls(self, redis: RedisAdapter) -> None:
        """Every adapter call counts as in flight until it returns (see :meth:`settle`); while
        ``down``, every batch fails as if Redis could not be reached; while ``replies_lost``,
        every batch of scripts (the writes) runs and then fails as a timeout would (an ambiguous
        outcome), and every other batch fails as in an outage; while ``pools_churn``, a new
        version of the pool tables is written before every batch that places a job, as a node
        registering would (so each placement, and each of its retries, is STALE_CANDIDATES)."""
        execute = redis._execute_sync
        placing = {"dispatch_task", "redispatch_task", "shard_dispatch", "shard_redispatch"}

        def execute_or_fail(batch):
            if self.pools_churn and any(call.script in placing for call in batch):
                churn = f"churn/{next(self._churned)}"
                with connect(self.url) as client:
                    for tag in dict.fromkeys(self.space.shard_tags):
                        client.hset(keys.nodes_runtime(tag=tag), "#pools", churn)
            if self.down:
                raise redis_errors.ConnectionError("Redis is down (the test's outage)")
            if self.replies_lost:  # scripts (the writes) run; reads fail as in an outage
                if all(call.script is not None for call in batch):
                    execute(batch)
                    raise redis_errors.TimeoutError("Timeout reading from socket (the test's lost replies)")
                raise redis_errors.ConnectionError("Redis is down (the test's lost replies)")
            return execute(batch)

        redis._execute_sync = execute_or_fail
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
        """Until every task is blocked, no Redis call is in flight and the relay is empty;
        then the nodes read."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if self._inflight:
                await self._quiet.wait()
            elif self.relay:
                self._deliver_relayed()
            else:
                break
        self._read_outboxes()
        moving = {(i.id, key): id(p) for i in self.instances.values() if i.alive for key, p in i.dispatcher._moving.items()}
        for (instance_id, job_key), placement in moving.items():  # moved off its node since the last settle: now
            if self._moving.get((instance_id, job_key)) != placement:
                self.queued_since[job_key] = trio.current_time()
        self._moving = moving

    def _deliver_relayed(self) -> None:
        relayed, self.relay = self.relay, []
        for kind, owner, target, payload in relayed:
            instance = self.instances[owner]
            if not instance.alive:
                continue  # its stream waits for a reader that never comes back
            if kind == "outcome":
                instance.router._answer_from_relay(target, payload)
            else:
                instance.router._job_from_relay(target, payload, kind)

    async def advance(self, seconds: float) -> None:
        """Move the clock in steps of at most the retry interval, settling after each."""
        clock = trio.lowlevel.current_clock()
        end = trio.current_time() + seconds
        while trio.current_time() < end - 1e-9:
            clock.jump(min(RETRY_S, end - trio.current_time()))
            await self.settle()

    # ------------------------------------------------------------ what nodes do

    async def connect(self, node_id: str, max_jobs: int, pairs: list[tuple[str, str]], instance_id: str) -> None:
        """As the node gateway does on a node's register: Redis, the registry, the lanes told."""
        instance = self.instances[instance_id]
        reg = Register(node_id=node_id, lang_pairs=[list(p) for p in pairs], max_jobs=max_jobs)
        conn = NodeConnection(node_id, max_jobs, reg, conn_id=f"{node_id}-{next(self._conn_ids)}")
        await instance.gateway._write_registration(reg, conn.conn_id)
        instance.nodes.add(conn)
        self.held[node_id] = {}
        self.where[node_id] = instance_id
        instance.dispatcher.slot_freed()

    async def report_load(self, node_id: str, score: float | None) -> None:
        """The node's heartbeat with a load score, through the node gateway's heartbeat writer
        (above ``--node-load-threshold``: saturated, no new jobs; back below: lanes retry),
        in one batch with the heartbeats of the instance's other nodes (their values unchanged)."""
        instance = self.instances[self.where[node_id]]
        conn = instance.nodes.get(node_id)
        conn.load_score = score
        others = [c for c in instance.nodes.all() if c is not conn]
        await instance.gateway.heartbeats.write([conn, *others])

    async def drain(self, node_id: str) -> None:
        """The node sends ``drain``, through the node gateway's own handler (no new jobs from
        any instance; a drain Redis did not take is written again by the next heartbeat)."""
        instance = self.instances[self.where[node_id]]
        await instance.gateway._drain(instance.nodes.get(node_id))

    def draining(self) -> dict[str, str]:
        """The connected nodes whose connection is draining -> that connection's id."""
        out = {}
        for node_id, where in self.where.items():
            conn = self.instances[where].nodes.get(node_id)
            if conn.draining:
                out[node_id] = conn.conn_id
        return out

    def saturated(self) -> set[str]:
        """The connected nodes whose last load score was above the threshold, as their gateway judged."""
        return {n for n, where in self.where.items() if self.instances[where].nodes.get(n).saturated}

    def _drop(self, node_id: str, conn_id: str) -> None:
        """The node's connection is gone: what it held is lost to it."""
        self.dropped[conn_id] = (trio.current_time(), self.where[node_id])
        self.old.setdefault(node_id, []).extend((job_id, h.attempt) for job_id, h in self.held.pop(node_id).items())
        del self.where[node_id]

    async def disconnect(self, node_id: str) -> None:
        """As the node gateway does when a node's socket closes."""
        instance = self.instances[self.where[node_id]]
        conn = instance.nodes.get(node_id)
        instance.nodes.remove(conn)
        conn.outbox_send.close()
        self._drop(node_id, conn.conn_id)
        await instance.gateway._leave(conn, "disconnected")

    async def bounce(self, node_id: str, max_jobs: int, instance_id: str, late: bool = False) -> None:
        """The node's socket drops and it registers again at once (same pairs), on ``instance_id``:
        a new connection, which holds none of the old one's jobs. ``late``: the old socket's
        clean-up (``_leave``) runs only after the new registration (its instance was slow to
        see the close): it must leave the new connection online, owned and placeable."""
        old_instance = self.instances[self.where[node_id]]
        pairs = [tuple(p) for p in old_instance.nodes.get(node_id).registration.lang_pairs]
        if not late:
            await self.disconnect(node_id)
            await self.connect(node_id, max_jobs, pairs, instance_id)
            return
        conn = old_instance.nodes.get(node_id)
        old_instance.nodes.remove(conn)
        conn.outbox_send.close()
        self._drop(node_id, conn.conn_id)
        await self.connect(node_id, max_jobs, pairs, instance_id)
        await old_instance.gateway._leave(conn, "disconnected")

    async def kill(self, instance_id: str) -> None:
        """kill -9: the instance stops at once, its nodes lose their connections, its
        liveness lapses now (as it would ``owner_ttl_ms`` later), and nothing is cleaned up."""
        instance = self.instances[instance_id]
        instance.alive = False
        self.killed_at[instance_id] = trio.current_time()
        instance.scope.cancel()
        for node_id in [n for n, i in self.where.items() if i == instance_id]:
            self._drop(node_id, instance.nodes.get(node_id).conn_id)
        await self.redis.command("DEL", keys.instance(instance_id))
        await liveness.mark(self.redis, instance_id, now_ms() - 1)

    def lives(self) -> list[Instance]:
        """Every instance process there has been: the current ones and the killed ones started again."""
        return [*self.instances.values(), *self.past]

    async def restart(self, instance_id: str) -> None:
        """The supervisor starts a killed instance again under the same id: a new process with
        empty books and no session (its clients resume elsewhere, or never)."""
        old = self.instances[instance_id]
        assert not old.alive
        self.past.append(old)
        self.restarted_at[instance_id] = trio.current_time()
        self.instances[instance_id] = Instance(self, instance_id, restarted=True)
        await self._nursery.start(self.instances[instance_id].run, self.redis)

    async def lose_data(self) -> None:
        """Redis restarts without its data, and what each live instance and node does about
        it, short of the dispatcher's own part (:meth:`notice_data_loss`): liveness and owner
        records written again (``Ownership.refresh``/``reassert``), each node registered
        again on its connection (its next heartbeat: ``node_registered_again``)."""
        self.flushes.append(len(self.handed))
        await self.redis.command("FLUSHALL")
        for instance in self.instances.values():
            if instance.alive:
                await instance.ownership.refresh()
                await instance.ownership.reassert(sorted(instance.inbox.sessions), [c.node_id for c in instance.nodes.all()])
                for conn in instance.nodes.all():
                    await instance.gateway._write_registration(conn.registration, conn.conn_id)

    async def notice_data_loss(self) -> None:
        """The health check saw the data marker change: each live dispatcher's part."""
        for instance in self.instances.values():
            if instance.alive:
                await instance.dispatcher.recovery.redis_data_lost()

    def generations(self) -> list[list[tuple[str, str, int, str, str]]]:
        """``handed``, cut where Redis lost its data (job ids and keys start afresh there)."""
        cuts = [0, *self.flushes, len(self.handed)]
        return [self.handed[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]

    async def answer(self, node_id: str, job_id: str, attempt: int, ok: bool) -> None:
        held = self.held.get(node_id, {})
        if job_id in held and held[job_id].attempt == attempt:
            del held[job_id]
        result = JobResult(job_id=job_id, attempt=attempt, status="ok" if ok else "error",
                           source_text="src" if ok else None, text=f"{job_id}:{attempt}" if ok else None)
        instance = self.instances[self.where[node_id]]
        await instance.gateway._job_result(instance.nodes.get(node_id), result)

    def _read_outboxes(self) -> None:
        for node_id, instance_id in self.where.items():
            conn = self.instances[instance_id].nodes.get(node_id)
            while True:
                try:
                    msg = conn.outbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                held = self.held[node_id]
                if isinstance(msg, Encoded):  # relayed from another instance, as the node reads it
                    msg = parse_from_daemon(msg.text, "node")
                if isinstance(msg, JobAssign):
                    assert msg.job_id not in held, f"{node_id} got job {msg.job_id} again while holding it"
                    self.check_assign(msg)
                    held[msg.job_id] = Held(msg.job_key, msg.attempt)
                elif isinstance(msg, JobCancel):
                    h = held.get(msg.job_id)
                    if h is not None and h.attempt == msg.attempt:
                        del held[msg.job_id]
                        self.old.setdefault(node_id, []).append((msg.job_id, msg.attempt))
                else:
                    raise AssertionError(f"node {node_id} got {msg!r}")

    def wall_ms(self, deadline: float) -> float:
        """A Trio-clock instant as the epoch milliseconds Redis and nodes see (VirtualWall)."""
        return (self.wall_base + deadline) * 1000

    def check_assign(self, msg: JobAssign) -> None:
        """Every field of a ``job_assign`` is the request the session made (one of its copies)."""
        def same(r: JobRequest) -> bool:
            return ((msg.session_id, msg.utterance_index, msg.job_type, msg.src_lang, msg.tgt_lang, msg.turn_id,
                     msg.sample_rate, msg.audio) ==
                    (r.session_id, r.utterance_index, r.job_type, r.src_lang, r.tgt_lang, r.turn_id, r.sample_rate,
                     base64.b64encode(r.audio).decode()) and abs(msg.deadline_ms - self.wall_ms(r.deadline)) <= 2)

        assert any(same(r) for r in self.requests.get(msg.job_key, [])), \
            f"job_assign of job {msg.job_id} attempt {msg.attempt} is no request of {msg.job_key}"

    # ------------------------------------------------------------ what sessions do

    def owner(self, session_id: str) -> Instance | None:
        """The live instance holding the session (None: its instance died, no resume yet)."""
        for instance in self.instances.values():
            if instance.alive and session_id in instance.inbox:
                return instance
        return None

    def submit(self, session_id: str, index: int, pair: tuple[str, str], ttl_s: float, epoch: int | None = None) -> str | None:
        request = JobRequest(job_key=job_key_for(session_id, index, pair[1]), session_id=session_id, utterance_index=index,
                             src_lang=pair[0], tgt_lang=pair[1], turn_id=f"{session_id}:t", turn_action="none", turn_jobs=1,
                             sample_rate=SAMPLE_RATES[session_id], audio=job_audio(job_key_for(session_id, index, pair[1])),
                             deadline=trio.current_time() + ttl_s, epoch=epoch,
                             finalize_reason="pause" if pair == PAIRS[0] else "")  # (one lane: an utterance's first job)
        self.queued_since[request.job_key] = trio.current_time()
        self.requests.setdefault(request.job_key, []).append(request)
        return self.owner(session_id).dispatcher.submit_nowait(request)

    async def cancel(self, session_id: str, job_keys: list[str]) -> None:
        await self.owner(session_id).dispatcher.cancel(session_id, job_keys)

    async def resume(self, session_id: str, instance_id: str, missing: list[tuple[int, str]], epoch: int) -> int:
        """The client resumes the session on ``instance_id`` at ``epoch``, as the client
        gateway does: the session's epoch (session_resume.lua moves it on), the owner record,
        the answers Redis kept, then adopt. Returns how many jobs were adopted."""
        instance = self.instances[instance_id]
        await self.redis.command("HSET", self.space.session_key(session_id), "epoch", epoch)
        await instance.ownership.claim_session(session_id)
        instance.inbox.sessions.add(session_id)  # the new actor, registered at its epoch
        instance.inbox.epochs[session_id] = epoch
        await instance.router.take_stored({session_id: missing})
        count = await instance.dispatcher.recovery.adopt(session_id, epoch, missing)
        for job_key in (job_key_for(session_id, index, tgt) for index, tgt in missing):
            if job_key in instance.dispatcher.placed:
                self.queued_since[job_key] = trio.current_time()
        return count
