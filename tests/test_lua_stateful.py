"""Hypothesis state machine over the Lua scheduling scripts, against a real Valkey.

Rules register nodes (and reconnect them), heartbeat (with a load score, above or below the
threshold: a saturated node must get no job; a draining node's heartbeat says so again; a
heartbeat on an old connection, or on one that closed, must change nothing: a node whose
connection closed stays offline until it registers again), collect an instance that is in
fact alive (its nodes offline; their next heartbeat brings them back),
drain nodes (sometimes the drain's own write is lost: its next heartbeat must carry it; a
draining node must get no job), kill nodes (offline + every job
moved as the dispatcher does), dispatch jobs (with turn keep/end), complete them from the
right or a wrong node and attempt, cancel them, expire their leases (redispatch), and fire
stale redispatch triggers. After every step the Redis state itself must be consistent:

- per node: current_jobs == |node job set| == jobs whose status is dispatched on that node,
  and 0 <= current_jobs <= max_jobs;
- the leases set holds exactly the dispatched jobs; a job key maps to one job, whose one
  live attempt is held by one node;
- attempts only grow, by exactly one per move;
- a dispatched job's lease is its placement time + the lease;
- a finished or cancelled job stays as it ended, whatever is called on it later.
Dispatch answers EXISTS only with the job that holds the key: a key whose dispatch was
refused (no node) is retried and must be placed, never reported as existing. A waiting job
is cancelled with the node it left, as the dispatcher does (its slot was released once,
when it left). At the end every job is completed or cancelled and every slot is free.
"""

from __future__ import annotations

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from scheduler.store import keys, liveness, lua
from scheduler.store.redis_adapter import connect, load_script_sources

NODES = ["n0", "n1", "n2", "n3"]
OWNER = {"n0": "i1", "n1": "i2", "n2": "i1", "n3": "i2"}  # the instance holding each node's socket (locality)
RUNTIME_COPY = lua.RUNTIME_COPY_FIELDS
"""The info fields node choice reads from the runtime table's copy (luascripts/lib/runtime_table.lua)."""


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
        self.ended: dict[str, dict] = {}  # job id -> {"key", "status"}: finished, failed or cancelled
        self.refused: list[str] = []  # job keys whose dispatch was refused (no job was made)
        self.alive: dict[str, int] = {}  # online nodes -> their last register or heartbeat (ms)
        self.saturated: set[str] = set()  # nodes whose last heartbeat said saturated (a registration clears it)
        self.drain_said: set[str] = set()  # nodes whose connection is draining (the gateway's conn.draining)
        self.draining: set[str] = set()  # ... and whose drain reached Redis (node_state, or a heartbeat since)
        self.score: dict[str, float] = {}  # each node's last reported load score (a registration clears it)
        self.lapse: dict[str, float | None] = {}  # instance -> its score in {scheduler}:instances (None: unlisted)
        self.closed: set[str] = set()  # nodes whose connection closed (node_state cleared its conn_id)
        self.finalized = 0  # session "s": the utterances its resume journal counts (a fresh claim with an entry raises it)
        self.entries: dict[int, str] = {}  # ... and the "u:<index>" entries the claims wrote

    def teardown(self):
        for job_id in list(self.jobs):
            self._cancel(job_id)
        self.check_state()
        for node in self.max_jobs:
            assert int(self.r.hget(keys.nodes_runtime(), keys.runtime_field(node, "current_jobs"))) == 0
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
        self._call(*lua.register_node(node, [("zh-en", "zh", "en")], self.max_jobs[node], self.now, OWNER[node],
                                      conn_id=f"c-{node}"))
        self.closed.discard(node)
        self.score.pop(node, None)
        self.alive[node] = self.now
        self.saturated.discard(node)
        self.drain_said.discard(node)  # a new connection: not draining
        self.draining.discard(node)

    def _check_placed(self, node):
        """A node that gets a job is online and heard from within the node TTL (6 s here)."""
        assert node in self.alive, f"job placed on {node}, which is offline"
        assert self.now - self.alive[node] <= 6_000, f"job placed on {node}, silent for {self.now - self.alive[node]} ms"
        assert node not in self.saturated, f"job placed on {node}, whose load score is above the threshold"
        assert node not in self.draining, f"job placed on {node}, which is draining"
        assert self._owner_alive(node), f"job placed on {node}, whose instance is dead: {self.lapse}"

    def _owner_alive(self, node) -> bool:
        """store/liveness.py's rule as choose_node applies it: unlisted, or a lapse not past."""
        lapse = self.lapse.get(OWNER[node])
        return lapse is None or lapse >= self.now

    @rule(instance=st.sampled_from(["i1", "i2"]), state=st.sampled_from(["alive", "lapses_now", "lapsed", "unlisted",
                                                                          "tombstone"]))
    def instance_liveness(self, instance, state):
        """An instance's liveness just before, at and after a placement: refreshed (alive for
        30 s), lapsing at this very millisecond (still alive), lapsed a millisecond ago, not
        listed (Redis lost its data: alive), or collected (a tombstone: dead). A node whose
        instance is dead gets no job (choose_node.lua)."""
        value = {"alive": self.now + 30_000, "lapses_now": self.now, "lapsed": self.now - 1,
                 "unlisted": None, "tombstone": liveness.tombstone(self.now)}[state]
        self.lapse[instance] = value
        if value is None:
            self.r.zrem(keys.instances(), instance)
        else:
            self.r.zadd(keys.instances(), {instance: value})

    def _loads(self) -> dict[str, float]:
        """Each node a job could go to now, with its load: the larger of its busy share and its
        last load score (choose_node.lua's rule, from the machine's own books)."""
        busy = {n: 0 for n in self.max_jobs}
        for job in self.jobs.values():
            if job["node"] is not None:
                busy[job["node"]] += 1
        return {n: max(busy[n] / self.max_jobs[n], self.score.get(n, 0.0)) for n, seen in self.alive.items()
                if self.now - seen <= 6_000 and n not in self.saturated and n not in self.draining
                and busy[n] < self.max_jobs[n] and self._owner_alive(n)}

    def _check_choice(self, node, loads, affinity, near, slack):
        """The turn's affinity node if it could take the job; else the least loaded node, or
        one of ``near``'s nodes when the least loaded of those is within ``slack`` of it."""
        assert loads, f"job placed on {node}, yet no node had room for it (full, silent, draining or saturated)"
        if affinity in loads:
            assert node == affinity, f"{node} chosen, the turn's affinity {affinity} could take it"
            return
        best = min(loads.values())
        local = [load for n, load in loads.items() if OWNER[n] == near]
        if local and min(local) <= best + slack + 1e-9:
            assert OWNER[node] == near and abs(loads[node] - min(local)) < 1e-9, (node, loads, near, slack)
        else:
            assert abs(loads[node] - best) < 1e-9, (node, loads, near, slack)

    def _cancel(self, job_id):
        job = self.jobs[job_id]
        node = job["node"] or job["left"] or "none"  # a waiting job: the node it left, as the dispatcher passes
        reply = self._call(*lua.cancel(job_id, job["key"], node, self.now))
        assert reply[0] == "OK", reply
        del self.jobs[job_id]
        self.ended[job_id] = {"key": job["key"], "status": "cancelled"}

    def _move(self, job_id, attempt=None):
        job = self.jobs[job_id]
        old = job["node"] or "none"
        expected = job["attempt"] if attempt is None else attempt
        reply = self._with_candidates(
            lambda c: lua.redispatch(job_id, old, expected, "s", "t", "zh", "en", self.now, 30_000, 6_000, 7, c))
        if reply[0] == "OK":
            assert reply[3] == job["attempt"] + 1 and reply[2] != old, reply
            self._check_placed(reply[2])
            job.update(attempt=reply[3], node=reply[2], lease=self.now + 30_000)
        elif reply[0] == "ERR":
            assert reply[1] in ("NO_AVAILABLE_NODE", "EMPTY_POOL"), reply
            if job["node"] is not None:
                job["left"] = job["node"]
            job["node"] = None  # waiting, same attempt
        else:
            assert reply[0] == "NOOP"

    # ------------------------------------------------------------ rules

    @initialize()
    def first_node(self):
        self.max_jobs["n0"] = 2
        self._register("n0")

    @rule(node=st.sampled_from(NODES), max_jobs=st.integers(min_value=1, max_value=3), sibling=st.booleans())
    def register(self, node, max_jobs, sibling):
        """``sibling``: the other node held by the same instance registers too (an instance's
        nodes come and go together: node choice then meets two nodes of one owner)."""
        for n in [node, *(m for m in NODES if sibling and m != node and OWNER[m] == OWNER[node])]:
            self.max_jobs.setdefault(n, max_jobs)  # a reconnect keeps its capacity
            self._register(n)

    @precondition(lambda self: self.max_jobs)
    @rule(picks=st.lists(st.integers(0, 9), min_size=1, max_size=3), dt=st.integers(min_value=0, max_value=8000),
          scores=st.lists(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 0.75, 0.76, 1.0])), min_size=3, max_size=3),
          old_conns=st.lists(st.booleans(), min_size=3, max_size=3))
    def heartbeat(self, picks, dt, scores, old_conns):
        """One node's heartbeat, or the node gateway's batch of several (the same node twice,
        maybe) in one heartbeats.lua call, each taken as its own would be.
        ``old_conns``: a heartbeat came on a connection the node left (handled late, after it
        reconnected); a node whose connection closed has only such heartbeats."""
        self.now += dt
        nodes = [sorted(self.max_jobs)[p % len(self.max_jobs)] for p in picks]
        beats = [lua.Beat(node, None, score, score is not None and score > 0.75,  # (--node-load-threshold 0.75)
                          node in self.drain_said, f"old-{node}" if old else f"c-{node}")
                 for node, score, old in zip(nodes, scores, old_conns, strict=False)]
        replies = self._call(*lua.heartbeats(beats, self.now))
        assert len(replies) == len(beats), replies
        for beat, reply, old in zip(beats, replies, old_conns, strict=False):
            self._heard(beat.node_id, reply, beat.load_score, beat.saturated, old)

    @precondition(lambda self: self.max_jobs)
    @rule(score=st.sampled_from([0.5, 0.75]))
    def turn_node_gets_busier(self, score):
        """The turn's affinity node reports more load than the others (its own connection, not
        saturated): a keep or end job must still go to it, where least-loaded alone would not."""
        node = self.r.hget(keys.turn("t"), "affinity_node_id")
        if node is None or node not in self.max_jobs:
            return
        beat = lua.Beat(node, None, score, False, node in self.drain_said, f"c-{node}")
        (reply,) = self._call(*lua.heartbeats([beat], self.now))
        self._heard(node, reply, score, False, False)

    def _heard(self, node, reply, score, saturated, old_conn):
        """A heartbeat's reply, and what the model takes from it."""
        if old_conn or node in self.closed:
            assert reply[0] == "STALE_CONN", f"a heartbeat of a connection {node} no longer has was taken: {reply}"
            return
        assert reply[0] == "OK", f"the heartbeat of {node}'s own connection was refused: {reply}"  # (after a collection too)
        self.alive[node] = self.now
        if score is None:
            self.score.pop(node, None)
        else:
            self.score[node] = score
        if node in self.drain_said:
            self.draining.add(node)
        if saturated:
            self.saturated.add(node)
        else:
            self.saturated.discard(node)

    @precondition(lambda self: self.alive)
    @rule(pick=st.integers(min_value=0, max_value=9), written=st.booleans())
    def drain(self, pick, written):
        """A node sends ``drain``: its connection is draining from now on. ``written``: the
        node_state call got through; else Redis was out and only its next heartbeat tells it."""
        node = sorted(self.alive)[pick % len(self.alive)]
        self.drain_said.add(node)
        if written and self._call(*lua.node_state(node, OWNER[node], online=True, draining=True))[0] == "OK":
            self.draining.add(node)

    @precondition(lambda self: self.max_jobs)
    @rule(pick=st.integers(min_value=0, max_value=9))
    def node_dies(self, pick):
        """The node's connection closes: offline on that connection (the gateway's leave)."""
        node = sorted(self.max_jobs)[pick % len(self.max_jobs)]
        if node not in self.closed:
            assert self._call(*lua.node_state(node, OWNER[node], online=False, draining=False, conn_id=f"c-{node}"))[0] == "OK"
            self.closed.add(node)
        self.alive.pop(node, None)
        for job_id, job in list(self.jobs.items()):
            if job["node"] == node:
                self._move(job_id)

    @precondition(lambda self: self.max_jobs)
    @rule(instance=st.sampled_from(["i1", "i2"]))
    def alive_instance_collected(self, instance):
        """Another instance took ``instance`` for dead (its liveness lapsed in a stall) and
        marked its nodes offline (Ownership.collect_dead, no connection named); their sockets
        are open, their jobs stay. No job goes to them until a heartbeat brings them back."""
        for node in sorted(self.max_jobs):
            if OWNER[node] == instance and node not in self.closed:
                assert self._call(*lua.node_state(node, instance, online=False, draining=False))[0] == "OK"
                self.alive.pop(node, None)
                self.draining.discard(node)  # (its connection's drain comes back with its next heartbeat)

    @precondition(lambda self: self.max_jobs)
    @rule(pick=st.integers(min_value=0, max_value=9))
    def replaced_connection_closes(self, pick):
        """The close of a connection the node no longer uses (it reconnected; the machine's nodes
        register with conn_id ''), handled late: the node stays as it is."""
        node = sorted(self.max_jobs)[pick % len(self.max_jobs)]
        assert self._call(*lua.node_state(node, OWNER[node], online=False, draining=False, conn_id="gone"))[0] in (
            "STALE_CONN", "NOT_OWNER")

    @rule(action=st.sampled_from(["none", "keep", "end"]), which=st.sampled_from(["new", "live", "ended", "refused", "late"]),
          pick=st.integers(0, 99), rand=st.integers(0, 100), near=st.sampled_from(["", "i1", "i2"]),
          slack=st.sampled_from([0.0, 0.25, 0.5]), journal=st.booleans())
    def dispatch(self, action, which, pick, rand, near, slack, journal):
        """A new key, or again the key of a live job, of an ended one, or of a refused dispatch;
        placed by instance ``near`` (or none), whose nodes win within ``slack`` of load. Key
        ``s:<n>:...`` is utterance n; with ``journal`` it is the utterance's first job and
        carries its resume-journal entry: a job created writes it unless the journal counts
        the utterance already (refused keys come back after later ones; ``late``: a new key of
        an utterance before the last one counted, e.g. a job created after its result was sent)."""
        known = {j["key"]: job_id for job_id, j in [*self.jobs.items(), *self.ended.items()]}
        pool = {"live": [j["key"] for j in self.jobs.values()], "ended": [j["key"] for j in self.ended.values()],
                "refused": [k for k in self.refused if k not in known]}.get(which)
        if pool:
            key = sorted(pool)[pick % len(pool)]
        elif which == "late" and self.finalized:
            key = f"s:{pick % self.finalized}:translate:late{self.next_key}"
            self.next_key += 1
        else:
            key = f"s:{self.next_key}:translate:en"
            self.next_key += 1
        self.next_id += 1
        job_id = str(self.next_id)
        loads, affinity = self._loads(), self.r.hget(keys.turn("t"), "affinity_node_id")
        if action == "none":  # (a cut of a turn never kept: the caller's word, its affinity is not read)
            affinity = None
        index = int(key.split(":")[1])
        entry = f'{{"reason": "pause", "turn_id": "t", "n": {self.next_id}}}' if journal else ""
        reply = self._with_candidates(
            lambda c: lua.dispatch(key, job_id, "s", index, "zh", "en", "t", action, self.now, 30_000, 6_000, rand, c,
                                   placed_by=near, locality_slack=slack, journal_entry=entry))
        if reply[0] == "OK" and entry and index >= self.finalized:
            self.entries[index], self.finalized = entry, index + 1
        if reply[0] == "OK":
            assert key not in known, "a second job for one key"
            assert str(reply[1]) == job_id, reply
            self._check_placed(reply[2])
            self._check_choice(reply[2], loads, affinity, near, slack)
            self.jobs[job_id] = {"key": key, "attempt": reply[3], "node": reply[2], "left": None,
                                 "lease": self.now + 30_000}
        elif reply[0] == "EXISTS":
            assert known.get(key) == str(reply[1]), f"EXISTS names job {reply[1]} for {key}, which holds {known.get(key)}"
        else:
            assert reply[1] in ("NO_AVAILABLE_NODE", "EMPTY_POOL", "NO_POOL_FOR_LANG_PAIR"), reply
            assert not loads, f"{reply[1]} while {sorted(loads)} could take the job"
            assert key not in known, f"{key} holds job {known.get(key)}, yet dispatch was refused"
            self.refused.append(key)

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
            self.ended[job_id] = {"key": job["key"], "status": "finished" if ok else "failed", "by": (node, attempt)}
        else:
            assert reply[0] == "ERR" and reply[1] in ("NODE_MISMATCH", "STALE_ATTEMPT", "ALREADY_COMPLETED"), reply

    @precondition(lambda self: self.jobs)
    @rule(pick=st.integers(min_value=0, max_value=99))
    def cancel(self, pick):
        self._cancel(sorted(self.jobs)[pick % len(self.jobs)])

    @precondition(lambda self: self.ended)
    @rule(pick=st.integers(min_value=0, max_value=99), how=st.sampled_from(["cancel", "complete", "redispatch"]),
          node=st.one_of(st.just("answerer"), st.sampled_from(NODES)))
    def call_on_an_ended_job(self, pick, how, node):
        """A late cancel, answer or lease expiry for a job already finished or cancelled: nothing
        changes. ``answerer``: the node that answered it, at its attempt (a second answer)."""
        job_id = sorted(self.ended)[pick % len(self.ended)]
        key = self.ended[job_id]["key"]
        node, attempt = self.ended[job_id].get("by", (NODES[0], 1)) if node == "answerer" else (node, 1)
        if how == "cancel":
            reply = self._call(*lua.cancel(job_id, key, node, self.now))
            assert reply[0] == "NOOP", reply
        elif how == "complete":
            reply = self._call(*lua.complete(job_id, key, node, attempt, True, self.now))
            assert reply[0] == "ERR", reply
        else:
            attempt = int(self.r.hget(keys.job(job_id), "attempt"))
            reply = self._with_candidates(
                lambda c: lua.redispatch(job_id, node, attempt, "s", "t", "zh", "en", self.now, 30_000, 6_000, 7, c))
            assert reply[0] == "NOOP", reply

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
        """Every key this checks is read in one pipeline (one round trip per step)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id, job in self.jobs.items():
            pipe.hgetall(keys.job(job_id))
            pipe.zscore(keys.leases(), job_id)
            pipe.get(keys.jobkey(job["key"]))
            pipe.ttl(keys.job(job_id))
            pipe.ttl(keys.jobkey(job["key"]))
        for node in self.max_jobs:
            pipe.smembers(keys.node_jobs(node))
            pipe.hget(keys.nodes_runtime(), keys.runtime_field(node, "current_jobs"))
            pipe.hmget(keys.node_info(node), *RUNTIME_COPY)
            pipe.hget(keys.nodes_runtime(), node)
        for job_id, job in self.ended.items():
            pipe.hget(keys.job(job_id), "status")
            pipe.ttl(keys.job(job_id))
            pipe.ttl(keys.jobkey(job["key"]))
        pipe.zrange(keys.leases(), 0, -1)
        pipe.hgetall(keys.session("s"))
        pipe.ttl(keys.session("s"))
        replies = iter(pipe.execute())

        dispatched: dict[str, set[str]] = {}
        for job_id, job in self.jobs.items():
            h, lease, mapped = next(replies), next(replies), next(replies)
            assert int(h["attempt"]) == job["attempt"], (job_id, h, job)
            if job["node"] is None:
                assert h["status"] == "waiting", h
            else:
                assert h["status"] == "dispatched" and h["node_id"] == job["node"], (h, job)
                dispatched.setdefault(job["node"], set()).add(job_id)
                assert lease == job["lease"], f"job {job_id} leased until {lease}, placed at {job['lease'] - 30_000}"
            assert mapped == job_id
            ttls = next(replies), next(replies)
            assert min(ttls) > 0, f"job {job_id}: its hash and job key live on without a TTL ({ttls}): memory grows"
        for node, max_jobs in self.max_jobs.items():
            held, current = next(replies), int(next(replies))
            info, copy = next(replies), next(replies)
            info = dict(zip(RUNTIME_COPY, (v or "" for v in info), strict=True)) if any(info) else None
            assert lua.runtime_copy(copy) == info, f"{node}: node choice reads {copy}, its info holds {info}"
            assert held == dispatched.get(node, set()), (node, held, dispatched.get(node))
            assert current == len(held), (node, current, held)
            assert 0 <= current <= max_jobs
        for job_id, job in self.ended.items():
            assert next(replies) == job["status"], (job_id, job)
            ttls = next(replies), next(replies)  # (-2: gone already; the job key of a key used again is the new job's)
            assert ttls[0] != -1 and 0 < ttls[0] <= keys.DONE_TTL_S, f"ended job {job_id} is kept {ttls[0]} s"
            assert ttls[1] != -1, f"ended job {job_id}'s key has no TTL"
        leased = set(next(replies))
        assert leased == set().union(*dispatched.values()) if dispatched else not leased
        session, session_ttl = next(replies), next(replies)
        assert session_ttl != -1, "the session hash has no TTL: it is never collected"
        assert int(session.get("finalized", 0)) == self.finalized, (session.get("finalized"), self.finalized)
        assert {int(f[2:]): v for f, v in session.items() if f.startswith("u:")} == self.entries, (session, self.entries)


# CI keeps the machines under a minute together (docs/testing.md): the single server takes
# most examples; the cluster run is there for key slots (a CROSSSLOT error shows at once)
EXAMPLES = {"single": 150, "cluster": 50}


@pytest.mark.parametrize("backend", ["single", "cluster"])
def test_lua_scripts_state_machine(backend, request):
    ScriptsMachine.url = request.getfixturevalue("flushed_cluster_url" if backend == "cluster" else "flushed_single_url")
    examples = min(settings().max_examples, EXAMPLES[backend])
    run_state_machine_as_test(ScriptsMachine, settings=settings(max_examples=examples, stateful_step_count=40))
