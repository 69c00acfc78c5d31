"""Hypothesis state machine over the Lua scheduling scripts, against a real Valkey.

Rules register nodes (and reconnect them), heartbeat, kill nodes (offline + every job
moved as the dispatcher does), dispatch jobs (with turn keep/end), complete them from the
right or a wrong node and attempt, cancel them, expire their leases (redispatch), and fire
stale redispatch triggers. After every step the Redis state itself must be consistent:

- per node: current_jobs == |node job set| == jobs whose status is dispatched on that node,
  and 0 <= current_jobs <= max_jobs;
- the leases set holds exactly the dispatched jobs; a job key maps to one job, whose one
  live attempt is held by one node;
- attempts only grow, by exactly one per move.
At the end every job is completed or cancelled and every slot is free.
"""

from __future__ import annotations

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from scheduler.placement import keys, lua
from scheduler.placement.redis_adapter import connect, load_script_sources

NODES = ["n0", "n1", "n2", "n3"]


class ScriptsMachine(RuleBasedStateMachine):
    url: str = ""

    def __init__(self):
        super().__init__()
        self.r = connect(self.url, decode_responses=True)
        self.r.flushall()
        self.candidates = lua.Candidates()  # as last read; refreshed when a script says STALE_CANDIDATES
        self.next_id = 0
        self.s = {name: self.r.register_script(src) for name, src in load_script_sources().items()}
        self.max_jobs: dict[str, int] = {}
        self.jobs: dict[str, dict] = {}  # job id -> {"key", "attempt", "node"} as the scripts said
        self.now = 1_000_000
        self.next_key = 0

    def teardown(self):
        for job_id in list(self.jobs):
            self._cancel(job_id)
        self.check_state()
        for node in self.max_jobs:
            assert int(self.r.hget(keys.node_runtime(node), "current_jobs")) == 0
        self.r.close()

    # ------------------------------------------------------------ helpers

    def _call(self, name, keys_, args):
        try:
            return self.s[name](keys=keys_, args=args)
        except redis.exceptions.ResponseError as exc:
            return ["ERR", str(exc).split(" ", 1)[0]]

    def _with_candidates(self, build):
        """dispatch/redispatch with the candidates as last read: a stale read is refused and
        changes nothing; read again, call again (as scheduling.SchedulingClient does)."""
        reply = self._call(*build(self.candidates))
        if reply[:2] == ["ERR", "STALE_CANDIDATES"]:
            self.candidates = lua.read_candidates(self.r, "zh", "en")
            reply = self._call(*build(self.candidates))
            assert reply[:2] != ["ERR", "STALE_CANDIDATES"], "fresh candidates refused"
        return reply

    def _register(self, node):
        self._call(*lua.register_node(node, [("zh-en", "zh", "en")], self.max_jobs[node], self.now, "i1"))

    def _cancel(self, job_id):
        job = self.jobs[job_id]
        node = job["node"] or "none"
        reply = self._call(*lua.cancel(job_id, job["key"], node, self.now))
        if reply[0] == "OK":
            del self.jobs[job_id]

    def _move(self, job_id, attempt=None):
        job = self.jobs[job_id]
        old = job["node"] or "none"
        expected = job["attempt"] if attempt is None else attempt
        reply = self._with_candidates(
            lambda c: lua.redispatch(job_id, old, expected, "s", "t", "zh", "en", self.now, 30_000, 6_000, 7, c))
        if reply[0] == "OK":
            assert reply[3] == job["attempt"] + 1 and reply[2] != old, reply
            job.update(attempt=reply[3], node=reply[2])
        elif reply[0] == "ERR":
            assert reply[1] in ("NO_AVAILABLE_NODE", "EMPTY_POOL"), reply
            job["node"] = None  # waiting, same attempt
        else:
            assert reply[0] == "NOOP"

    # ------------------------------------------------------------ rules

    @initialize()
    def first_node(self):
        self.max_jobs["n0"] = 2
        self._register("n0")

    @rule(node=st.sampled_from(NODES), max_jobs=st.integers(min_value=1, max_value=3))
    def register(self, node, max_jobs):
        self.max_jobs.setdefault(node, max_jobs)  # a reconnect keeps its capacity
        self._register(node)

    @precondition(lambda self: self.max_jobs)
    @rule(pick=st.integers(min_value=0, max_value=9), dt=st.integers(min_value=0, max_value=8000))
    def heartbeat(self, pick, dt):
        self.now += dt
        node = sorted(self.max_jobs)[pick % len(self.max_jobs)]
        self._call(*lua.heartbeat(node, self.now))

    @precondition(lambda self: self.max_jobs)
    @rule(pick=st.integers(min_value=0, max_value=9))
    def node_dies(self, pick):
        node = sorted(self.max_jobs)[pick % len(self.max_jobs)]
        self._call(*lua.node_state(node, "i1", online=False, draining=False))
        for job_id, job in list(self.jobs.items()):
            if job["node"] == node:
                self._move(job_id)

    @rule(action=st.sampled_from(["none", "keep", "end"]), again=st.booleans(), rand=st.integers(0, 100))
    def dispatch(self, action, again, rand):
        if again and self.jobs:
            key = next(iter(self.jobs.values()))["key"]
        else:
            key = f"s:{self.next_key}:translate:en"
            self.next_key += 1
        self.next_id += 1
        job_id = str(self.next_id)
        reply = self._with_candidates(
            lambda c: lua.dispatch(key, job_id, "s", 0, "zh", "en", "t", action, self.now, 30_000, 6_000, rand, c))
        if reply[0] == "OK":
            assert key not in {j["key"] for j in self.jobs.values()}, "a second job for one key"
            self.jobs[str(reply[1])] = {"key": key, "attempt": reply[3], "node": reply[2]}
        elif reply[0] == "EXISTS":
            assert any(j["key"] == key for j in self.jobs.values()) or self.r.hget(keys.job(reply[1]), "status") != "dispatched"
        else:
            assert reply[1] in ("NO_AVAILABLE_NODE", "EMPTY_POOL", "NO_POOL_FOR_LANG_PAIR"), reply

    @precondition(lambda self: self.jobs)
    @rule(pick=st.integers(min_value=0, max_value=99), wrong_node=st.booleans(), old_attempt=st.booleans(), ok=st.booleans())
    def complete(self, pick, wrong_node, old_attempt, ok):
        job_id = sorted(self.jobs)[pick % len(self.jobs)]
        job = self.jobs[job_id]
        node = job["node"] or "none"
        if wrong_node:
            node = next(n for n in NODES if n != node)
        attempt = job["attempt"] - 1 if old_attempt else job["attempt"]
        reply = self._call(*lua.complete(job_id, job["key"], node, attempt, ok, self.now))
        right = not wrong_node and not old_attempt and job["node"] is not None
        if right:
            assert reply[0] == "OK", reply
            del self.jobs[job_id]
        else:
            assert reply[0] == "ERR" and reply[1] in ("NODE_MISMATCH", "STALE_ATTEMPT", "ALREADY_COMPLETED"), reply

    @precondition(lambda self: self.jobs)
    @rule(pick=st.integers(min_value=0, max_value=99))
    def cancel(self, pick):
        self._cancel(sorted(self.jobs)[pick % len(self.jobs)])

    @precondition(lambda self: self.jobs)
    @rule(pick=st.integers(min_value=0, max_value=99))
    def lease_expires(self, pick):
        self._move(sorted(self.jobs)[pick % len(self.jobs)])

    @precondition(lambda self: self.jobs)
    @rule(pick=st.integers(min_value=0, max_value=99))
    def stale_redispatch_trigger(self, pick):
        job_id = sorted(self.jobs)[pick % len(self.jobs)]
        before = dict(self.jobs[job_id])
        if before["attempt"] > 1:
            self._move(job_id, attempt=before["attempt"] - 1)
            assert self.jobs[job_id] == before, "a stale trigger moved the job"

    # ------------------------------------------------------------ invariants

    @invariant()
    def check_state(self):
        dispatched: dict[str, set[str]] = {}
        for job_id, job in self.jobs.items():
            h = self.r.hgetall(keys.job(job_id))
            assert int(h["attempt"]) == job["attempt"], (job_id, h, job)
            if job["node"] is None:
                assert h["status"] == "waiting", h
            else:
                assert h["status"] == "dispatched" and h["node_id"] == job["node"], (h, job)
                dispatched.setdefault(job["node"], set()).add(job_id)
            assert self.r.get(keys.jobkey(job["key"])) == job_id
        for node, max_jobs in self.max_jobs.items():
            held = self.r.smembers(keys.node_jobs(node))
            current = int(self.r.hget(keys.node_runtime(node), "current_jobs"))
            assert held == dispatched.get(node, set()), (node, held, dispatched.get(node))
            assert current == len(held), (node, current, held)
            assert 0 <= current <= max_jobs
        leased = set(self.r.zrange(keys.leases(), 0, -1))
        assert leased == set().union(*dispatched.values()) if dispatched else not leased


@pytest.mark.parametrize("backend", ["single", "cluster"])
def test_lua_scripts_state_machine(backend, request):
    ScriptsMachine.url = request.getfixturevalue("flushed_cluster_url" if backend == "cluster" else "flushed_single_url")
    run_state_machine_as_test(ScriptsMachine, settings=settings(stateful_step_count=40))
