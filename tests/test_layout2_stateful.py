"""Hypothesis state machine over layout 2's two-step placement (docs/redis.md, "Scheduling
shards"), against real Valkey (one server, and the 3-master cluster: a script touching two
slots fails CROSSSLOT there): session_claim in the session's slot, then shard_dispatch in one
of two shards, with resumes, late second steps, burns and answers in between.

Rules: an owner claims a job key (step 1) in a shard, and runs the step 2 of any claim it
made later, possibly after the session was resumed by a new owner (a late step 2 of a stale
owner); a shard that refuses moves the claim to the other shard (compare-and-set); the
session is resumed (the epoch moves on, the old owner's pending claims go stale); the new
owner settles a claim it finds without a job (job_burn, then claims again under its own id);
nodes take jobs, answer them, and fill up. A job moves off its node (shard_redispatch); one
its shard cannot take waits there, and moves across shards in three steps run in any order
with the rest (job_move_out, claim_move, job_move_in, then a move in the new shard); a
release follows a job across shards as SchedulingClient.cancel does (cancel_task, then
job_burn or cancel_task of the id it became). After every step:

- a job key has at most one job dispatched or waiting, and its claim names it (or a pending
  step 2 of the current owner, or a claim refused by every shard, or a move across shards
  whose claim has not followed yet);
- a job that left its shard names the job it became, which exists, or is burned, or is on
  its way; a released job key has no job dispatched or waiting, whatever moves were under way;
- a burned id never holds a slot: a late step 2 after a burn places nothing;
- a stale owner creates no job after its claim was burned, and its claims are FENCED;
- per node: current_jobs == |job set| == dispatched jobs on it, within max_jobs;
- a session's state and its claims live in its own slot, a job in its node's shard.
"""

from __future__ import annotations

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from scheduler.store import keys, lua
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import connect, load_script_sources

SPACE = KeySpace(2)
NODES = {"n0": 0, "n4": 1}  # node -> its shard
SESSION = "s1"
KEYS_ = [f"{SESSION}:{i}:translate:en" for i in range(6)]


class TwoStepMachine(RuleBasedStateMachine):
    url: str = ""

    def __init__(self):
        super().__init__()
        for node, shard in NODES.items():  # (as the node directory gives them: the daemon learns it)
            SPACE.learn(node, shard)
        self.r = connect(self.url, decode_responses=True)
        self.r.flushall()
        self.s = {name: self.r.register_script(src) for name, src in load_script_sources().items()}
        self.now = 1_000_000
        self.number = 0
        self.epoch = 1  # the current owner's epoch
        self.r.hset(SPACE.session_key(SESSION), mapping={"epoch": 1})
        self.pending: list[tuple[str, str, int]] = []  # (job key, job id, epoch of its claimer): step 2 not run yet
        self.burned: set[str] = set()
        self.made: dict[str, set[str]] = {k: set() for k in KEYS_}  # job key -> the ids of jobs created for it
        self.answered: set[str] = set()
        self.moving: list[list] = []  # moves across shards under way: [job key, old id, new id, fields, step done]
        self.released: set[str] = set()  # job keys released (cancelled, following moves)
        self.max_jobs = {}
        for node, max_jobs in (("n0", 1), ("n4", 2)):
            self.max_jobs[node] = max_jobs
            tag = SPACE.node_tag(node)
            self._call(*lua.register_node(node, [("zh-en", "zh", "en")], max_jobs, self.now, "i1", conn_id=f"c-{node}", tag=tag))

    def teardown(self):
        self.r.close()

    def _call(self, name, keys_, args):
        try:
            return self.s[name](keys=keys_, args=args)
        except redis.exceptions.ResponseError as exc:
            return ["ERR", str(exc).split(" ", 1)[0]]

    def _claim(self, job_key, job_id, epoch, replaces=""):
        return self._call(*lua.session_claim(job_key, job_id, SESSION, KEYS_.index(job_key), "t1", "none", epoch=epoch,
                                             replaces=replaces, tag=SPACE.session_tag(SESSION)))

    def _step2(self, job_key, job_id):
        shard = SPACE.job_shard(job_id)
        tag = SPACE.shard_tag(shard)
        cand = lua.read_candidates(self.r, "zh", "en", tag=tag)
        return self._call(*lua.shard_dispatch(job_key, job_id, SESSION, KEYS_.index(job_key), "zh", "en", "t1", self.now,
                                              30_000, 600_000, 0, cand, placed_by="i1"))

    # ------------------------------------------------------------ rules

    @rule(key=st.sampled_from(KEYS_), shard=st.sampled_from([0, 1]))
    def claim(self, key, shard):
        """The current owner claims a job key for a fresh id (step 1 only)."""
        self.number += 1
        job_id = SPACE.job_id(shard, self.number)
        reply = self._claim(key, job_id, self.epoch)
        if reply[0] == "CLAIMED":
            self.pending.append((key, job_id, self.epoch))
        else:
            assert reply[0] == "EXISTS", reply

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(min_value=0, max_value=9))
    def step2(self, pick):
        """A claim's step 2, perhaps late (its claimer may be stale by now); a refusal moves
        the claim to the other shard when its claimer is still the owner."""
        key, job_id, epoch = self.pending.pop(pick % len(self.pending))
        reply = self._step2(key, job_id)
        if reply[0] == "OK":
            assert job_id not in self.burned, f"a burned id {job_id} was placed"
            self.made[key].add(job_id)
        elif reply[0] == "EXISTS":
            assert reply[4] == "burned" and job_id in self.burned, reply
        elif reply[:2] == ["ERR", "NO_AVAILABLE_NODE"]:
            other = SPACE.job_id(1 - SPACE.job_shard(job_id), int(job_id.split(".")[1]))
            moved = self._claim(key, other, epoch, replaces=job_id)
            if epoch != self.epoch:
                assert moved[:2] == ["ERR", "FENCED"], moved
            elif moved[0] == "CLAIMED":
                self.pending.append((key, other, epoch))
        else:
            raise AssertionError(reply)

    @rule()
    def resume(self):
        """The session is resumed elsewhere: the epoch moves on; claims made before stay."""
        self.epoch = self.r.hincrby(SPACE.session_key(SESSION), "epoch", 1)

    @rule(key=st.sampled_from(KEYS_))
    def new_owner_settles(self, key):
        """The owner finds a claim whose job it does not see: job_burn in its shard, then,
        if burned, a claim under its own id."""
        claimed = self.r.get(SPACE.jobkey_key(SESSION, key))
        if not claimed or any(p[1] == claimed and p[2] == self.epoch for p in self.pending):
            return  # (its own pending claim: it does not burn that)
        reply = self._call(*lua.job_burn(key, claimed, self.now, tag=SPACE.job_tag(claimed)))
        if reply[0] == "BURNED":
            self.burned.add(claimed)
            self.number += 1
            mine = SPACE.job_id(self.number % 2, self.number)
            assert self._claim(key, mine, self.epoch, replaces=claimed)[0] == "CLAIMED"
            self.pending.append((key, mine, self.epoch))
        else:
            assert reply[0] == "EXISTS" and (reply[4] == "burned" or claimed in self.made[key]), (reply, self.made[key])

    def _jobs(self, status: str) -> list[str]:
        return sorted(j for ids in self.made.values() for j in ids
                      if self.r.hget(keys.job(j, tag=SPACE.job_tag(j)), "status") == status)

    @rule(pick=st.integers(min_value=0, max_value=9))
    def answer(self, pick):
        live = self._jobs("dispatched")
        if not live:
            return
        job_id = live[pick % len(live)]
        tag = SPACE.job_tag(job_id)
        node, key, attempt = self.r.hmget(keys.job(job_id, tag=tag), "node_id", "job_key", "attempt")
        reply = self._call(*lua.complete(job_id, key, node, int(attempt), True, self.now, tag=tag, claim=False))
        assert reply[0] == "OK", reply
        self.answered.add(job_id)

    @rule(pick=st.integers(min_value=0, max_value=9))
    def move(self, pick):
        """A job leaves its node (its lease ran out) or, waiting, tries again, in its shard."""
        live = self._jobs("dispatched") + self._jobs("waiting")
        if not live:
            return
        job_id = live[pick % len(live)]
        tag = SPACE.job_tag(job_id)
        node, attempt = self.r.hmget(keys.job(job_id, tag=tag), "node_id", "attempt")
        cand = lua.read_candidates(self.r, "zh", "en", tag=tag)
        reply = self._call(*lua.shard_redispatch(job_id, node, int(attempt), "zh", "en", self.now, 30_000, 600_000, 0,
                                                 cand))
        assert reply[0] == "OK" or reply[:2] == ["ERR", "NO_AVAILABLE_NODE"], reply

    @rule(pick=st.integers(min_value=0, max_value=9))
    def move_out(self, pick):
        """Step 1 of a move across shards: a waiting job leaves its shard for a new id in the other."""
        waiting = [j for j in self._jobs("waiting") if not any(m[1] == j for m in self.moving)]
        if not waiting:
            return
        job_id = waiting[pick % len(waiting)]
        tag = SPACE.job_tag(job_id)
        self.number += 1
        new = SPACE.job_id(1 - SPACE.job_shard(job_id), self.number)
        attempt = int(self.r.hget(keys.job(job_id, tag=tag), "attempt"))
        reply = self._call(*lua.job_move_out(job_id, attempt, new, self.now, tag=tag))
        assert reply[0] == "OK", reply
        fields = dict(zip(reply[1::2], reply[2::2], strict=True))
        self.moving.append([fields["job_key"], job_id, new, fields, 1])

    @precondition(lambda self: self.moving)
    @rule(pick=st.integers(min_value=0, max_value=9), repeat=st.booleans())
    def move_on(self, pick, repeat):
        """The next step of a move across shards (``repeat``: the last one again, as after a
        lost reply): the claim follows (claim_move), the job is made waiting in its new
        shard (job_move_in), then moved to a node there."""
        m = self.moving[pick % len(self.moving)]
        key, old, new, fields, done = m
        step = done if repeat else done + 1
        if step == 1:
            reply = self._call(*lua.job_move_out(old, int(fields["attempt"]), new, self.now, tag=SPACE.job_tag(old)))
            assert reply[0] == "OK" and dict(zip(reply[1::2], reply[2::2], strict=True))["job_key"] == key, reply
        elif step == 2:
            reply = self._call(*lua.claim_move(SPACE.jobkey_key(SESSION, key), old, new, 300))
            if reply[0] == "EXISTS":  # another job answers the key: this one has nothing left to move
                assert reply[1] != old, reply
                self.moving.remove(m)
                return
        else:
            reply = self._call(*lua.job_move_in(new, key, old, fields, tag=SPACE.job_tag(new)))
            self.moving.remove(m)
            if reply[0] == "OK" or reply[1] == "waiting":
                self.made[key].add(new)
            else:
                assert reply == ["EXISTS", "burned", 0] and new in self.burned, reply  # a release, or a new owner
                # that found the claim without its job, burned it first: the move makes nothing
            return
        m[4] = step

    @precondition(lambda self: self.moving)
    @rule(pick=st.integers(min_value=0, max_value=9))
    def move_through(self, pick):
        """The steps a move across shards has left, one after the other, then the move to a
        node of its new shard (shard_redispatch), as a placer with nothing in between does."""
        m = self.moving[pick % len(self.moving)]
        while m in self.moving:
            self.move_on(self.moving.index(m), False)
        live = self._jobs("dispatched") + self._jobs("waiting")
        if m[2] in self._jobs("waiting"):
            self.move(live.index(m[2]))

    @precondition(lambda self: self.moving)
    @rule(pick=st.integers(min_value=0, max_value=9), then_repeat=st.booleans())
    def settle_moving(self, pick, then_repeat):
        """A new owner meets the claim of a job half way across shards, after the claim
        followed it (claim_move, made now if not yet) and before it was made there
        (new_owner_settles: it burns the new id and claims the key for itself);
        ``then_repeat``: the mover's repeat of claim_move (after a lost reply) lands next, and
        must leave that claim alone."""
        m = self.moving[pick % len(self.moving)]
        if m[4] == 1:
            self.move_on(self.moving.index(m), False)
        if m not in self.moving:
            return
        self.new_owner_settles(m[0])
        if then_repeat:
            self.move_on(self.moving.index(m), True)

    @rule(pick=st.integers(min_value=0, max_value=9))
    def release_waiting(self, pick):
        """A job key is released while its job waits for a node (it holds no slot: none is
        given back)."""
        waiting = self._jobs("waiting")
        busy = [j for j in waiting if self._holds_others(j)]  # (its release must give back none of their slots)
        if waiting:
            job_id = (busy or waiting)[pick % len(busy or waiting)]
            self.release(self.r.hget(keys.job(job_id, tag=SPACE.job_tag(job_id)), "job_key"))

    def _holds_others(self, job_id: str) -> bool:
        """Whether the node a waiting job left holds jobs now."""
        tag = SPACE.job_tag(job_id)
        node = self.r.hget(keys.job(job_id, tag=tag), "node_id")
        return node in NODES and NODES[node] == SPACE.job_shard(job_id) and \
            int(self.r.hget(keys.nodes_runtime(tag=tag), keys.runtime_field(node, "current_jobs")) or 0) > 0

    @precondition(lambda self: self.moving)
    @rule(pick=st.integers(min_value=0, max_value=9))
    def release_moving(self, pick):
        """A job key is released while its job is half way across shards."""
        self.release(self.moving[pick % len(self.moving)][0])

    @rule(key=st.sampled_from(KEYS_))
    def release(self, key):
        """The job key is no longer wanted: its claim's job is cancelled, following moves across
        shards (SchedulingClient.cancel)."""
        job_id = self.r.get(SPACE.jobkey_key(SESSION, key))
        if not job_id or any(p[0] == key for p in self.pending):
            return  # (nothing placed, or a step 2 still to come: its owner releases it then)
        tag = SPACE.job_tag(job_id)
        node = self.r.hget(keys.job(job_id, tag=tag), "node_id") or ""
        reply = self._call(*lua.cancel(job_id, key, node, self.now, tag=tag, claim=False))
        for _ in range(16):
            if reply[:2] == ["NOOP", "moved"]:
                if not reply[2]:
                    break  # (names nothing: nothing to follow)
                job_id = reply[2]
            elif reply[:2] != ["NOOP", ""]:
                break  # (an id whose job is not made yet, e.g. the claim followed a move: burned)
            burned = self._call(*lua.job_burn(key, job_id, self.now, tag=SPACE.job_tag(job_id)))
            if burned[0] == "BURNED":
                self.burned.add(job_id)
                break
            reply = self._call(*lua.cancel(job_id, key, burned[2], self.now, tag=SPACE.job_tag(job_id), claim=False))
        self.released.add(key)

    # ------------------------------------------------------------ checks

    @invariant()
    def one_job_per_key_and_the_claim_names_it(self):
        for key, ids in self.made.items():
            statuses = {j: self.r.hget(keys.job(j, tag=SPACE.job_tag(j)), "status") for j in ids}
            live = [j for j, status in statuses.items() if status in ("dispatched", "waiting")]
            assert len(live) <= 1, f"{key}: jobs {statuses}"
            assert not (live and key in self.released), f"{key} released, yet {live} runs"
            created = [j for j, status in statuses.items() if status != "moved"]
            assert len(created) <= 1, f"{key}: jobs {statuses}"
            claimed = self.r.get(SPACE.jobkey_key(SESSION, key))
            assert claimed not in self.burned or key in self.released, f"{key}: its claim names burned {claimed}"
            if live:
                assert claimed == live[0] or any(p[0] == key and p[1] == claimed for p in self.pending) \
                    or any(m[0] == key and m[4] < 2 for m in self.moving), (key, claimed, live)
            for j, status in statuses.items():
                if status == "moved":  # it names what it became: made, burned, or on its way
                    nxt = self.r.hget(keys.job(j, tag=SPACE.job_tag(j)), "moved_to")
                    assert nxt in ids or nxt in self.burned or any(m[2] == nxt for m in self.moving), (key, j, nxt)

    @invariant()
    def slots_match_the_jobs(self):
        for node, shard in NODES.items():
            tag = SPACE.shard_tag(shard)
            held = self.r.smembers(keys.node_jobs(node, tag=tag))
            current = int(self.r.hget(keys.nodes_runtime(tag=tag), keys.runtime_field(node, "current_jobs")) or 0)
            dispatched = {j for j in self._jobs("dispatched") if self.r.hget(keys.job(j, tag=SPACE.job_tag(j)), "node_id") == node}
            assert current == len(held) and held == dispatched and current <= self.max_jobs[node], (node, held, dispatched)
            assert not held & self.burned


EXAMPLES = {"single": 150, "cluster": 40}


@pytest.mark.parametrize("backend", ["single", "cluster"])
def test_two_step_placement_state_machine(backend, request):
    TwoStepMachine.url = request.getfixturevalue("flushed_cluster_url" if backend == "cluster" else "flushed_single_url")
    examples = min(settings().max_examples, EXAMPLES[backend])
    run_state_machine_as_test(TwoStepMachine, settings=settings(max_examples=examples, stateful_step_count=50))
