"""The dispatcher under Hypothesis: the real :class:`Dispatcher` of two instances on a real
Valkey, with scripted nodes and sessions and a manual MockClock (``dispatcher_harness.py``).

Rules: nodes connect to either instance (with 1-3 slots, one or both language pairs) and
disconnect; sessions submit jobs (deadlines from 0.3 s to 30 s, into a queue of 4 or 6,
placed in batches of 1, 2 or 32), submit one again, and cancel them; nodes answer what they
hold (ok or error), answer again, and answer attempts they lost; time moves (lease expiry at
3 s, lane retries every 0.25 s, the remote watch every second, the orphan sweep every 2 s);
a session is resumed elsewhere (fenced: its epoch moves on); instance i2 is killed (kill -9)
and its session resumed on i1 (the stored answers taken, the jobs adopted); two of these
happen in one tick, with Trio's scheduler order drawn by Hypothesis.

Checked after every step (:meth:`DispatcherMachine.check`):

- Redis: per node, ``current_jobs`` == its job set, within ``max_jobs``; the jobs dispatched
  anywhere are all on some instance's books; each placed job's hash names its node and
  attempt; a job key maps to one job id;
- nodes: a job placed on a node connection is held by it, at that attempt; a node holds
  only jobs Redis has dispatched on it at that attempt (every other one it was told
  ``job_cancel``, here or over the relay); a node never gets a job it holds again;
- sessions: at most one outcome per job, and exactly the answer of the attempt that was live
  (its text, its status), or ``FAILED``/``FENCED`` for a fenced session's new job; none for a
  job cancelled, refused or lost, nor for an answer kept in Redis while its session had no
  owner (it comes with the resume); ``waiting`` notices alternate per instance, "waiting"
  first;
- order: per instance and language pair, first placements follow submission order;
- books: the queued count, the lanes and the gauges agree; no job waits past its deadline
  by more than one retry, no placement outlives its lease by more than the expiry tick; an
  adopted job is on i1's books as its job hash and its session's request describe it; a
  retry interval after time moves, no fresh job waits while a node of its pair has a free
  slot;
- counters: ``OVERLOADED`` refusals, redispatches (placements of attempt > 1) and, at the
  end, finished jobs match what happened; every label is a known status or code;
- logs: nothing at ERROR; every dispatcher event is a known one at its level, with fields
  that name real jobs, nodes and codes; a ``job_moving`` names a placement that was made.

At the end (liveness): a node with room for everything joins, the nodes answer, time moves:
every job ends (answered, cancelled, refused, fenced, dropped at its deadline, or lost with
its instance), no slot or lease is left in Redis, and the live instances' books are empty.
"""

from __future__ import annotations

import base64
import json
import logging
import os

import attrs
import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from scheduler.jobs import JobOutcome, JobWaiting, job_key_for
from scheduler.placement import dispatcher as dispatcher_module
from scheduler.store import keys, lua
from scheduler.store import redis_adapter as redis_adapter_module
from scheduler.store.redis_adapter import connect

from .dispatcher_harness import (
    ORPHAN_GRACE_MS,
    PAIRS,
    RETRY_S,
    SAMPLE_RATES,
    SESSIONS,
    DispatcherHarness,
    Journal,
    SpaceKeys,
    VirtualWall,
    job_audio,
)
from .session_rules import step_limit
from .trio_thread import TrioThread

NODES = ("n0", "n1", "n2")


def placed_order(job_id: str) -> int:
    """The number of a job id (a layout-2 id is ``<shard>.<number>``)."""
    return int(job_id.rpartition(".")[2])


JOB_FIELDS = ("job_key", "session_id", "utterance_index", "src_lang", "tgt_lang", "turn_id", "sample_rate", "audio",
              "placed_by", "conn_id", "deadline_ms", "lease_deadline_ts")
EPS = 1e-6
LAPSE_S = 3.0  # an outage at least this long lets an instance's liveness lapse (owner_ttl_ms' default)
HOLD_S = 30.0  # the result deadline (dispatcher_harness: result_deadline_ms): an outage moves a job deadline at most this
WATCH_S = 1.0  # the remote watch's interval (Dispatcher's default)
SWEEP_S = 2.0  # the orphan sweep's
CODES = {"NO_AVAILABLE_NODE", "EMPTY_POOL", "NO_POOL_FOR_LANG_PAIR", "REDIS_UNAVAILABLE", "NODE_UNREACHABLE",
         "JOB_ID_TAKEN", "UNKNOWN_JOB", "FENCED", "OVERLOADED", "INTERNAL", "STALE_CANDIDATES"}
SEEN_WITHIN_S = 2.0  # the orphan sweep's period: an outage is seen by a failing call at most this late
REASONS = {"NODE_LOST", "LEASE_EXPIRED", "NODE_INSTANCE_LOST", "NODE_RECONNECTED", "JOB_LOST", "NODE_UNREACHABLE",
           "ADOPTED_WAITING"}
EVENTS = {  # dispatcher event -> its level
    "job_moving": logging.INFO, "dispatch_blocked": logging.WARNING, "dispatch_unblocked": logging.INFO,
    "duplicate_job_blocked": logging.WARNING, "job_failed": logging.INFO, "dispatch_outcome_recovered": logging.INFO, "jobs_adopted": logging.INFO,
    "orphan_job_released": logging.INFO, "orphan_release_refused": logging.WARNING,
    # the periodic tasks during a Redis outage (resilient.every)
    "orphan_sweep_failed": logging.WARNING, "orphan_sweep_recovered": logging.INFO,
    "remote_watch_failed": logging.WARNING, "remote_watch_recovered": logging.INFO,
    "claim_burned": logging.INFO,  # layout 2: a claim whose job never came (store/placing.py)
    "job_relocated": logging.INFO,  # layout 2: a move its shard could not take went to another shard (store/placing.py)
}


async def _inline(fn, *args, limiter=None, **_):
    await trio.lowlevel.checkpoint()
    return fn(*args)


@attrs.define
class Job:
    key: str
    pair: tuple[str, str]
    seq: int
    deadline: float
    instance: str  # where it was submitted
    refused: bool = False
    cancelled_at: int | None = None  # the inbox length when the session cancelled it
    answer: tuple[str, str | None] | None = None  # (status, text) of the live attempt's answer
    racing: bool = False  # answered and cancelled in one tick: either may win
    fenced: bool = False  # its session was fenced before it was placed: FAILED(FENCED) may come
    ahead: int | None = None  # submitted at a quiet point: its session's fresh jobs queued ahead of it then
    mark: int = 0  # len(handed) when it was submitted
    stored: bool = False  # answered while its session had no owner: kept in Redis until a resume
    owner_killed: bool = False  # the instance it was submitted to was killed (restarted since, maybe)


class DispatcherMachine(RuleBasedStateMachine):
    url: str = ""
    SHARDS = 1  # key layout 1; TwoShardMachine runs layout 2
    NODES = NODES

    @initialize(queue_size=st.sampled_from([4, 6]), place_batch=st.sampled_from([1, 2, 32]),
                layout=st.sampled_from(["none", "i1", "i2", "both"]))
    def start(self, queue_size, place_batch, layout):
        self.r = connect(self.url, decode_responses=True)
        self.r.flushall()
        # Redis calls run inline in the Trio thread, not in a worker thread: when a reply
        # comes back is then no race against the clock, and a failing example replays
        # exactly (Trio's scheduler order is seeded by Hypothesis). Redis timestamps follow
        # the MockClock.
        self._to_thread, trio.to_thread.run_sync = trio.to_thread.run_sync, _inline
        self._wall = VirtualWall()
        self._time = redis_adapter_module.time, dispatcher_module.time
        redis_adapter_module.time = dispatcher_module.time = self._wall
        self.journal = Journal()
        scheduler_log = logging.getLogger("scheduler")
        self._level = scheduler_log.level
        scheduler_log.setLevel(logging.INFO)
        scheduler_log.addHandler(self.journal)
        self.seen_records = 0
        self.trio = TrioThread()
        self.h = self.trio.call_sync(lambda: DispatcherHarness(self.url, queue_size=queue_size, place_batch=place_batch,
                                                                   wall_base=self._wall.base, shards=self.SHARDS))
        self.k = SpaceKeys(self.h.space)
        self.trio.call(lambda: self.trio.nursery.start(self.h.run))
        self.jobs: dict[str, Job] = {}
        self.next_index = 0
        self.max_jobs: dict[str, int] = {}
        self.held_when_saturated: dict[str, set[str]] = {}  # saturated node -> its jobs in Redis then (no new one since)
        self.held_when_draining: dict[tuple[str, str], set[str]] = {}  # (draining node, conn) -> its jobs in Redis
        # once Redis knew of the drain (no new one since)
        self.fenced: set[str] = set()
        self.act_failures: list[str] = []  # job keys of the placement_crashed records (act_crash)
        self.killed_moving: tuple[set[str], float] = (set(), 0.0)  # (job ids i2 was moving, when) at its kill
        self.astray: set[str] = set()  # job ids whose records a path set astray on purpose (orphan_key_mismatch)
        self.epochs = dict.fromkeys(SESSIONS, 1)  # each session's epoch as its owner knows it
        self.blocked: dict[tuple[str, str], int] = {}  # pair -> dispatch_blocked minus dispatch_unblocked events
        self.resubmitted: set[str] = set()
        self.outages: list[tuple[float, float]] = []  # (start, end) of each Redis outage so far
        self.lapsed = False  # the live instances' liveness lapsed in an outage, and is not refreshed yet
        # nodes from the start (most paths need one): none, one on either instance, or one on each
        for node, instance, max_jobs in {"none": [], "i1": [("n0", "i1", 2)], "i2": [("n0", "i2", 2)],
                                         "both": [("n0", "i1", 1), ("n1", "i2", 2)]}[layout]:
            self.max_jobs[node] = max_jobs
            self.do("connect", self.h.connect, node, max_jobs, list(PAIRS), instance)

    def teardown(self):
        if not hasattr(self, "trio"):
            return
        try:
            with step_limit("finish"):
                self.finish()
        finally:
            self.trio.close()
            trio.to_thread.run_sync = self._to_thread
            redis_adapter_module.time, dispatcher_module.time = self._time
            scheduler_log = logging.getLogger("scheduler")
            scheduler_log.removeHandler(self.journal)
            scheduler_log.setLevel(self._level)
            self.r.close()

    # ------------------------------------------------------------ steps

    def do(self, name, fn, *args):
        with step_limit(name):
            self.trio.call(fn, *args)
            self.trio.call(self.h.settle)
            self.check()

    @property
    def now(self) -> float:
        return self.trio.clock.current_time()

    @property
    def connected(self) -> list[str]:
        return sorted(self.h.held)

    @property
    def alive(self) -> list[str]:
        return [i for i, instance in self.h.instances.items() if instance.alive]

    def _held(self) -> list[tuple[str, str, int]]:
        return sorted((n, job_id, h.attempt) for n, jobs in self.h.held.items() for job_id, h in jobs.items())

    def _orphaned(self, session_id: str) -> bool:
        return self.h.owner(session_id) is None

    # ------------------------------------------------------------ rules: nodes

    @precondition(lambda self: len(self.h.held) < len(self.NODES))
    @rule(data=st.data(), max_jobs=st.integers(1, 3), pairs=st.sampled_from([PAIRS, PAIRS[:1], PAIRS[1:]]))
    def connect_node(self, data, max_jobs, pairs):
        node = data.draw(st.sampled_from([n for n in self.NODES if n not in self.h.held]))
        instance = data.draw(st.sampled_from(self.alive))
        self.max_jobs[node] = max_jobs
        self.do("connect", self.h.connect, node, max_jobs, list(pairs), instance)

    @precondition(lambda self: self.h.held)
    @rule(data=st.data())
    def disconnect_node(self, data):
        self.do("disconnect", self.h.disconnect, data.draw(st.sampled_from(self.connected)))

    @precondition(lambda self: self.h.held)
    @rule(data=st.data())
    def bounce_node(self, data):
        """A node's socket drops and it registers again at once, here or on the other
        instance: a new connection, which holds none of the old one's jobs. Sometimes the old
        socket's clean-up runs only after the new registration (``late``)."""
        node = data.draw(st.sampled_from(self.connected))
        instance = data.draw(st.sampled_from(self.alive))
        late = data.draw(st.booleans())
        self.do("bounce", self.h.bounce, node, self.max_jobs[node], instance, late)

    @precondition(lambda self: self.h.held)
    @rule(data=st.data(), score=st.sampled_from([None, 0.2, 0.9]))
    def report_load(self, data, score):
        """A heartbeat's load score: 0.9 is above the default threshold (0.75), so the node gets
        no new job until a later one is not (the Redis state checks: no placement on it)."""
        node = data.draw(st.sampled_from(self.connected))
        self.do("load", self.h.report_load, node, score)
        if not (self.h.down or self.h.replies_lost):
            assert self.r.hget(self.k.node_info(node), "saturated") == ("1" if score == 0.9 else "0")
            if node in self.h.draining():  # a drain Redis missed is written by the node's next heartbeat
                assert self.r.hget(self.k.node_info(node), "draining") == "1", f"{node} drains, Redis does not know"
        if node in self.h.saturated():
            self.held_when_saturated.setdefault(node, set(self.r.smembers(self.k.node_jobs(node))))

    @precondition(lambda self: self.h.held)
    @rule(data=st.data())
    def drain_node(self, data):
        """A node sends ``drain``, sometimes as Redis refuses that one call (then only its next
        heartbeat, the ``report_load`` rule, gets it to Redis). From the moment Redis knows, no instance places
        a job on it (:meth:`_check_draining_nodes`)."""
        node = data.draw(st.sampled_from(self.connected))
        if not data.draw(st.booleans()):
            self.do("drain", self.h.drain, node)
            return
        self.h.down = True  # Redis refuses this one call (a blip): the drain's own write is lost
        try:
            self.do("drain", self.h.drain, node)
        finally:
            self.h.down = False
            self.h.up_since = self.now
            self.outages.append((self.now, self.now))

    def _check_draining_nodes(self):
        """A draining node whose drain Redis holds gets no new job while on that connection;
        and after a heartbeat that got through, Redis holds it (``report_load`` checks that)."""
        draining = self.h.draining()
        for key in [k for k in self.held_when_draining if draining.get(k[0]) != k[1]]:
            del self.held_when_draining[key]
        for node, conn_id in draining.items():
            if (node, conn_id) not in self.held_when_draining and self.r.hget(self.k.node_info(node), "draining") == "1":
                self.held_when_draining[(node, conn_id)] = set(self.r.smembers(self.k.node_jobs(node)))
        for (node, _), before in self.held_when_draining.items():
            new = set(self.r.smembers(self.k.node_jobs(node))) - before
            assert not new, f"jobs {sorted(new)} placed on {node}, which is draining"

    def _check_saturated_nodes(self):
        """A node stays saturated until a later score is not, or it connects again; meanwhile
        no job is placed on it."""
        saturated = self.h.saturated()
        for node in [n for n in self.held_when_saturated if n not in saturated]:
            del self.held_when_saturated[node]
        for node, before in self.held_when_saturated.items():
            new = set(self.r.smembers(self.k.node_jobs(node))) - before
            assert not new, f"jobs {sorted(new)} placed on {node}, whose load score is above the threshold"

    def _answer(self, node, job_id, attempt, ok):
        """The answer of what ``node`` holds: the job's answer, if Redis has that attempt live there."""
        status, holder, current, key = self.r.hmget(self.k.job(job_id), "status", "node_id", "attempt", "job_key")
        if (status, holder, current) != ("dispatched", node, str(attempt)):
            return
        job = self.jobs[key]
        job.answer = ("SUCCESS", f"{job_id}:{attempt}") if ok else ("FAILED", None)
        job.stored = self._orphaned(key.split(":")[0])

    @precondition(lambda self: any(self.h.held.values()))
    @rule(data=st.data(), ok=st.booleans())
    def answer(self, data, ok):
        node, job_id, attempt = data.draw(st.sampled_from(self._held()))
        self._answer(node, job_id, attempt, ok)
        self.do("answer", self.h.answer, node, job_id, attempt, ok)

    @precondition(lambda self: any(self.h.old.get(n) for n in self.h.held))
    @rule(data=st.data())
    def answer_lost_attempt(self, data):
        """A node answers a job it lost (moved away, cancelled, or held on its previous
        connection): refused once the job moved on; while Redis still has that attempt on
        this node (a move not yet made), it is the job's answer, taken once."""
        node, (job_id, attempt) = data.draw(st.sampled_from([(n, o) for n in self.connected for o in self.h.old.get(n, [])]))
        self._answer(node, job_id, attempt, True)
        self.do("answer_lost", self.h.answer, node, job_id, attempt, True)

    @precondition(lambda self: any(self.h.held.values()) or any(self.h.old.get(n) for n in self.h.held))
    @rule(data=st.data(), seconds=st.sampled_from([RETRY_S, 1.0]), midway=st.booleans())
    def answer_racing(self, data, seconds, midway):
        """A node answers a job it holds (or lost) while time moves on in the same tick, so
        the move of that job (its lease ran out) may be under way, in an order Trio's
        scheduler draws (``midway``: once the clock's wake-ups wait for Redis). Redis takes
        the answer if it still has that attempt on this node when it arrives: then it is the
        job's outcome, and the job leaves its lane if it was moving; else a later attempt's."""
        node, (job_id, attempt) = data.draw(st.sampled_from(
            [(n, (j, a)) for n, j, a in self._held()] + [(n, o) for n in self.connected for o in self.h.old.get(n, [])]))
        live = ["dispatched", node, str(attempt)]
        before = self.r.hmget(self.k.job(job_id), "status", "node_id", "attempt", "job_key")

        steps = [lambda: self.h.answer(node, job_id, attempt, True), lambda: self.h.advance(seconds)]
        with step_limit("answer_racing"):
            self.trio.call(self._one_tick(steps, midway))
            self.trio.call(self.h.settle)
            if before[:3] == live and self.r.hmget(self.k.job(job_id), "status", "node_id", "attempt") == ["finished", *live[1:]]:
                job = self.jobs[before[3]]  # the lost attempt's answer won: it is the job's
                job.answer, job.stored = ("SUCCESS", f"{job_id}:{attempt}"), self._orphaned(before[3].split(":")[0])
            self.check()

    @precondition(lambda self: any(j.answer for j in self.jobs.values()))
    @rule(data=st.data())
    def answer_again(self, data):
        """The same answer twice (or from a reconnected node): the second one is refused."""
        node = data.draw(st.sampled_from(self.connected)) if self.h.held else None
        done = sorted({(job_id, a) for (key, job_id, a, *_) in self.h.handed if self.jobs[key].answer})
        if node is not None and done:
            job_id, attempt = data.draw(st.sampled_from(done))
            self.do("answer_again", self.h.answer, node, job_id, attempt, True)

    # ------------------------------------------------------------ rules: sessions and time

    def _live_sessions(self) -> list[str]:
        return sorted(s for s in SESSIONS if not self._orphaned(s))

    def _submit(self, session, pair, ttl, quiet=False):
        """``quiet``: submitted at a quiet point (no placement round in flight): its lane's
        fairness is checked (_check_fair_turns)."""
        index = self.next_index
        self.next_index += 1
        key = job_key_for(session, index, pair[1])
        job = self.jobs[key] = Job(key, pair, index, self.now + ttl, self.h.owner(session).id, fenced=session in self.fenced)

        def submit():
            d = self.h.owner(session).dispatcher
            lane = d._lanes.get(pair)
            if quiet:
                job.mark = len(self.h.handed)
                job.ahead = sum(1 for r in (lane.queue if lane else ()) if r.session_id == session and d._moving_of(r) is None)
            job.refused = self._submit_checked(session, index, pair, ttl) is not None

        return submit

    def _submit_checked(self, session, index, pair, ttl):
        """Submit to the session's instance; refused (OVERLOADED) exactly when its lanes are full."""
        full = self.h.owner(session).dispatcher.waiting >= self.h.queue_size
        code = self.h.submit(session, index, pair, ttl, epoch=self.epochs[session])
        assert code == ("OVERLOADED" if full else None), (job_key_for(session, index, pair[1]), code, full)
        return code

    @rule(data=st.data(), pair=st.sampled_from(PAIRS), ttl=st.sampled_from([0.3, 1.0, 5.0, 30.0]))
    def submit(self, data, pair, ttl):
        session = data.draw(st.sampled_from(self._live_sessions()))
        self.do("submit", self.trio_sync(self._submit(session, pair, ttl, quiet=True)))

    @rule(data=st.data(), pair=st.sampled_from(PAIRS), n=st.integers(2, 4), ttl=st.sampled_from([1.0, 30.0]))
    def burst(self, data, pair, n, ttl):
        """One session floods a lane (n jobs in one step) that other sessions share: their
        later jobs must not wait behind the whole burst (_check_fair_turns)."""
        session = data.draw(st.sampled_from(self._live_sessions()))
        submits = [self._submit(session, pair, ttl, quiet=True) for _ in range(n)]

        def all_of_them():
            for submit in submits:
                submit()

        self.do("burst", self.trio_sync(all_of_them))

    @precondition(lambda self: any(key for key, *_ in self.h.handed if key.split(":")[0] not in self.fenced
                                   and not self._orphaned(key.split(":")[0])))
    @rule(data=st.data())
    def submit_again(self, data):
        """A job key that was placed comes again (a session replaying after a resume): Redis
        says EXISTS, the job is never created twice."""
        key = data.draw(st.sampled_from(sorted({k for k, *_ in self.h.handed if k.split(":")[0] not in self.fenced
                                                and not self._orphaned(k.split(":")[0])})))
        job, session = self.jobs[key], key.split(":")[0]
        self.resubmitted.add(key)
        self.resubmits += 1

        def submit():
            self.refused_again += self._submit_checked(session, job.seq, job.pair, 5.0) is not None

        self.do("submit_again", self.trio_sync(submit))

    refused_again = resubmits = 0

    def _cancellable(self) -> list[str]:
        return sorted(k for k, j in self.jobs.items() if not j.refused and j.cancelled_at is None and j.answer is None
                      and not self._orphaned(k.split(":")[0]))

    def _cancel(self, key):
        self.jobs[key].cancelled_at = len(self.h.got)
        return lambda: self.h.cancel(key.split(":")[0], [key])

    @precondition(lambda self: self._cancellable())
    @rule(data=st.data())
    def cancel(self, data):
        """The session cancels a job, maybe with others of its own in one call (as a close
        does: answered, refused or cancelled ones change nothing), in a drawn order."""
        key = data.draw(st.sampled_from(self._cancellable()))
        session = key.split(":")[0]
        others = sorted(k for k in self.jobs if k.startswith(session + ":") and k != key)
        keys = data.draw(st.permutations([key, *data.draw(st.lists(st.sampled_from(others), max_size=2, unique=True))])
                         if others else st.just([key]))
        cancellable = set(self._cancellable())
        for k in keys:
            if k in cancellable:
                self.jobs[k].cancelled_at = len(self.h.got)
        self.do("cancel", lambda: self.h.cancel(session, keys))

    @rule(seconds=st.sampled_from([0.05, 0.25, 1.0, 3.1]))
    def advance(self, seconds):
        if seconds < RETRY_S:
            self.do("advance", self.h.advance, seconds)
            return
        self.do("advance", self.h.advance, seconds - RETRY_S)
        free = self._free_slots()
        self.do("advance", self.h.advance, RETRY_S)
        self.check_no_idle_slot(free)

    @rule(data=st.data(), pair=st.sampled_from(PAIRS))
    def lane_crash(self, data, pair):
        """A bug makes the next placement round of the session's instance raise (the job
        submitted now wakes its lane): the lane logs it, pauses one retry interval, and
        places its queue after all."""
        session = data.draw(st.sampled_from(self._live_sessions()))
        self.h.owner(session).crash_next = 1
        self.do("lane_crash", self.trio_sync(self._submit(session, pair, 5.0)))

    @rule(data=st.data(), pair=st.sampled_from(PAIRS), after=st.booleans())
    def act_crash(self, data, pair, after):
        """A bug makes acting on the next placement Redis makes for the session's instance
        raise (before the books and the hand-over, or ``after`` them), or (not ``after``) on
        its next refusal; the job submitted now may be that one, or a later one: that job
        fails INTERNAL, and what Redis holds for it is released (a placement: its slot, its
        node told job_cancel; a move left waiting: cancelled)."""
        session = data.draw(st.sampled_from(self._live_sessions()))
        self.h.owner(session).act_crash = (1, after)
        self.do("act_crash", self.trio_sync(self._submit(session, pair, 5.0)))

    @rule(data=st.data(), seconds=st.sampled_from([0.25, 1.0, 3.1]), cancel=st.booleans())
    def outage(self, data, seconds, cancel):
        """Redis cannot be reached for a while (every call fails), maybe while a session
        cancels a job; then a second passes with Redis back: the releases and ``job_cancel``
        messages owed meanwhile have gone through (the checks after it)."""
        self._outage(seconds, data.draw(st.sampled_from(self._cancellable())) if cancel and self._cancellable() else None)

    @rule(data=st.data(), seconds=st.sampled_from([0.25, 1.0]), cancel=st.booleans())
    def replies_lost(self, data, seconds, cancel):
        """Redis times out for a while (a stall): every call runs, but its reply is lost, so
        each is an ambiguous outcome the dispatcher must resolve, never drop: a placement it
        did not hear of is still handed to its node (or undone), an answer is stored once."""
        self._outage(seconds, data.draw(st.sampled_from(self._cancellable())) if cancel and self._cancellable() else None,
                     lost=True)

    @rule(seconds=st.sampled_from([0.25, 1.0]))
    def pools_churn(self, seconds):
        """The pool tables change before every placement for a while (nodes registering in a
        burst, as after Redis lost its data): each placement is refused STALE_CANDIDATES after
        all its re-reads of the candidates; its job waits, never fails (no placement_crashed:
        checked with the records), and is placed once the tables hold still (the checks after
        the second that follows)."""
        self.h.pools_churn = True
        try:
            self.do("pools_churn", self.h.advance, seconds)
        finally:
            self.h.pools_churn = False
        self.do("advance", self.h.advance, 1.0)

    def _outage(self, seconds, cancel_key, lost=False):
        # what each instance holds before: a lease the outage falls in must not run out for it
        before = {(i.id, key): (p.attempt, p.lease_deadline) for i in self._live() for key, p in i.dispatcher.placed.items()}
        start, seen = self.now, len(self.journal.records)
        if lost:
            self.h.replies_lost = True
        else:
            self.h.down = True
        try:
            if cancel_key is not None:
                self.do("cancel", self._cancel(cancel_key))
            self.do("outage", self.h.advance, seconds)
        finally:
            self.h.down = self.h.replies_lost = False
            self.h.up_since = self.now
            self.outages.append((start, self.now))
        if seconds >= LAPSE_S:  # the live instances' liveness lapsed (their refreshes failed); each refreshes it
            self.lapsed = True  # 0.9 s after Redis came back (within the grace, 1 s): until then none counts as dead
            for instance in self._live():
                self.r.delete(keys.instance(instance.id))
                for listed in self.h.space.all_instances():
                    self.r.zadd(listed, {instance.id: self.h.wall_ms(self.now) - 1})
            self.do("advance", self.h.advance, 0.9)
            for instance in self._live():
                self.trio.call(instance.ownership.refresh)
            self.lapsed = False
            self.do("advance", self.h.advance, 0.1)
        else:
            self.do("advance", self.h.advance, 1.0)
        for instance in self._live():
            assert not instance.dispatcher._owed_releases and not instance.dispatcher._owed_cancels, instance.id
        self._check_outage_counted_out(before, start, seconds, seen)

    def _check_outage_counted_out(self, before, start, seconds, seen):
        """No lease set before the outage and due after it was seen ran out before its deadline
        plus the outage, less :data:`SEEN_WITHIN_S`: the adapter sees an outage from the first
        call that fails, and the orphan sweep calls Redis every 2 s (an outage no call met held
        no answer back, and a lease due before it was seen may run out)."""
        for r in self.journal.records[seen:]:
            f = getattr(r, "fields", {})
            if getattr(r, "event", None) != "job_moving" or f.get("reason") != "LEASE_EXPIRED":
                continue
            for (instance_id, key), (attempt, lease) in before.items():
                if key == f["job_key"] and attempt == f["attempt"] and lease > start + SEEN_WITHIN_S:  # (seen by then)
                    assert r.at >= lease + seconds - SEEN_WITHIN_S - EPS, \
                        f"{instance_id}: {key} moved LEASE_EXPIRED at {r.at:.2f}, lease {lease:.2f}, outage {start:.2f}+{seconds}"

    @precondition(lambda self: len(self.fenced) < 1)
    @rule(session=st.sampled_from(["s0", "s1"]))
    def fence(self, session):
        """The session was resumed elsewhere (its epoch moved on): this instance places none
        of its new jobs any more; each fails FENCED."""
        self.fenced.add(session)
        handed = {key for key, *_ in self.h.handed}
        for job in self.jobs.values():
            if job.key.startswith(session + ":") and job.key not in handed:
                job.fenced = True
        self.r.hset(self.k.session(session), "epoch", 2)
        self.do("fence", self.trio_sync(lambda: None))

    @precondition(lambda self: self.h["i2"].alive and (self.h["i2"].dispatcher.placed or any(
        self.h.held[n] for n, i in self.h.where.items() if i == "i2")))
    @rule()
    def kill_i2(self):
        """kill -9 of i2 while it holds something: jobs it placed, or nodes with jobs."""
        for job in self.jobs.values():
            job.owner_killed = job.owner_killed or job.instance == "i2"
        # its moves still queued (behind a blocked lane's head) never reached Redis: their leases lapsed
        # there while it held them; the orphan sweep releases them once its liveness lapsed (the lease check)
        self.killed_moving = ({p.job_id for p in self.h["i2"].dispatcher._moving.values()}, self.now)
        self.do("kill", self.h.kill, "i2")

    @precondition(lambda self: not self.h["i2"].alive)
    @rule()
    def restart_i2(self):
        """The supervisor starts the killed i2 again under its id (``--workers``): a new process,
        empty books, no session (the client of s2 never comes back). It drops its previous
        life's nodes first (Ownership.drop_previous_life). The jobs that life placed on i1's
        nodes name a live instance again, so i1's orphan sweep leaves them; the new i2's own
        sweep must release them (the lease check below: within a sweep of lease + grace)."""
        self.do("restart", self.h.restart, "i2")

    @precondition(lambda self: not self.h["i2"].alive and self._orphaned("s2"))
    @rule()
    def resume_s2(self):
        """The client of s2 (held by the dead i2) resumes on i1: the answers Redis kept come
        first, then i1 adopts the jobs still dispatched or waiting."""
        delivered = {job_key_for(s, o.utterance_index, o.tgt_lang) for s, o, _ in self.h.got if isinstance(o, JobOutcome)}
        missing = [(j.seq, j.pair[1]) for j in self.jobs.values() if j.key.startswith("s2:") and j.key not in delivered]
        stored = {j.key for j in self.jobs.values() if j.stored}
        kept: dict[str, dict] = {}  # job key -> its job hash, for each job i1 should adopt
        for index, tgt in missing:
            key = job_key_for("s2", index, tgt)
            job_id = self.r.get(self.k.jobkey(key))
            if job_id and key not in stored:
                job = self.r.hgetall(self.k.job(job_id))
                if job.get("status") in ("dispatched", "waiting") and job.get("audio"):
                    kept[key] = job
        for job in self.jobs.values():
            job.stored = False  # taken with the resume
        adopted = []
        self.do("resume", lambda: self._resume(adopted, missing))
        assert adopted == [len(kept)], (adopted, sorted(kept))
        self._check_adopted(kept)

    @precondition(lambda self: not self.h["i2"].alive and not self._orphaned("s2"))
    @rule()
    def resume_s2_again(self):
        """The client of s2, resumed on i1, loses its socket and resumes on i1 again: every
        job of s2 still live is on i1's books already, so nothing is adopted twice and the
        books stay as they were."""
        d = self.h["i1"].dispatcher
        before = {k: id(p) for k, p in d.placed.items()}, {k: id(p) for k, p in d._moving.items()}
        delivered = {job_key_for(s, o.utterance_index, o.tgt_lang) for s, o, _ in self.h.got if isinstance(o, JobOutcome)}
        missing = [(j.seq, j.pair[1]) for j in self.jobs.values() if j.key.startswith("s2:") and j.key not in delivered]
        adopted = []
        self.do("resume", lambda: self._resume(adopted, missing))
        assert adopted == [0], adopted
        assert ({k: id(p) for k, p in d.placed.items() if k in before[0]}, {k: id(p) for k, p in d._moving.items()
                                                                          if k in before[1]}) == before

    def _check_adopted(self, kept: dict[str, dict]) -> None:
        """Each adopted job is on i1's books as its job hash describes it (node, attempt,
        connection, lease), with the request the session made (index, languages, audio,
        deadline), and Redis names i1 as the instance that placed it."""
        d, base = self.h["i1"].dispatcher, self._wall.base
        for key, job in kept.items():
            p, original = d.placed.get(key) or d._moving.get(key), self.jobs[key]
            if p is None:  # adopted and done with at once (dropped at its deadline), or not adopted at all
                status = self.r.hget(self.k.job(job["job_id"]), "status")
                assert status not in ("dispatched", "waiting") or original.deadline <= self.now + EPS, f"{key} not adopted"
                continue
            r = p.request
            assert (r.job_key, r.session_id, r.utterance_index, r.src_lang, r.tgt_lang, r.turn_id, r.sample_rate, r.audio,
                    r.epoch, r.turn_action, r.turn_jobs) == \
                (key, "s2", original.seq, *original.pair, "s2:t", SAMPLE_RATES["s2"], job_audio(key), self.epochs["s2"],
                 "none", 1), (key, r)
            assert abs(r.deadline - original.deadline) < 0.01, (key, r.deadline, original.deadline)
            assert self.r.hget(self.k.job(job["job_id"]), "placed_by") == "i1", key
            if p.attempt == int(job["attempt"]):  # (not placed again since; in layout 2 it may have moved across shards,
                moved = p.job_id in self._moved_chain(job["job_id"])  # waiting, under the id it became)
                assert (p.job_id if not moved else job["job_id"], p.node_id, p.conn_id) == \
                    (job["job_id"], job["node_id"], job.get("conn_id", "")), (key, p, job)
                lease = (int(job["lease_deadline_ts"]) / 1000 - base)
                assert abs(p.lease_deadline - lease) < 0.01 or job["status"] == "waiting", (key, p.lease_deadline, lease)

    async def _resume(self, adopted, missing):
        self.epochs["s2"] += 1
        adopted.append(await self.h.resume("s2", "i1", missing, self.epochs["s2"]))

    @precondition(lambda self: self._cancellable())
    @rule(data=st.data(), other=st.sampled_from(["answer", "disconnect", "submit", "advance"]), midway=st.booleans())
    def together(self, data, other, midway):
        """A cancel and another step in one tick, in an order Trio's scheduler draws; or
        (``midway``) the cancel once the other step's Redis calls are in flight."""
        key = data.draw(st.sampled_from(self._cancellable()))
        steps = [self._cancel(key)]
        if other == "answer" and any(self.h.held.values()):
            node, job_id, attempt = data.draw(st.sampled_from(self._held()))
            self._answer(node, job_id, attempt, True)
            self.jobs[self.h.held[node][job_id].job_key].racing = key == self.h.held[node][job_id].job_key
            steps.append(lambda: self.h.answer(node, job_id, attempt, True))
        elif other == "disconnect" and self.h.held:
            node = data.draw(st.sampled_from(self.connected))
            steps.append(lambda: self.h.disconnect(node))
        elif other == "submit":
            steps.append(self.trio_sync(self._submit(data.draw(st.sampled_from(self._live_sessions())),
                                                     data.draw(st.sampled_from(PAIRS)), 5.0)))
        else:
            steps.append(lambda: self.h.advance(RETRY_S))

        self.do("together", self._one_tick(steps, midway))

    @staticmethod
    def _one_tick(steps, midway):
        """The steps in one tick, in an order Trio's scheduler draws; or (``midway``) each
        step, last first, once the ones before it wait for Redis."""
        async def run():
            async with trio.open_nursery() as nursery:
                for step in reversed(steps) if midway else steps:
                    nursery.start_soon(step)
                    if midway:
                        await trio.testing.wait_all_tasks_blocked()  # the lanes now wait for Redis

        return run

    @staticmethod
    def trio_sync(fn):
        async def run():
            fn()

        return run

    # ------------------------------------------------------------ checks

    def check(self):
        self.trio.call_sync(self._check_books)
        self._check_redis()
        self._check_nodes()
        self._check_saturated_nodes()
        self._check_draining_nodes()
        self._check_logs()
        self._check_counters()
        self._check_journal_words()

    words_seen = flushes_seen = 0

    def _check_journal_words(self):
        """The word that a job's creation wrote its utterance's resume-journal entry (the
        writer then writes none: cluster/journal.py) is true: the session hash holds the entry,
        as the job's request describes it. Only first jobs of utterances (one lane here) carry one."""
        new, self.words_seen = self.h.words[self.words_seen:], len(self.h.words)
        flushed, self.flushes_seen = len(self.h.flushes) != self.flushes_seen, len(self.h.flushes)
        for session, index, written in new:
            requests = self.h.requests[job_key_for(session, index, PAIRS[0][1])]
            assert all(r.finalize_reason for r in requests), (session, index)
            if written and not flushed and not self.h.down:  # (a flush since may have taken it)
                entry = self.r.hget(self.k.session(session), f"u:{index}")
                assert entry is not None, f"{session}:{index} said journaled, the journal lacks it"
                assert json.loads(entry)["reason"] == "pause" and json.loads(entry)["turn_id"] == f"{session}:t", entry

    def _check_nodes(self):
        """Every connected node is, in Redis (where Redis still has it), online on its current
        connection: no close of an older socket (``bounce`` with ``late``) took it offline."""
        if self.h.down or self.h.replies_lost:
            return
        for node in self.connected:
            conn = self.h[self.h.where[node]].nodes.get(node)
            online, conn_id = self.r.hmget(self.k.node_info(node), "online", "conn_id")
            if online is not None:
                assert (online, conn_id) == ("1", conn.conn_id), (node, online, conn_id, conn.conn_id)
                # ... and so in the copy node choice reads (luascripts/register_node.lua)
                copy = lua.runtime_copy(self.r.hget(self.k.node_runtime(node), node))
                assert copy is not None and (copy["online"], copy["conn_id"]) == (online, conn_id), (node, copy)

    def _live(self):
        return [i for i in self.h.instances.values() if i.alive]

    def _check_books(self):
        h, now = self.h, self.now
        answered = {job_key_for(s, o.utterance_index, o.tgt_lang) for s, o, _ in h.got if isinstance(o, JobOutcome)}
        for instance in self._live():
            d = instance.dispatcher
            queued = [r for lane in d._lanes.values() for r in lane.queue]
            assert d._queued == len(queued) == d.waiting, (instance.id, d._queued, len(queued))
            assert instance.metrics.jobs_in_flight._value.get() == len(d.placed)
            assert d.placed.job_keys == {p.job_id: k for k, p in d.placed.items()}, d.placed.job_keys  # (answers name ids)
            for lane in d._lanes.values():  # a job the lane keeps waiting was told so, last
                for key in lane.told:
                    notices = [o.error for s, o, by in h.got if by == instance.id and isinstance(o, JobWaiting)
                               and job_key_for(s, o.utterance_index, o.tgt_lang) == key]
                    assert notices and notices[-1] is not None, (instance.id, key, notices)
            assert instance.metrics.jobs_waiting._value.get() == len(queued)
            for key, p in d.placed.items():  # the lease expiry looks every second (once replies come back)
                # (an adopted one: from its adoption; one placed by a lost call: from when replies came back)
                lease = p.lease_due(d._redis.outage.elapsed(now))  # (Redis outages since the lease was set do not count)
                due = max(lease, h.queued_since.get(key, 0.0), h.up_since if lease < h.up_since else 0.0)
                assert due > now - 1.0 - EPS, f"{instance.id}: {key} on {p.node_id} {now - due:.2f} s past its lease"
                if p.conn_id in h.dropped:  # its node connection is gone: moved at once when it drops here
                    when, where = h.dropped[p.conn_id]  # (node_lost), else within a remote watch of Redis
                    entered = h.queued_since.get(key, 0.0)  # (an adopted job: after the drop, maybe)
                    dead = not h[where].alive or h.killed_at.get(where, float("-inf")) >= when  # (restarted since)
                    since = max(when, entered, h.up_since, self._liveness_grace_end() if dead else 0.0)
                    due = when if where == instance.id and when > entered else since + WATCH_S
                    due = float("inf") if (h.down or h.replies_lost) and due > when else due
                    assert due > now - EPS, f"{instance.id}: {key} on {p.node_id}, whose connection (on {where}) " \
                                            f"dropped {now - when:.2f} s ago"
            for r in queued:  # an answered job leaves its lane at once (forget)
                assert r.job_key not in answered or r.job_key in self.resubmitted, f"{r.job_key} answered, yet queued"
                due = max(r.deadline + self._counted_out(r.deadline), h.queued_since[r.job_key])  # (a job moved after
                # its deadline: from then)
                assert due > now - RETRY_S - EPS, f"{r.job_key} waits {now - due:.2f} s past its deadline"
                assert r.job_key not in d.placed or r.job_key in self.resubmitted, r.job_key
                assert not self.jobs[r.job_key].refused or r.job_key in self.resubmitted
        self._check_holders()
        self._check_sessions()
        self._check_order()

    def _liveness_grace_end(self) -> float:
        """Until when a lapsed instance still counts as alive: one liveness TTL (the grace)
        after the last outage the adapter's calls saw end (OutageClock.recent)."""
        last = self.h.redis.outage.last
        return last[1] + ORPHAN_GRACE_MS / 1000 if last is not None else 0.0

    def _counted_out(self, deadline: float) -> float:
        """At most how much later a job deadline falls for the Redis outages so far (as its
        session's: an outage's time after the deadline less the result deadline counts, up to
        that much; while Redis is out the deadline is held). The adapter sees an outage end at
        its first call that goes through, within :data:`SEEN_WITHIN_S`."""
        if self.h.down or self.h.replies_lost:
            return float("inf")
        return sum(min(end - start + SEEN_WITHIN_S, HOLD_S) for start, end in self.outages if end > deadline - HOLD_S)

    def _unnoticed(self) -> set[str]:
        """Jobs Redis lost (with its data) that are still on their placer's books: it has not
        noticed yet (the remote watch or the health check)."""
        lost = {job_id for handed in self.h.generations()[:-1] for _, job_id, *_ in handed}
        return lost & {p.job_id for i in self._live() for p in i.dispatcher.placed.values()}

    def _check_holders(self):
        h = self.h
        for instance in self._live():
            for key, p in instance.dispatcher.placed.items():
                if key in h.unheard:
                    continue  # answered; its placer learns it at its next remote watch
                conn = instance.nodes.get(p.node_id) or (h.where.get(p.node_id) and h[h.where[p.node_id]].nodes.get(p.node_id))
                if p.job_id in self.killed_moving[0] and p.attempt == int(self.r.hget(self.k.job(p.job_id), "attempt") or 0):
                    continue  # adopted from the killed i2, which was moving it (its hand-over failed): its node never got it
                if conn and conn.conn_id == p.conn_id:  # placed on this very connection: it has the job
                    got = h.held[p.node_id].get(p.job_id)
                    assert got is not None and (got.job_key, got.attempt) == (key, p.attempt), \
                        f"{key} placed on {p.node_id} (attempt {p.attempt}), which holds {got}"
        unnoticed = self._unnoticed()  # the node's until its placer noticed (it is told job_cancel then)
        unnoticed |= {job_id for i in self._live() for job_id in i.dispatcher._lost_releases}  # (a release whose reply was lost)
        unnoticed |= {job_id for i in self._live() for job_id, _ in i.dispatcher._owed_cancels}  # (told once Redis is back)
        held = [(node, job_id, got.attempt) for node, jobs in h.held.items() for job_id, got in jobs.items()
                if job_id not in unnoticed]
        pipe = self.r.pipeline(transaction=False)
        for _, job_id, _ in held:
            pipe.hmget(self.k.job(job_id), "status", "node_id", "attempt")
        for (node, job_id, attempt), live in zip(held, pipe.execute(), strict=True):
            # moved, cancelled or released by its instance or the orphan sweep: told job_cancel
            assert live == ["dispatched", node, str(attempt)], f"{node} still holds job {job_id} attempt {attempt}: {live}"

    def _origin(self, job_id: str) -> str:
        """Layout 2: the id a job had before it moved across shards while waiting (``moved_from``,
        job_move_in.lua; the last one handed to a node), else its own."""
        for _ in range(16):
            before = self.r.hget(self.k.job(job_id), "moved_from")
            if not before or self.r.hget(self.k.job(job_id), "attempt") != self.r.hget(self.k.job(before), "attempt"):
                break
            job_id = before
        return job_id

    def _moved_chain(self, job_id: str) -> list[str]:
        """Layout 2: the ids a job took moving across shards (``moved_to``, job_move_out.lua), in order."""
        chain = []
        while len(chain) < 16 and (nxt := self.r.hget(self.k.job(job_id), "moved_to")):
            chain.append(job_id := nxt)
        return chain

    def _check_sessions(self):
        outcomes: dict[str, list[tuple[int, JobOutcome]]] = {}
        told: dict[tuple[str, str], list[str | None]] = {}
        for n, (sid, o, by) in enumerate(self.h.got):
            key = job_key_for(sid, o.utterance_index, o.tgt_lang)
            if isinstance(o, JobOutcome):
                outcomes.setdefault(key, []).append((n, o))
            else:
                assert isinstance(o, JobWaiting)
                told.setdefault((key, by), []).append(o.error)
        for key, *_ in self.h.handed:  # a session fenced before its job was placed: the job fails, never runs
            assert not self.jobs[key].fenced or key in self.resubmitted, f"{key} of a fenced session was placed"
        for key, job in self.jobs.items():
            got = outcomes.get(key, [])
            if key in self.h.acts_crashed:  # handling its placement raised: it failed INTERNAL, once
                if key in self.resubmitted:  # (and a copy may fail FENCED, or be blocked as a duplicate; or the copy
                    got = [(n, o) for n, o in got if o.translation.error != "FENCED"]  # crashed, and the original was
                    got = [(n, o) for n, o in got if (o.translation.status, o.translation.text) != job.answer]  # answered)
                assert [(o.translation.status, o.translation.error) for _, o in got] == [("FAILED", "INTERNAL")], (key, got)
                continue
            if key in self.resubmitted and key.split(":")[0] in self.fenced:  # the copy may fail FENCED
                got = [(n, o) for n, o in got if o.translation.error != "FENCED"]
            if job.answer is None:
                if job.fenced and got:
                    assert len(got) == 1 and (got[0][1].translation.status, got[0][1].translation.error) == ("FAILED", "FENCED")
                    continue
                assert not got, f"{key}: an outcome nobody answered: {got}"
                continue
            if job.stored:
                assert not got, f"{key}: answered while its session had no owner, yet delivered: {got}"
                continue
            assert len(got) == 1 or (job.racing and not got), f"{key}: {len(got)} outcomes"
            if not got:
                continue  # the cancel won the race: the answer was refused
            n, o = got[0]
            assert (o.translation.status, o.translation.text) == job.answer, (key, o, job.answer)
            assert job.cancelled_at is None or n < job.cancelled_at or job.racing, f"{key}: an outcome after its cancel"
        for (key, _), codes in told.items():
            if key in self.resubmitted:
                continue  # each copy is told it waits
            for a, b in zip(codes, codes[1:], strict=False):
                assert (a is None) != (b is None), f"{key}: waiting notices {codes}"
            assert codes[0] is not None, f"{key}: 'placed' before 'waiting': {codes}"

    def _check_order(self):
        """Per instance, language pair and session, first placements in submission order (the
        order the dispatcher acted on them, ``placed_seq``: its lanes' order; not their ids: a
        dispatch whose reply was lost is repeated under the id it took before) (sessions take
        turns: fairqueue.py)."""
        first: dict[tuple[str, tuple[str, str], str], dict[str, int]] = {}
        before: set[str] = set()  # keys placed before Redis lost its data: placed again out of turn
        for handed in self.h.generations():
            for key, job_id, attempt, _, by in handed:
                if attempt == 1 and self.jobs[key].instance == by and key not in before and job_id in self.h.placed_seq:
                    first.setdefault((by, self.jobs[key].pair, key.split(":")[0]), {})[key] = self.h.placed_seq[job_id]
            before |= {key for key, *_ in handed}
        for (by, pair, session), ids in first.items():
            seqs = [self.jobs[k].seq for k in sorted(ids, key=ids.get)]
            assert seqs == sorted(seqs), f"{by} {pair} {session}: first placements out of submission order: {seqs}"
        self._check_fair_turns()

    def _check_fair_turns(self):
        """Sessions take turns in a lane: a job submitted at a quiet point with ``ahead`` jobs
        of its own session queued before it waits behind at most ``ahead + 1`` first
        placements of any other session (same instance and pair) until it is placed itself.
        Placement order is the order the dispatcher acted on them (``placed_seq``), not
        hand-over order: a job placed on another instance's node is handed over later,
        through the relay, than one placed after it on a node here."""
        if self.h.flushes:
            return  # (job ids and placements start afresh after Redis lost its data)
        handed = self.h.handed
        first_at = {key: i for i, (key, _, attempt, _, by) in enumerate(handed)
                    if attempt == 1 and self.jobs[key].instance == by and key not in self.resubmitted}
        for key, pos in first_at.items():
            job = self.jobs[key]
            if job.ahead is None:
                continue
            session, job_id = key.split(":")[0], self.h.placed_seq.get(handed[pos][1])
            if job_id is None:
                continue  # (adopted: not placed by this instance's lanes)
            others: dict[str, int] = {}
            for i in range(job.mark, len(handed)):  # (handed after it was submitted, placed before it)
                other = handed[i][0]
                if first_at.get(other) == i and other.split(":")[0] != session and handed[i][4] == job.instance \
                        and self.jobs[other].pair == job.pair and self.h.placed_seq.get(handed[i][1], job_id) < job_id:
                    others[other.split(":")[0]] = others.get(other.split(":")[0], 0) + 1
            worst = max(others.values(), default=0)
            assert worst <= job.ahead + 1, (f"{key} ({job.ahead} of its own ahead) waited behind {worst} jobs of another "
                                            f"session: {others}")

    def _check_redis(self):
        nodes = sorted(self.max_jobs)
        pipe = self.r.pipeline(transaction=False)
        for node in nodes:
            pipe.smembers(self.k.node_jobs(node))
            pipe.hget(self.k.node_runtime(node), keys.runtime_field(node, "current_jobs"))
        unnoticed = self._unnoticed()
        live = [p for i in self._live() for p in i.dispatcher.placed.values()
                if p.job_id not in unnoticed and p.request.job_key not in self.h.unheard]
        moving = [m for i in self._live() for m in i.dispatcher._moving.values()]
        relocating = {job_id for i in self._live() for job_id in i.dispatcher._scheduling._sharded._moves._relocating}
        for p in live + moving:
            pipe.hmget(self.k.job(p.job_id), "status", "node_id", "attempt")
        for p in live:
            pipe.hmget(self.k.job(p.job_id), *JOB_FIELDS)
        replies = iter(pipe.execute())
        dispatched: set[str] = set()
        for node in nodes:
            held, current = next(replies), int(next(replies) or 0)
            assert current == len(held) <= self.max_jobs[node], (node, current, held)
            dispatched |= held
        for p in live:
            assert next(replies) == ["dispatched", p.node_id, str(p.attempt)], p
        for m in moving:  # still on the node it leaves, or waiting (its slot released) for a new one, or (a move whose
            status, node, attempt = next(replies)  # reply was lost) on a new node at attempt + 1, until the move is repeated
            assert (status, attempt) == ("dispatched", str(m.attempt)) and node == m.node_id or status == "waiting" \
                or m.uncertain and (status, attempt) == ("dispatched", str(m.attempt + 1)) \
                or self.SHARDS > 1 and status == "moved" and m.job_id in relocating, (m, status)  # (layout 2: it left its
        # shard, and stopped half way to the other: its placer goes on at its next try)
        for i in self._live():
            for p in i.dispatcher.placed.values():
                if p.job_id not in unnoticed and p.request.job_key not in self.h.unheard:
                    self._check_job_hash(i.id, p, dict(zip(JOB_FIELDS, next(replies), strict=True)))
        if self.now >= max(self.h.up_since, self._liveness_grace_end()) + SWEEP_S and not (self.h.down or self.h.replies_lost):
            # a lease left behind (its instance died, or its hash is gone) goes within one orphan
            # sweep of the lease + the grace; every other one is moved or renewed by its placer (the sweep
            # waits while Redis is out and one grace after its calls go through again: liveness lapses then)
            lapsed = self.k.lease_ids(self.r, "-inf", self.h.wall_ms(self.now) - ORPHAN_GRACE_MS - SWEEP_S * 1000 - 1)
            mine = {p.job_id for i in self._live() for p in [*i.dispatcher.placed.values(), *i.dispatcher._moving.values()]}
            for job_id in lapsed:
                placed_by = self.r.hget(self.k.job(job_id), "placed_by")  # a previous life's job: its restarted
                if self.now < self.h.restarted_at.get(placed_by, float("-inf")) + SWEEP_S + EPS:  # instance's first sweep
                    continue
                if job_id in self.killed_moving[0] and self.now < self.killed_moving[1] + ORPHAN_GRACE_MS / 1000 + SWEEP_S + EPS:
                    continue  # (moving on its killed placer's books: the sweep's, once its liveness lapsed)
                assert job_id in mine | self.astray, f"lease of job {job_id} lapsed long ago: {self.r.hgetall(self.k.job(job_id))}"
        books = {p.job_id for i in self.h.lives() for p in [*i.dispatcher.placed.values(), *i.dispatcher._moving.values()]}
        books |= {job_id for i in self.h.lives() for job_id in i.dispatcher._owed_releases}  # (an outage)
        books |= {job_id for i in self.h.lives() for _, job_id in i.dispatcher._tried.values()}  # (a lost reply; in
        dispatched = {d for d in dispatched if str(placed_order(d)) not in books}  # layout 2 its number: the shard was
        assert dispatched <= books, f"Redis holds {sorted(dispatched)}, the books {sorted(books)}"  # chosen in the call)
        for handed in self.h.generations():  # (a job Redis lost is created again)
            ids: dict[str, str] = {}
            for key, job_id, *_ in handed:
                if ids.get(key, job_id) != job_id and job_id in self._moved_chain(ids[key]):
                    ids[key] = job_id  # (layout 2: it moved across shards, job_move_out naming the id it became)
                assert ids.setdefault(key, job_id) == job_id, f"{key} created twice: jobs {ids[key]} and {job_id}"

    def _check_job_hash(self, instance_id, p, job):
        """A placed job's hash is its request (what an adopting instance rebuilds it from),
        placed by this instance, with the lease this instance keeps for it."""
        r, h = p.request, self.h
        assert (job["job_key"], job["session_id"], job["utterance_index"], job["src_lang"], job["tgt_lang"], job["turn_id"],
                job["sample_rate"], job["audio"], job["placed_by"], job["conn_id"]) == \
            (r.job_key, r.session_id, str(r.utterance_index), r.src_lang, r.tgt_lang, r.turn_id, str(r.sample_rate),
             base64.b64encode(r.audio).decode(), instance_id, p.conn_id), (p, job)
        assert abs(int(job["deadline_ms"]) - h.wall_ms(r.deadline)) <= 2, (p, job)
        assert abs(int(job["lease_deadline_ts"]) - h.wall_ms(p.lease_deadline)) <= 2, (p, job)

    def _check_logs(self):
        records, self.seen_records = self.journal.records[self.seen_records:], len(self.journal.records)
        handed = {(key, job_id, attempt, node) for key, job_id, attempt, node, _ in self.h.handed}
        for r in records:
            name, f = getattr(r, "event", None), getattr(r, "fields", {})
            if name == "lane_failed":  # the injected bug (lane_crash): one record per crashed round, with its pair
                self.lane_failures += 1
                assert r.levelno == logging.ERROR and r.exc_info and (f["src_lang"], f["tgt_lang"]) in PAIRS, r.getMessage()
                continue
            if name == "placement_crashed":  # the injected bug (act_crash): one record per crashed placement
                self.act_failures.append(f["job_key"])
                assert r.levelno == logging.ERROR and r.exc_info, r.getMessage()
                continue
            assert r.levelno < logging.ERROR, r.getMessage()
            if r.name != "scheduler.dispatcher":
                continue
            assert EVENTS.get(name) == r.levelno, f"unknown event or level: {r.levelname} {r.getMessage()}"
            if "job_key" in f or name in ("job_moving", "dispatch_blocked", "job_failed", "duplicate_job_blocked"):
                assert f.get("job_key") in self.jobs, r.getMessage()
            if name == "job_moving":  # (an instance whose liveness lapsed in an outage is not dead)
                assert f["reason"] != "NODE_INSTANCE_LOST" or not self.lapsed, r.getMessage()
                assert f["reason"] in REASONS and (f["job_key"], self._origin(f["job_id"]), f["attempt"], f["from_node"]) \
                    in handed, r.getMessage()  # (a job made waiting by a move across shards: its node was its origin's)
            elif name in ("dispatch_blocked", "dispatch_unblocked"):
                assert (f["src_lang"], f["tgt_lang"]) in PAIRS and isinstance(f["waiting"], int), r.getMessage()
                pair = (f["src_lang"], f["tgt_lang"])
                self.blocked[pair] = self.blocked.get(pair, 0) + (1 if name == "dispatch_blocked" else -1)
                assert self.blocked[pair] >= 0, f"{pair} unblocked more often than blocked"  # (per episode, any instance)
                assert name == "dispatch_unblocked" or f["code"] in CODES and f["waiting"] > 0, r.getMessage()
            elif name == "job_failed":
                assert f["error"] in CODES, r.getMessage()
            elif name == "duplicate_job_blocked":
                claim = self.r.get(self.k.jobkey(f["job_key"]))  # (or the job it became, moving across shards since)
                assert f["job_key"] in self.resubmitted and claim in [f["job_id"], *self._moved_chain(f["job_id"])], r.getMessage()
            elif name == "claim_burned":  # never placed: no node ever got it, and Redis keeps it burned
                assert self.SHARDS > 1 and f["job_id"] not in {job_id for _, job_id, *_ in self.h.handed}, r.getMessage()
                assert self.r.hget(self.k.job(f["job_id"]), "status") in ("burned", None), r.getMessage()
            elif name == "job_relocated":  # left its shard "moved" for the id it became, made there waiting or later
                old = self.r.hmget(self.k.job(f["job_id"]), "status", "moved_to", "attempt")
                assert self.SHARDS > 1 and old[:2] == ["moved", f["to_job_id"]] and old[2] == str(f["attempt"]), (r.getMessage(), old)
                assert self.r.hget(self.k.job(f["to_job_id"]), "moved_from") in (f["job_id"], None), r.getMessage()
            elif name == "jobs_adopted":
                assert f["session_id"] == "s2" and f["jobs"] > 0, r.getMessage()
            elif name == "orphan_release_refused":  # (orphan_key_mismatch) cancel_task refused a dead instance's job
                assert f["job_id"] in {job_id for _, job_id, *_ in self.h.handed} and f["code"] == "JOBKEY_MISMATCH", f
            elif name == "orphan_job_released":  # a job of a dead instance whose lease lapsed more than the grace ago
                job = self.r.hmget(self.k.job(f["job_id"]), "job_key", "node_id", "session_id", "status", "lease_deadline_ts",
                                   "placed_by")
                assert job[:4] == [f["job_key"], f["node_id"], f["session_id"], "cancelled"], (r.getMessage(), job)
                assert int(job[4]) <= self.h.wall_ms(self.now) - ORPHAN_GRACE_MS, job
                assert not self.h[job[5]].alive or (self.h[job[5]].restarted and f["previous_life"]), (job, f)

    lane_failures = finished_lost = 0

    def lose_data(self, noticed: bool = True):
        """Redis loses its data (the finished jobs it forgets are counted first)."""
        self.finished_lost += sum(self.r.hget(self.k.job(job_id), "status") == "finished"
                                  for job_id in {job_id for _, job_id, *_ in self.h.handed})
        self.do("lose_data", self.h.lose_data)
        if noticed:
            self.do("notice_data_loss", self.h.notice_data_loss)

    def _check_counters(self):
        instances = self.h.lives()

        def total(name, *labels):
            return sum((getattr(i.metrics, name).labels(*labels) if labels else getattr(i.metrics, name))._value.get()
                       for i in instances)

        for i in instances:
            for counter, known in ((i.metrics.jobs_total, {"finished", "failed", "cancelled"}),
                                   (i.metrics.dispatch_errors_total, CODES)):
                for metric in counter.collect():
                    for sample in metric.samples:
                        assert not sample.labels or set(sample.labels.values()) <= known, sample
        refused = sum(j.refused for j in self.jobs.values()) + self.refused_again
        assert total("dispatch_errors_total", "OVERLOADED") == refused
        redispatched = {(job_id, attempt) for _, job_id, attempt, *_ in self.h.handed if attempt > 1}
        redispatched |= {(job_id, attempt) for _, job_id, attempt in self.h.unrelayed if attempt > 1}
        relayed = {(key, job_id, attempt) for key, job_id, attempt, *_ in self.h.handed}
        assert not relayed & set(self.h.unrelayed), "a placement whose handling crashed was relayed all the same"
        assert total("redispatch_total") == len(redispatched), (total("redispatch_total"), sorted(redispatched))
        assert total("duplicate_job_blocked_total") <= self.resubmits  # each reaches Redis at most once
        assert self.lane_failures == sum(i.crashed for i in instances), self.lane_failures
        assert self.act_failures == self.h.acts_crashed, (self.act_failures, self.h.acts_crashed)

    def _free_slots(self) -> dict[str, int]:
        """Connected node -> its free slots in Redis (none while its load score is above the
        threshold, or while Redis knows it drains)."""
        closed = self.h.saturated() | {n for n in self.connected if self.r.hget(self.k.node_info(n), "draining") == "1"}
        used = {node: int(self.r.hget(self.k.node_runtime(node), keys.runtime_field(node, "current_jobs")) or 0)
                for node in self.connected}
        return {node: 0 if node in closed else self.max_jobs[node] - used[node] for node in self.connected}

    def check_no_idle_slot(self, free_before: dict[str, int]):
        """After time moved: no lane waits while a node of its pair has had room (other than a
        node one of its moves leaves) for a whole retry interval (a slot freed by another instance, e.g. by a lease running
        out there, is not announced: the lane sees it at its next retry)."""
        free_now = self._free_slots()
        if max(i.act_crashed_at for i in self.h.lives()) >= self.now - RETRY_S - EPS:
            return  # a crashed placement took a slot and gave it back: the other instance's lanes are not told
        for instance in self._live():
            d = instance.dispatcher
            if instance.crashed_at >= self.now - RETRY_S - EPS:
                continue  # a lane crashed within the interval: it pauses one retry interval
            for pair, lane in d._lanes.items():
                if not lane.queue:
                    continue
                left = {d._moving[r.job_key].node_id for r in lane.queue if r.job_key in d._moving}  # (a move avoids
                for node, free in free_now.items():  # the node it leaves; in layout 2 it goes to another shard too)
                    conn = self.h[self.h.where[node]].nodes.get(node)
                    if node not in left and list(pair) in conn.registration.lang_pairs and min(free, free_before.get(node, 0)) > 0:
                        raise AssertionError(f"{instance.id} {pair}: {len(lane.queue)} jobs wait while {node} has {free} free")

    # ------------------------------------------------------------ the end

    def answer_all(self):
        """Every node answers what it holds (ok)."""
        self.trio.call(self.h.settle)
        for node, job_id, attempt in self._held():
            self._answer(node, job_id, attempt, True)
            self.trio.call(self.h.answer, node, job_id, attempt, True)
        self.trio.call(self.h.settle)
        self.check()

    def finish(self):
        """Liveness: a node with room for everything joins; answer, move time; all ends."""
        if "n9" not in self.h.held:
            self.max_jobs["n9"] = 8
            self.trio.call(self.h.connect, "n9", 8, list(PAIRS), "i1")
        for _ in range(400):
            self.answer_all()
            books = [d for i in self._live() for d in [i.dispatcher] if d.waiting or d.placed or d._moving or d._owed_releases
                     or d._owed_cancels]
            if not books and not self.k.lease_ids(self.r):
                break
            self.trio.call(self.h.advance, RETRY_S)
        else:
            raise AssertionError(f"no end: books {books}, leases {self.k.lease_ids(self.r)}")
        finished = self.finished_lost + sum(self.r.hget(self.k.job(job_id), "status") == "finished"
                                            for job_id in {job_id for _, job_id, *_ in self.h.handed})
        assert sum(i.metrics.jobs_total.labels("finished")._value.get() for i in self.h.lives()) == finished
        got = {job_key_for(s, o.utterance_index, o.tgt_lang) for s, o, _ in self.h.got if isinstance(o, JobOutcome)}
        for key, job in self.jobs.items():
            ended = (job.refused or job.cancelled_at is not None or job.answer is not None or key in got
                     or job.deadline <= self.now + EPS or not self.h[job.instance].alive or job.owner_killed)
            assert ended, f"{key} never ended"
        for node in self.max_jobs:
            assert int(self.r.hget(self.k.node_runtime(node), keys.runtime_field(node, "current_jobs")) or 0) == 0, node


# a Redis round trip or more per step: 40 examples of 25 steps keep CI near 6 s (docs/testing.md);
# DISPATCHER_EXAMPLES=1000 for a longer search
EXAMPLES = int(os.environ.get("DISPATCHER_EXAMPLES", 40))


def test_dispatcher_state_machine(flushed_single_url):
    DispatcherMachine.url = flushed_single_url
    run_state_machine_as_test(DispatcherMachine, settings=settings(settings(), max_examples=min(settings().max_examples, EXAMPLES),
                                                                    stateful_step_count=25))


class TwoShardMachine(DispatcherMachine):
    """The same rules and checks on key layout 2 with two shards (docs/redis.md, "Scheduling
    shards"): the node directory puts the first node to register in shard 0, the second in
    shard 1, the third in shard 0, so a job finds no slot in one shard while the other has
    one, a node is lost in one shard, and a session's turns move between shards."""

    SHARDS = 2


def test_dispatcher_state_machine_two_shards(flushed_single_url):
    TwoShardMachine.url = flushed_single_url
    run_state_machine_as_test(TwoShardMachine, settings=settings(settings(), max_examples=min(settings().max_examples, EXAMPLES),
                                                                 stateful_step_count=25))


def _path(machine: DispatcherMachine, name: str) -> None:
    """Fixed paths through the machine's own steps and checks, for the recovery paths a
    random search enters least often (and mutation testing's coverage pass may miss)."""
    m, h = machine, machine.h
    if name == "orphan_sweep":  # i2 dies holding a job on its own node; nobody resumes the session
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("kill", h.kill, "i2")
        m.do("advance", h.advance, 3.1)
        m.do("advance", h.advance, 3.1)
    elif name == "orphan_of_previous_life":  # i2's job on i1's node; i2 is killed and started again at once
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.kill_i2()
        m.restart_i2()
        for _ in range(3):
            m.do("advance", h.advance, 3.1)
        assert not m.k.lease_ids(m.r) and not h.held["n0"], h.held  # released by the new i2's sweep
    elif name == "fair_turns":  # s0 floods a lane with no node; s1 submits one job; then a node comes
        m.do("disconnect", h.disconnect, "n0")
        m.burst(_Draws("s0"), PAIRS[0], 4, 30.0)
        m.do("submit", m.trio_sync(m._submit("s1", PAIRS[0], 30.0, quiet=True)))
        m.max_jobs["n2"] = 8
        m.do("connect", h.connect, "n2", 8, list(PAIRS), "i1")
        first = [k.split(":")[0] for k, _, attempt, _, _ in h.handed if attempt == 1]
        assert first[:2] == ["s0", "s1"], first  # s1's job right after s0's first, not behind the whole burst
    elif name == "adopt_waiting":  # the job waits for a node (its node left) when i2 dies; s2 resumes on i1
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("disconnect", h.disconnect, "n0")
        m.do("kill", h.kill, "i2")
        m.resume_s2()
        m.max_jobs["n2"] = 1
        m.do("connect", h.connect, "n2", 1, list(PAIRS), "i1")
    elif name == "lease_expiry":  # jobs of both instances held past their lease on i2's node
        m.do("advance", h.advance, 1.5)  # (leases end between two expiry ticks)
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.advance(3.1)
        m.advance(1.0)
    elif name == "remote_reconnect":  # a job of i1 on i2's node, whose socket drops and comes back at once
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        m.do("disconnect", h.disconnect, "n0")
        m.do("connect", h.connect, "n0", 2, list(PAIRS), "i2")
        m.do("advance", h.advance, 1.0)
    elif name == "late_bounce_here":  # the node's old socket is cleaned up after it registered here again
        m.do("advance", h.advance, 0.05)  # (layout "both": the job goes to n0, on i1)
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        m.do("advance", h.advance, 0.05)
        m.do("bounce", h.bounce, "n0", m.max_jobs["n0"], "i1", True)
        m.do("advance", h.advance, 0.05)  # (the check: its job moved at once, not at the next watch)
    elif name == "outage_cancel":  # a job on i2's node cancelled while Redis is down: released and told later
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m._outage(0.25, "s2:0:translate:en")
        assert not h.held["n0"] and h["i2"].metrics.jobs_total.labels("cancelled")._value.get() == 1, h.held
    elif name == "lost_replies":  # Redis runs the writes but their replies are lost: a placement, an answer, a cancel
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.h.replies_lost = True
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("cancel", m._cancel("s2:0:translate:en"))
        m._outage(0.25, None, lost=True)
        assert "s2:1:translate:en" in h["i2"].dispatcher.placed, h["i2"].dispatcher.placed
    elif name == "outage_waiting":  # a job waits for a node while Redis is down past its deadline: it still gets one
        m.do("disconnect", h.disconnect, "n0")
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 2.0)))
        m._outage(3.1, None)  # (then a second with Redis back: the deadline, 3.1 s later, has not come)
        d = h["i2"].dispatcher
        assert d.waiting == 1, d.waiting
        m.max_jobs["n2"] = 1
        m.do("connect", h.connect, "n2", 1, list(PAIRS), "i2")
        assert [(k, n) for k, _, _, n, _ in h.handed] == [("s2:0:translate:en", "n2")], h.handed
    elif name == "crash_after_lost_move":  # a move's reply is lost and acting on that raises: the job is released from
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))  # the node Redis moved it to (not the one it left)
        m.max_jobs["n1"] = 2
        m.do("connect", h.connect, "n1", 2, [PAIRS[0]], "i2")
        instance = h.owner("s2")
        instance.act_crash = (1, False)
        scheduling = instance.dispatcher._scheduling
        candidates = scheduling.candidates
        m.trio.call(lambda: candidates(*PAIRS[0], refresh=True))  # (n1 among them: the move is not STALE_CANDIDATES)

        async def lose_move_reply(*args, **kwargs):
            found = await candidates(*args, **kwargs)
            h.replies_lost = True
            return found

        scheduling.candidates = lose_move_reply
        m.do("disconnect", h.disconnect, "n0")  # the job moves to n1; the reply of its redispatch_task is lost
        scheduling.candidates = candidates
        m._outage(0.25, None, lost=True)
        assert int(m.r.hget(m.k.node_runtime("n1"), keys.runtime_field("n1", "current_jobs")) or 0) == 0
    elif name == "crash_after_lost_reply":  # a dispatch's reply is lost and acting on that raises: what it made is undone
        instance = h.owner("s2")
        instance.act_crash = (1, False)
        scheduling = instance.dispatcher._scheduling
        candidates = scheduling.candidates

        async def then_lose_replies(*args, **kwargs):  # the nodes are read; the reply of its dispatch_task is lost
            found = await candidates(*args, **kwargs)
            h.replies_lost = True
            return found

        scheduling.candidates = then_lose_replies
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        scheduling.candidates = candidates
        m._outage(0.25, None, lost=True)  # (then a second with Redis back: the release went through)
        job_id = m.r.get(m.k.jobkey("s2:0:translate:en"))
        assert job_id and m.r.hget(m.k.job(job_id), "status") == "cancelled" and not h.handed, (job_id, h.handed)
        assert [o.translation.error for _, o, _ in h.got if isinstance(o, JobOutcome)] == ["INTERNAL"], h.got
    elif name == "outage_lease":  # i1's job on i2's node: Redis is down past its lease, which counts the outage out
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        m._outage(3.1, None)  # (then a second with Redis back)
        key = "s0:0:translate:en"
        held = [(x.job_key, x.attempt) for x in h.held["n0"].values()]
        assert held == [(key, 1)] and h["i1"].dispatcher.placed[key].node_id == "n0", held
        m.advance(3.1)  # the lease, later by the outage, runs out: the job moves
        assert (key, 1) not in [(x.job_key, x.attempt) for x in h.held["n0"].values()], h.held
    elif name in ("remote_node_lost", "remote_instance_lost", "remote_to_here"):
        # i1's job on i2's node: the node leaves i2; i2 dies; the node moves to i1 on a new connection
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        assert "s0:0:translate:en" in h["i1"].dispatcher.placed and h.where["n0"] == "i2"
        if name == "remote_node_lost":
            m.do("disconnect", h.disconnect, "n0")
        elif name == "remote_instance_lost":
            m.do("kill", h.kill, "i2")
        else:
            m.do("disconnect", h.disconnect, "n0")
            m.do("connect", h.connect, "n0", 2, list(PAIRS), "i1")
        m.do("advance", h.advance, 1.0)
        assert "s0:0:translate:en" not in h["i1"].dispatcher.placed or name == "remote_to_here"
    elif name == "remote_answer_unheard":  # i1's job on i2's node is answered, and the relayed answer is lost
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        (node, job_id, attempt), = m._held()
        h.lose_outcomes = 1
        m._answer(node, job_id, attempt, True)
        m.jobs["s0:0:translate:en"].stored = True  # (kept in Redis; the session's poll of stored answers is not here)
        m.do("answer", h.answer, node, job_id, attempt, True)
        assert "s0:0:translate:en" in h["i1"].dispatcher.placed
        m.do("advance", h.advance, 1.0)  # the remote watch sees it finished: off the books, not moved
        assert "s0:0:translate:en" not in h["i1"].dispatcher.placed and not h["i1"].dispatcher._moving
        assert h["i1"].metrics.redispatch_total._value.get() == 0
    elif name == "orphan_on_live_node":  # i2 dies with a job on i1's node: the sweep releases it and tells the node
        m.max_jobs["n1"] = 2
        m.do("connect", h.connect, "n1", 2, list(PAIRS), "i1")
        m.do("disconnect", h.disconnect, "n0")
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("kill", h.kill, "i2")
        assert h.held["n1"]
        m.do("advance", h.advance, 3.1)
        m.do("advance", h.advance, 3.1)
        assert not h.held["n1"], h.held
    elif name == "relay_unreachable":  # i2's node has no live owner record: i1's job for it moves on
        m.r.delete(keys.node_owner("n0"))
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        assert "s0:0:translate:en" not in h["i1"].dispatcher.placed, h["i1"].dispatcher.placed
    elif name == "adopt_after_stored":  # s2's first job answered while s2 has no owner, its second adopted
        m.max_jobs["n1"] = 2
        m.do("connect", h.connect, "n1", 2, list(PAIRS), "i1")  # s2's jobs go to i1's node, which outlives i2
        m.do("disconnect", h.disconnect, "n0")
        first, second = (m._submit("s2", PAIRS[0], 30.0), m._submit("s2", PAIRS[0], 30.0))
        m.do("submit", m.trio_sync(first))
        m.do("submit", m.trio_sync(second))
        m.do("kill", h.kill, "i2")
        job_id, held = min(h.held["n1"].items(), key=lambda item: m.jobs[item[1].job_key].seq)
        m._answer("n1", job_id, held.attempt, True)
        m.do("answer", h.answer, "n1", job_id, held.attempt, True)
        m.resume_s2()
        assert len(h["i1"].dispatcher.placed) == 1, h["i1"].dispatcher.placed
    elif name == "orphan_hash_gone":  # i2 dies holding a job whose hash then expires: only its lease is left
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("kill", h.kill, "i2")
        job_id = h.handed[0][1]
        m.r.delete(m.k.job(job_id))
        m.do("advance", h.advance, 3.1)
        m.do("advance", h.advance, 3.1)
        assert m.k.lease_of(m.r, job_id) is None
        m.do("connect", h.connect, "n0", 2, list(PAIRS), "i1")  # (its node comes back: a new connection holds no job)
    elif name == "data_loss":  # Redis loses its data under a job of each instance on i2's node
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        old = {job_id for _, job_id, *_ in h.handed}
        m.lose_data(noticed=False)
        m.do("advance", h.advance, 1.0)  # i1's remote watch sees its job gone first
        m.do("notice_data_loss", h.notice_data_loss)  # then the health check: i2's own
        m.do("advance", h.advance, RETRY_S)  # (a lost job's redispatch is refused UNKNOWN_JOB: placed afresh next round)
        held = set(h.held["n0"])
        assert len(held) == 2 and not held & old, (held, old)  # placed again as new jobs; the old ones cancelled
        m.answer_all()
        assert len([o for _, o, _ in h.got if isinstance(o, JobOutcome)]) == 2, h.got
    elif name == "resume_here_queued":  # s2, resumed on i1, resumes on i1 again with a job waiting in i1's lane
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("kill", h.kill, "i2")
        m.resume_s2()
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))  # i1 has no node: it waits
        assert h["i1"].dispatcher.waiting, h["i1"].dispatcher.placed
        m.resume_s2_again()  # the new epoch owns it: placed under that epoch, not refused FENCED
        m.max_jobs["n2"] = 2
        m.do("connect", h.connect, "n2", 2, list(PAIRS), "i1")
        assert "s2:1:translate:en" in h["i1"].dispatcher.placed
        m.resume_s2_again()  # and again, with that job on i1's books: adopted once only
        m.answer_all()
        outcomes = [o.translation.status for s, o, _ in h.got if isinstance(o, JobOutcome) and o.utterance_index == 1]
        assert outcomes == ["SUCCESS"], h.got
    elif name == "answer_while_moving":  # two leases run out in one tick; one node, one job placed per round
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        m.do("submit", m.trio_sync(m._submit("s0", PAIRS[0], 30.0)))
        m.do("advance", h.advance, 3.1)  # both move; the first finds no other node: the lane waits, the second untried
        d = h["i1"].dispatcher
        untried = [p for p in d._moving.values() if m.r.hget(m.k.job(p.job_id), "status") == "dispatched"]
        assert len(d._moving) == 2 and len(untried) == 1, (d._moving, untried)
        p = untried[0]  # its node answers it (it was told job_cancel, but had finished): Redis takes it
        m._answer(p.node_id, p.job_id, p.attempt, True)
        m.do("answer_lost", h.answer, p.node_id, p.job_id, p.attempt, True)
        assert list(d._moving) != [p.request.job_key] and d.waiting == 1, (d._moving, d.waiting)
    elif name == "moving_past_deadline":  # a job leaves its node, finds no other, and its deadline passes in the lane
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 1.0)))
        m.do("disconnect", h.disconnect, "n0")  # its slot released by the node's leave; the job waits as a move
        d = h["i2"].dispatcher
        assert list(d._moving) == ["s2:0:translate:en"], d._moving
        m.do("advance", h.advance, 1.0)  # dropped at its deadline: what it still holds is released
        assert not d._moving and not d.waiting and m.r.hget(m.k.job(h.handed[0][1]), "status") == "cancelled"
    elif name == "orphan_key_mismatch":  # i2 dies holding two jobs; cancel_task refuses the first: the second is released
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("kill", h.kill, "i2")
        (first_key, first_id, *_), (_, second_id, *_) = h.handed
        m.r.set(m.k.jobkey(first_key), "1")  # its job key now names another job (a record gone astray)
        m.astray.add(first_id)
        m.do("advance", h.advance, 3.1)
        m.do("advance", h.advance, 3.1)
        refused = [r.fields for r in m.journal.records if getattr(r, "event", None) == "orphan_release_refused"]
        assert refused and {f["job_id"] for f in refused} == {first_id}, refused
        assert m.r.hget(m.k.job(second_id), "status") == "cancelled" and m.r.hget(m.k.job(first_id), "status") == "dispatched"
        m.r.set(m.k.jobkey(first_key), first_id)  # set right: the next sweep releases it
        m.astray.clear()
        m.do("advance", h.advance, 3.1)
        assert m.r.hget(m.k.job(first_id), "status") == "cancelled"
    elif name == "node_not_reading":  # the chosen node's outbox is full: the job goes back to its lane's head
        h.not_reading.add("n0")
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        d = h["i2"].dispatcher
        assert [(p.node_id, p.attempt) for p in d._moving.values()] == [("n0", 1)] and not h.handed, d._moving
        assert ("s2", JobWaiting(0, "en", "NODE_UNREACHABLE"), "i2") in h.got, h.got
        h.not_reading.clear()
        m.max_jobs["n2"] = 2
        m.do("connect", h.connect, "n2", 2, list(PAIRS), "i2")  # placed again, elsewhere, as attempt 2
        assert [(k, a, n) for k, _, a, n, _ in h.handed] == [("s2:0:translate:en", 2, "n2")], h.handed
    elif name == "copy_while_moving":  # a key placed again (a replay) while its job moves: the copy's deadline is its own
        m.do("submit", m.trio_sync(m._submit("s2", PAIRS[0], 30.0)))
        m.do("bounce", h.bounce, "n0", m.max_jobs["n0"], "i2")  # the job moves, never to the node it leaves
        key = "s2:0:translate:en"
        m.resubmitted.add(key)
        m.resubmits += 1
        m.do("submit_again", m.trio_sync(lambda: h.submit("s2", 0, PAIRS[0], 5.0, epoch=m.epochs["s2"])))
        m.advance(3.1)
        m.advance(3.1)  # the copy's deadline passed: dropped, and the original still moves
        assert key in h["i2"].dispatcher._moving, h["i2"].dispatcher._moving
        m.max_jobs["n2"] = 2
        m.do("connect", h.connect, "n2", 2, list(PAIRS), "i2")
        m.answer_all()
        assert [o.translation.status for _, o, _ in h.got if isinstance(o, JobOutcome)] == ["SUCCESS"], h.got
    else:
        raise AssertionError(name)
    reasons = {r.fields.get("reason") or r.event for r in m.journal.records if r.name == "scheduler.dispatcher"}
    mark = {"orphan_sweep": "orphan_job_released", "adopt_waiting": "ADOPTED_WAITING", "lease_expiry": "LEASE_EXPIRED",
            "remote_reconnect": "NODE_RECONNECTED", "outage_lease": "LEASE_EXPIRED", "data_loss": "JOB_LOST",
            "remote_node_lost": "NODE_LOST", "remote_instance_lost": "NODE_INSTANCE_LOST",
            "remote_to_here": "NODE_RECONNECTED", "orphan_on_live_node": "orphan_job_released",
            "relay_unreachable": "NODE_UNREACHABLE"}.get(name)
    assert mark is None or mark in reasons, reasons


class _Draws:
    """A stand-in for Hypothesis' ``data`` in a fixed path: every draw gives ``value``."""

    def __init__(self, value):
        self.value = value

    def draw(self, _strategy):
        return self.value


def test_the_machine_finds_a_first_come_first_served_lane(flushed_single_url, monkeypatch):
    """The fairness check can fail: a lane that offers its jobs in submission order (moves
    first, then oldest first, whatever the session: the lane before fairqueue.py) makes s1's
    job wait behind s0's whole burst, and _check_fair_turns says so."""
    from scheduler.placement.fairqueue import FairQueue

    def first_come(queue):
        yield from queue._moves
        yield from sorted((r for q in queue._sessions.values() for r in q), key=lambda r: r.utterance_index)

    monkeypatch.setattr(FairQueue, "__iter__", first_come)
    with pytest.raises(AssertionError, match="waited behind"):
        test_dispatcher_paths(flushed_single_url, "fair_turns")


@pytest.mark.parametrize("name", ["orphan_sweep", "fair_turns", "adopt_waiting", "lease_expiry", "remote_reconnect", "outage_cancel",
                                  "outage_lease", "data_loss", "adopt_after_stored", "orphan_hash_gone", "remote_node_lost",
                                  "remote_instance_lost", "remote_to_here", "remote_answer_unheard", "orphan_on_live_node",
                                  "relay_unreachable", "resume_here_queued", "answer_while_moving",
                                  "moving_past_deadline", "orphan_key_mismatch", "node_not_reading",
                                  "copy_while_moving", "late_bounce_here", "lost_replies", "outage_waiting",
                                  "crash_after_lost_reply", "crash_after_lost_move", "orphan_of_previous_life"])
def test_dispatcher_paths(flushed_single_url, name):
    DispatcherMachine.url = flushed_single_url
    machine = DispatcherMachine()
    machine.start(queue_size=6, place_batch=1 if name == "answer_while_moving" else 2,
                  layout={"answer_while_moving": "i1", "late_bounce_here": "both", "orphan_of_previous_life": "i1"}.get(name, "i2"))
    try:
        _path(machine, name)
    finally:
        machine.teardown()
