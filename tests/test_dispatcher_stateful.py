"""The dispatcher under Hypothesis: the real :class:`Dispatcher` on a real Valkey, with
scripted nodes and a manual MockClock (``dispatcher_harness.py``).

Rules: nodes connect (with 1-3 slots, one or both language pairs) and disconnect; sessions
submit jobs (deadlines from 0.3 s to 30 s, into a queue of 6) and cancel them; nodes answer
what they hold (ok or error), answer again, and answer attempts they lost; time moves (lease
expiry at 3 s, lane retries every 0.25 s); and two of these happen in one tick, with Trio's
scheduler order drawn by Hypothesis.

Checked after every step (:meth:`DispatcherMachine.check`):

- Redis: per node, ``current_jobs`` == its job set == the jobs dispatched on it, within
  ``max_jobs``; the jobs dispatched anywhere are exactly the dispatcher's placed and moving
  ones; each placed job's hash names its node and attempt;
- nodes: a job is held (assigned, not cancelled, not answered) by at most one node, and only
  by the node and attempt of its placement; a node never gets a job it holds again;
- sessions: at most one outcome per job, and exactly the answer of the attempt that was live
  (its text, its status); none for a job cancelled, refused or lost; ``waiting`` notices come
  once per blocked episode, and "placed" only after "waiting";
- order: the first placements of each language pair follow submission order;
- books: the queued count, the lanes and the gauges agree; no job waits past its deadline
  by more than one retry; after time moves, no fresh job waits while a node of its pair has
  a free slot; nothing is logged at ERROR.

At the end (liveness): a node with room for everything joins, the nodes answer, time moves:
every job ends (answered, cancelled, refused, or dropped at its deadline), no slot or lease
is left in Redis, and the books are empty.
"""

from __future__ import annotations

import logging
import os

import attrs
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from scheduler.jobs import JobOutcome, JobWaiting, job_key_for
from scheduler.placement import keys
from scheduler.placement.redis_adapter import connect

from .dispatcher_harness import PAIRS, RETRY_S, DispatcherHarness, ErrorLog
from .session_rules import step_limit
from .trio_thread import TrioThread

NODES = ("n0", "n1", "n2")
EPS = 1e-6


async def _inline(fn, *args, limiter=None, **_):
    await trio.lowlevel.checkpoint()
    return fn(*args)


@attrs.define
class Job:
    key: str
    pair: tuple[str, str]
    seq: int
    deadline: float
    refused: bool = False
    cancelled_at: int | None = None  # the inbox length when the session cancelled it
    answer: tuple[str, str | None] | None = None  # (status, text) of the live attempt's answer
    racing: bool = False  # answered and cancelled in one tick: either may win


class DispatcherMachine(RuleBasedStateMachine):
    url: str = ""

    @initialize(queue_size=st.sampled_from([4, 6]), place_batch=st.sampled_from([1, 2, 32]))
    def start(self, queue_size, place_batch):
        self.r = connect(self.url, decode_responses=True)
        self.r.flushall()
        # Redis calls run inline in the Trio thread, not in a worker thread: when a reply
        # comes back is then no race against the clock, and a failing example replays
        # exactly (Trio's scheduler order is seeded by Hypothesis)
        self._to_thread, trio.to_thread.run_sync = trio.to_thread.run_sync, _inline
        self.errors = ErrorLog()
        logging.getLogger("scheduler").addHandler(self.errors)
        self.trio = TrioThread()
        self.h = self.trio.call_sync(lambda: DispatcherHarness(self.url, queue_size=queue_size, place_batch=place_batch))
        self.trio.call(lambda: self.trio.nursery.start(self.h.run))
        self.jobs: dict[str, Job] = {}
        self.next_index = 0
        self.max_jobs: dict[str, int] = {}

    def teardown(self):
        if not hasattr(self, "trio"):
            return
        try:
            with step_limit("finish"):
                self.finish()
        finally:
            self.trio.close()
            trio.to_thread.run_sync = self._to_thread
            logging.getLogger("scheduler").removeHandler(self.errors)
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

    def _held(self) -> list[tuple[str, str, int]]:
        return sorted((n, job_id, h.attempt) for n, jobs in self.h.held.items() for job_id, h in jobs.items())

    # ------------------------------------------------------------ rules: nodes

    @precondition(lambda self: len(self.h.held) < len(NODES))
    @rule(data=st.data(), max_jobs=st.integers(1, 3), pairs=st.sampled_from([PAIRS, PAIRS[:1], PAIRS[1:]]))
    def connect_node(self, data, max_jobs, pairs):
        node = data.draw(st.sampled_from([n for n in NODES if n not in self.h.held]))
        self.max_jobs[node] = max_jobs
        self.do("connect", self.h.connect, node, max_jobs, list(pairs))

    @precondition(lambda self: self.h.held)
    @rule(data=st.data())
    def disconnect_node(self, data):
        self.do("disconnect", self.h.disconnect, data.draw(st.sampled_from(self.connected)))

    def _answer(self, node, job_id, attempt, ok):
        job = self.jobs[self.h.held[node][job_id].job_key]
        job.answer = ("SUCCESS", f"{job_id}:{attempt}") if ok else ("FAILED", None)

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
        status, holder, current, key = self.r.hmget(keys.job(job_id), "status", "node_id", "attempt", "job_key")
        if (status, holder, current) == ("dispatched", node, str(attempt)):
            self.jobs[key].answer = ("SUCCESS", f"{job_id}:{attempt}")
        self.do("answer_lost", self.h.answer, node, job_id, attempt, True)

    @precondition(lambda self: any(j.answer for j in self.jobs.values()))
    @rule(data=st.data())
    def answer_again(self, data):
        """The same answer twice (or from a reconnected node): the second one is refused."""
        node = data.draw(st.sampled_from(self.connected)) if self.h.held else None
        done = [(job_id, a) for (key, job_id, a, _) in self.h.handed if self.jobs[key].answer]
        if node is not None and done:
            job_id, attempt = data.draw(st.sampled_from(done))
            self.do("answer_again", self.h.answer, node, job_id, attempt, True)

    # ------------------------------------------------------------ rules: sessions and time

    def _submit(self, session, pair, ttl):
        index = self.next_index
        self.next_index += 1
        key = job_key_for(session, index, pair[1])
        job = self.jobs[key] = Job(key, pair, index, self.now + ttl)

        def submit():
            job.refused = self.h.submit(session, index, pair, ttl) is not None

        return submit

    @rule(session=st.sampled_from(["s0", "s1"]), pair=st.sampled_from(PAIRS), ttl=st.sampled_from([0.3, 1.0, 5.0, 30.0]))
    def submit(self, session, pair, ttl):
        self.do("submit", self.trio_sync(self._submit(session, pair, ttl)))

    def _cancellable(self) -> list[str]:
        return sorted(k for k, j in self.jobs.items() if not j.refused and j.cancelled_at is None and j.answer is None)

    def _cancel(self, key):
        self.jobs[key].cancelled_at = len(self.h.inbox.got)
        return lambda: self.h.cancel(key.split(":")[0], [key])

    @precondition(lambda self: self._cancellable())
    @rule(data=st.data())
    def cancel(self, data):
        self.do("cancel", self._cancel(data.draw(st.sampled_from(self._cancellable()))))

    @rule(seconds=st.sampled_from([0.05, 0.25, 1.0, 3.1]))
    def advance(self, seconds):
        self.do("advance", self.h.advance, seconds)
        self.check_no_idle_slot()

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
            steps.append(self.trio_sync(self._submit("s1", data.draw(st.sampled_from(PAIRS)), 5.0)))
        else:
            steps.append(lambda: self.h.advance(RETRY_S))

        async def both():
            async with trio.open_nursery() as nursery:
                for step in reversed(steps) if midway else steps:
                    nursery.start_soon(step)
                    if midway:
                        await trio.testing.wait_all_tasks_blocked()  # the lanes now wait for Redis

        self.do("together", both)

    @staticmethod
    def trio_sync(fn):
        async def run():
            fn()

        return run

    # ------------------------------------------------------------ checks

    def check(self):
        self.trio.call_sync(self._check_books)
        self._check_redis()
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]

    def _check_books(self):
        d, h, now = self.h.dispatcher, self.h, self.now
        queued = [r for lane in d._lanes.values() for r in lane.queue]
        assert d._queued == len(queued) == d.waiting, (d._queued, len(queued))
        assert h.metrics.jobs_in_flight._value.get() == len(d.placed)
        assert h.metrics.jobs_waiting._value.get() == len(queued)
        for r in queued:
            due = max(r.deadline, h.queued_since[r.job_key])  # a job moved after its deadline: from then
            assert due > now - RETRY_S - EPS, f"{r.job_key} waits {now - due:.2f} s past its deadline"
            assert r.job_key not in d.placed and not self.jobs[r.job_key].refused
        holders: dict[str, tuple[str, str, int]] = {}
        for node, jobs in h.held.items():
            for job_id, held in jobs.items():
                assert held.job_key not in holders, f"{held.job_key} held by {holders[held.job_key]} and {node}"
                holders[held.job_key] = (node, job_id, held.attempt)
        for key, p in d.placed.items():
            assert holders.pop(key, None) == (p.node_id, p.job_id, p.attempt), (key, p)
        assert not holders, f"nodes hold jobs the dispatcher does not: {holders}"
        self._check_sessions()
        self._check_order()

    def _check_sessions(self):
        outcomes: dict[str, list[tuple[int, JobOutcome]]] = {}
        told: dict[str, list[str | None]] = {}
        for n, (sid, o) in enumerate(self.h.inbox.got):
            key = job_key_for(sid, o.utterance_index, o.tgt_lang)
            if isinstance(o, JobOutcome):
                outcomes.setdefault(key, []).append((n, o))
            else:
                assert isinstance(o, JobWaiting)
                told.setdefault(key, []).append(o.error)
        for key, job in self.jobs.items():
            got = outcomes.get(key, [])
            if job.answer is None:
                assert not got, f"{key}: an outcome nobody answered: {got}"
                continue
            assert len(got) == 1 or (job.racing and not got), f"{key}: {len(got)} outcomes"
            if not got:
                continue  # the cancel won the race: the answer was refused
            n, o = got[0]
            assert (o.translation.status, o.translation.text) == job.answer, (key, o, job.answer)
            assert job.cancelled_at is None or n < job.cancelled_at or job.racing, f"{key}: an outcome after its cancel"
        for key, codes in told.items():
            for a, b in zip(codes, codes[1:], strict=False):
                assert (a is None) != (b is None), f"{key}: waiting notices {codes}"
            assert codes[0] is not None, f"{key}: 'placed' before 'waiting': {codes}"

    def _check_order(self):
        first: dict[str, int] = {}
        for key, *_ in self.h.handed:
            first.setdefault(key, len(first))
        for pair in PAIRS:
            seqs = [self.jobs[k].seq for k in sorted(first, key=first.get) if self.jobs[k].pair == pair]
            assert seqs == sorted(seqs), f"{pair}: first placements out of submission order: {seqs}"

    def _check_redis(self):
        d = self.h.dispatcher
        nodes = sorted(self.max_jobs)
        pipe = self.r.pipeline(transaction=False)
        for node in nodes:
            pipe.smembers(keys.node_jobs(node))
            pipe.hget(keys.node_runtime(node), "current_jobs")
        placed, moving = list(d.placed.values()), list(d._moving.values())
        for p in placed + moving:
            pipe.hmget(keys.job(p.job_id), "status", "node_id", "attempt")
        replies = iter(pipe.execute())
        dispatched: set[str] = set()
        for node in nodes:
            held, current = next(replies), int(next(replies) or 0)
            assert current == len(held) <= self.max_jobs[node], (node, current, held)
            dispatched |= held
        for p in placed:
            assert next(replies) == ["dispatched", p.node_id, str(p.attempt)], p
        for m in moving:  # still on the node it leaves, or waiting (its slot released) for a new one
            status, node, attempt = next(replies)
            assert (status, attempt) == ("dispatched", str(m.attempt)) and node == m.node_id or status == "waiting", (m, status)
        books = {p.job_id for p in placed} | {m.job_id for m in moving}
        assert dispatched <= books, f"Redis holds {sorted(dispatched)}, the books {sorted(books)}"

    def check_no_idle_slot(self):
        """After time moved: no lane of fresh jobs waits while a node of its pair has room."""
        d = self.h.dispatcher
        for pair, lane in d._lanes.items():
            if not lane.queue or any(r.job_key in d._moving for r in lane.queue):
                continue
            for node in self.connected:
                if list(pair) in self.h.nodes.get(node).registration.lang_pairs:
                    free = self.max_jobs[node] - int(self.r.hget(keys.node_runtime(node), "current_jobs") or 0)
                    assert free <= 0, f"{pair}: {len(lane.queue)} jobs wait while {node} has {free} free slots"

    # ------------------------------------------------------------ the end

    def finish(self):
        """Liveness: a node with room for everything joins; answer, move time; all ends."""
        if "n9" not in self.h.held:
            self.max_jobs["n9"] = 8
            self.trio.call(self.h.connect, "n9", 8, list(PAIRS))
        d = self.h.dispatcher
        for _ in range(400):
            self.trio.call(self.h.settle)
            for node, job_id, attempt in self._held():
                self._answer(node, job_id, attempt, True)
                self.trio.call(self.h.answer, node, job_id, attempt, True)
            self.trio.call(self.h.settle)
            self.check()
            if not d.waiting and not d.placed and not d._moving and not d._owed_releases:
                break
            self.trio.call(self.h.advance, RETRY_S)
        else:
            raise AssertionError(f"no end: {d.waiting} queued, {len(d.placed)} placed, {len(d._moving)} moving")
        for key, job in self.jobs.items():
            ended = job.refused or job.cancelled_at is not None or job.answer is not None or job.deadline <= self.now + EPS
            assert ended, f"{key} never ended"
        for node in self.max_jobs:
            assert int(self.r.hget(keys.node_runtime(node), "current_jobs") or 0) == 0, node
        assert not self.r.zrange(keys.leases(), 0, -1)


# a Redis round trip or more per step: 40 examples of 25 steps keep CI near 6 s (docs/testing.md);
# DISPATCHER_EXAMPLES=1000 for a longer search
EXAMPLES = int(os.environ.get("DISPATCHER_EXAMPLES", 40))


def test_dispatcher_state_machine(flushed_single_url):
    DispatcherMachine.url = flushed_single_url
    run_state_machine_as_test(DispatcherMachine, settings=settings(settings(), max_examples=min(settings().max_examples, EXAMPLES),
                                                                    stateful_step_count=25))
