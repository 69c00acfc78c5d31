"""What the dispatcher asks the store to place, and how the store does it in each layout.

The dispatcher's lanes hand :meth:`SchedulingClient.place_many` a batch of :class:`NewJob` and
:class:`MoveJob` (oldest first) and get one reply per item, in the shape dispatch_task and
redispatch_task reply in layout 1 (``{"OK", job_id, node_id, attempt, conn_id}``, the long
``EXISTS`` of a repeat, ``{"EXISTS", job_id}`` for a job key placed before, ``NOOP``) or the
exception a refusal raised. So the dispatcher does not know which layout runs.

Layout 1: one dispatch_task / redispatch_task per item, in one ordered pipeline.

Layout 2 (:class:`ShardedPlacer`, docs/redis.md "Scheduling shards"): a new job is claimed in
its session's slot (session_claim), then created in a shard (shard_dispatch); a move runs in
its job's shard (shard_redispatch). The shard of a new job: the shard of the node its turn's
previous job went to (affinity), else the batch's shard: the better of two random shards that
serve the pair by the free share of their slots as last reported (an old report counts as
unknown, tried first). A shard that refuses (no free node) changes nothing, and the claim moves to the next
shard (compare-and-set), the same one for every job of the batch that was refused, so the
batch stays in order; only when every shard serving the pair refused does the item get the
refusal, and the lane waits. Job ids name their shard: ``<shard>.<n>``, where ``n`` is the
number the dispatcher allocated; a claim found under the same ``n`` in another shard is this
job's own (a repeat after a lost reply), any other is settled with job_burn: a job that
exists (whatever its status: as in layout 1, a job key is placed once) makes the item a
duplicate (``EXISTS``); one that never came, or was burned, is claimed again.

A move stays in its job's shard while that shard has a free node; when it has none and
another shard serving the pair has one, the job moves across shards (store/relocating.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from scheduler.ops.logs import event
from scheduler.store import lua
from scheduler.store.items import Context, Item, MoveJob, NewJob
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import (
    EmptyPool,
    Fenced,
    NoAvailableNode,
    NoPoolForLangPair,
    RedisAdapter,
    StaleCandidates,
    now_ms,
)
from scheduler.store.relocating import Relocator, remember

log = logging.getLogger("scheduler.dispatcher")  # (placement's events are the dispatcher's)

STALE_RETRIES = 3
FREE_FRESH_S = 1.0  # a shard's free-slot report older than this counts as unknown
REFUSALS = (NoAvailableNode, EmptyPool, NoPoolForLangPair)


def layout1_call(item: Item, ctx: Context, candidates: lua.Candidates) -> lua.Call:
    rand = item.rand
    if isinstance(item, NewJob):
        return lua.dispatch(item.job_key, item.number, item.session_id, item.utterance_index, item.src, item.tgt,
                            item.turn_id, item.turn_action, ctx.now_ms, ctx.lease_ms, ctx.node_ttl_ms, rand, candidates,
                            item.turn_jobs, epoch=item.epoch, placed_by=ctx.placed_by, audio_b64=item.audio_b64,
                            sample_rate=item.sample_rate, deadline_ms=item.deadline_ms, locality_slack=ctx.locality_slack,
                            journal_entry=item.journal_entry)
    return lua.redispatch(item.job_id, item.old_node, item.expected_attempt, item.session_id, item.turn_id, item.src,
                          item.tgt, ctx.now_ms, ctx.lease_ms, ctx.node_ttl_ms, rand, candidates, near=ctx.placed_by,
                          locality_slack=ctx.locality_slack)


@attrs.define(eq=False)
class _Placing:
    """One new job on its way through the claim and the shards."""

    job: NewJob
    shard: int
    job_id: str
    tried: set[int]
    replaces: str = ""
    hints: tuple[str, str] = ("", "")  # (preferred pool, affinity node) as the claim replied
    stale: int = 0


class ShardedPlacer:
    """Layout 2's placement (module docstring). ``candidates(src, tgt, shard, refresh)``
    reads a shard's candidates for a pair (cached by the caller)."""

    def __init__(self, redis: RedisAdapter, space: KeySpace,
                 candidates: Callable[[str, str, int, bool], Awaitable[lua.Candidates]],
                 numbers: Callable[[int], Awaitable[list[str]]]) -> None:
        self.on_event: Callable[[str], None] = lambda event: None  # "moved", "burned", "relocated": the metric
        self._redis = redis
        self._space = space
        self._candidates = candidates
        self._free: dict[tuple[str, str, int], tuple[float, float]] = {}  # (src, tgt, shard) -> (free share of its
        # slots as last reported, when)
        self._turn_node: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()  # (session, turn) -> the node
        # of its last "keep" job, and that node's shard
        self._refused: OrderedDict[str, str] = OrderedDict()  # job key -> the id its claim names, refused by every
        # shard: the next try claims over it (compare-and-set) instead of burning it (a burn is for others' claims)
        self._moves = Relocator(redis, space, candidates, numbers, self._free, lambda what: self.on_event(what))

    def relocated(self, job_id: str) -> str | None:
        """The id a job moving from here took in another shard, if it did since last asked."""
        return self._moves.relocated(job_id)

    async def place(self, src: str, tgt: str, items: list[Item], ctx: Context, serving: list[int]) -> list[Any]:
        """One reply per item (module docstring); ``serving``: the shards with a pool of the pair."""
        replies: list[Any] = [None] * len(items)
        placing: dict[int, _Placing] = {}
        rand = next((item.rand for item in items if isinstance(item, NewJob)), 0)
        batch_shard = self._better_of_two(src, tgt, serving, rand) if serving else 0
        for i, item in enumerate(items):
            if isinstance(item, NewJob):
                if not serving:
                    replies[i] = NoPoolForLangPair(f"NO_POOL_FOR_LANG_PAIR {src}->{tgt}")
                    continue
                shard = self._first_shard(item, serving, batch_shard)
                placing[i] = _Placing(item, shard, self._space.job_id(shard, int(item.number)), {shard},
                                      replaces=self._refused.pop(item.job_key, ""))
        moves = {i: (self._moves.followed(item), 0) for i, item in enumerate(items) if isinstance(item, MoveJob)}
        leaving = [(i, m) for i, (m, _) in moves.items() if self._moves.under_way(m.job_id)]  # (a move across shards that
        for i, _ in leaving:  # stopped half way: it goes on)
            del moves[i]
        if leaving:
            await self._moves.relocate(src, tgt, leaving, replies, moves, serving, ctx)
        claiming = dict(placing)
        for _ in range(len(serving) + STALE_RETRIES + 3):  # a claim per shard tried, stale candidates, one burn, a move
            if claiming:  # across shards
                await self._claim(claiming, replies, list(placing.values()))
            dispatching = {i: p for i, p in claiming.items() if replies[i] is None}
            claiming, moves = await self._dispatch(src, tgt, dispatching, moves, ctx, replies, serving)
            if not claiming and not moves:
                break
        for i, (m, _) in moves.items():
            replies[i] = StaleCandidates(f"STALE_CANDIDATES job {m.job_id}")
        for i, p in placing.items():
            if replies[i] is None:  # (every round used up: never expected)
                replies[i] = NoAvailableNode(f"NO_AVAILABLE_NODE {src}->{tgt} job {p.job_id}")
        return replies

    def _first_shard(self, job: NewJob, serving: list[int], batch_shard: int) -> int:
        """The turn's shard (affinity), else the batch's: one shard for the whole batch keeps
        it in order (one pipeline per shard: if a job finds no slot, neither does any later
        one there), and its refused jobs move on together."""
        kept = self._turn_node.get((job.session_id, job.turn_id))
        if kept is not None and kept[1] in serving:
            return kept[1]
        return batch_shard

    def _better_of_two(self, src: str, tgt: str, shards: list[int], rand: int) -> int:
        """Of two shards drawn by ``rand`` (the caller's random number: replayable), the one
        with the larger free share of its slots as last reported (a share, not a count: a
        shard of more nodes would win every draw, and one of fewer would wait until the others
        are full); the first drawn on a tie."""
        first = shards[rand % len(shards)]
        rest = [k for k in shards if k != first]
        picks = [first, rest[(rand // len(shards)) % len(rest)]] if rest else [first]
        return max(picks, key=lambda k: self._free_share(src, tgt, k))

    def _free_share(self, src: str, tgt: str, shard: int) -> float:
        free, when = self._free.get((src, tgt, shard), (0, -FREE_FRESH_S))
        return free if trio.current_time() - when < FREE_FRESH_S else float("inf")

    async def _claim(self, claiming: dict[int, _Placing], replies: list[Any], batch: list[_Placing]) -> None:
        """session_claim for each; a job key claimed for another job is settled (job_burn),
        unless that job is one of this batch (``batch``): the item is then a duplicate."""
        order = list(claiming.items())
        got = await self._redis.script_many([self._claim_call(p) for _, p in order])
        burns: list[tuple[int, _Placing, str]] = []
        in_batch = {p.job_id for p in batch}
        for (i, p), reply in zip(order, got, strict=True):
            if isinstance(reply, BaseException):
                replies[i] = reply
                if p.replaces:  # (the claim it was to take over is still its own to take over next time)
                    remember(self._refused, p.job.job_key, p.replaces)
            elif reply[0] == "CLAIMED":
                p.hints = (str(reply[2]), str(reply[3]))
            elif str(reply[1]) in in_batch:  # a copy of a job key placed in this same batch: a duplicate
                replies[i] = ["EXISTS", str(reply[1])]
            else:  # EXISTS: claimed for another job id
                other = str(reply[1])
                if number_of(other) == p.job.number and other != p.job_id:  # this job's own claim, from a lost reply
                    p.job_id, p.shard, p.replaces = other, self._space.job_shard(other), ""
                    p.tried.add(p.shard)
                    burns.append((i, p, ""))
                else:
                    burns.append((i, p, other))
        if burns:
            await self._settle(burns, replies)

    async def _settle(self, burns: list[tuple[int, _Placing, str]], replies: list[Any]) -> None:
        """Claims of other job ids: burn each (or take it as it is); a job that exists is a
        duplicate (``EXISTS``), anything else is claimed again over it. An own claim of
        another shard (``other`` '') is claimed again as it is, for its hints."""
        settle = [(i, p, other) for i, p, other in burns if other]
        got = await self._redis.script_many([lua.job_burn(p.job.job_key, other, now_ms(), tag=self._space.job_tag(other))
                                             for _, p, other in settle])
        again: dict[int, _Placing] = {i: p for i, p, other in burns if not other}
        for (i, p, other), reply in zip(settle, got, strict=True):
            if isinstance(reply, BaseException):
                replies[i] = reply
            elif reply[0] == "BURNED" or reply[4] == "burned":
                if reply[0] == "BURNED":
                    self.on_event("burned")
                    event(log, "claim_burned", job_key=p.job.job_key, job_id=other)
                p.replaces = other
                again[i] = p
            else:
                replies[i] = ["EXISTS", other]
        if again:
            order = list(again.items())
            got = await self._redis.script_many([self._claim_call(p) for _, p in order])
            for (i, p), reply in zip(order, got, strict=True):
                if isinstance(reply, BaseException):
                    replies[i] = reply
                elif reply[0] == "CLAIMED":
                    p.hints, p.replaces = (str(reply[2]), str(reply[3])), ""
                else:  # claimed again meanwhile (never expected: one owner places a session's jobs)
                    replies[i] = ["EXISTS", str(reply[1])]


    def _claim_call(self, p: _Placing) -> lua.Call:
        job = p.job
        affinity = self._turn_node.get((job.session_id, job.turn_id), ("", 0))[0]
        return lua.session_claim(job.job_key, p.job_id, job.session_id, job.utterance_index, job.turn_id, job.turn_action,
                                 job.turn_jobs, epoch=job.epoch, affinity=affinity, replaces=p.replaces,
                                 claim_ttl_s=max(120, (job.deadline_ms - now_ms()) // 1000 + 180),
                                 tag=self._space.session_tag(job.session_id), journal_entry=job.journal_entry,
                                 now_ms=now_ms())

    async def _dispatch(self, src: str, tgt: str, dispatching: dict[int, _Placing], moves: dict[int, tuple[MoveJob, int]],
                        ctx: Context, replies: list[Any],
                        serving: list[int]) -> tuple[dict[int, _Placing], dict[int, tuple[MoveJob, int]]]:
        """shard_dispatch for each claimed job and shard_redispatch for each move, in batch
        order, in one pipeline; returns the jobs to claim again (another shard, or fresh
        candidates) and the moves to make again with fresh candidates."""
        order = sorted([*dispatching, *moves])
        calls = []
        for i in order:
            if i in moves:
                m, stale = moves[i]
                cand = await self._candidates(src, tgt, self._space.job_shard(m.job_id), stale > 0)
                calls.append(lua.shard_redispatch(m.job_id, m.old_node, m.expected_attempt, src, tgt, ctx.now_ms, ctx.lease_ms,
                                                  ctx.node_ttl_ms, m.rand, cand, near=ctx.placed_by,
                                                  locality_slack=ctx.locality_slack))
            else:
                p = dispatching[i]
                cand = await self._candidates(src, tgt, p.shard, p.stale > 0)
                job = p.job
                calls.append(lua.shard_dispatch(
                    job.job_key, p.job_id, job.session_id, job.utterance_index, src, tgt, job.turn_id, ctx.now_ms,
                    ctx.lease_ms, ctx.node_ttl_ms, job.rand, cand, preferred=p.hints[0], affinity=p.hints[1],
                    placed_by=ctx.placed_by, audio_b64=job.audio_b64, sample_rate=job.sample_rate,
                    deadline_ms=job.deadline_ms, locality_slack=ctx.locality_slack))
        got = await self._redis.script_many(calls) if calls else []
        again: dict[int, _Placing] = {}
        moves_again: dict[int, tuple[MoveJob, int]] = {}
        next_shard: dict[frozenset[int], int] = {}  # shards tried -> the next one (the same for all: in order)
        leaving: list[tuple[int, MoveJob]] = []
        for i, reply in zip(order, got, strict=True):
            if i not in moves:
                self._placed(src, tgt, i, dispatching[i], reply, replies, again, serving, next_shard)
            elif isinstance(reply, StaleCandidates) and moves[i][1] < STALE_RETRIES:
                moves_again[i] = (moves[i][0], moves[i][1] + 1)
            else:
                replies[i] = reply
                if isinstance(reply, REFUSALS):
                    self._free[(src, tgt, self._space.job_shard(moves[i][0].job_id))] = (0, trio.current_time())
                    leaving.append((i, moves[i][0]))
        crossed = self._moves.crossed()  # (a job moves across shards once per call: not back again)
        leaving = [(i, m) for i, m in leaving if m.job_id not in crossed]
        if leaving:
            await self._moves.relocate(src, tgt, leaving, replies, moves_again, serving, ctx)
        return again, moves_again

    def _placed(self, src: str, tgt: str, i: int, p: _Placing, reply: Any, replies: list[Any],
                again: dict[int, _Placing], serving: list[int], next_shard: dict[frozenset[int], int]) -> None:
        """One shard_dispatch reply: the item's reply, or the item back for another claim."""
        if isinstance(reply, StaleCandidates) and p.stale < STALE_RETRIES:
            p.stale += 1
            again[i] = p  # (claimed again as it is: a repeat, then dispatched with fresh candidates)
            return
        if isinstance(reply, REFUSALS):
            self._free[(src, tgt, p.shard)] = (0, trio.current_time())
            left = [k for k in serving if k not in p.tried]
            if not left:
                remember(self._refused, p.job.job_key, p.job_id)
                replies[i] = reply
                return
            tried = frozenset(p.tried)
            shard = next_shard.setdefault(tried, self._better_of_two(src, tgt, left, p.job.rand))
            self.on_event("moved")
            p.tried.add(shard)
            p.replaces, p.shard, p.job_id, p.stale = p.job_id, shard, self._space.job_id(shard, int(p.job.number)), 0
            again[i] = p
            return
        if isinstance(reply, BaseException):  # (Redis out, a lost reply, an id in use...): the claim stays; the next
            remember(self._refused, p.job.job_key, p.job_id)  # try takes it over (or repeats it: same number)
            replies[i] = reply
            return
        if reply[0] == "EXISTS" and reply[4] == "burned":  # the session's new owner gave this claim up
            replies[i] = Fenced(f"FENCED job {p.job_id} was burned by the session's new owner")
            return
        self._refused.pop(p.job.job_key, None)
        if reply[0] == "OK":
            self._free[(src, tgt, p.shard)] = (int(reply[5]) / max(1, int(reply[6])), trio.current_time())
            reply = reply[:5]
            if p.job.turn_action == "keep":
                remember(self._turn_node, (p.job.session_id, p.job.turn_id), (str(reply[2]), p.shard))
            elif p.job.turn_action == "end":
                self._turn_node.pop((p.job.session_id, p.job.turn_id), None)
        replies[i] = reply


def number_of(job_id: str) -> str:
    """The ``n`` of a layout-2 job id ``<shard>.<n>``."""
    return job_id.rpartition(".")[2]
