"""Moves across shards (key layout 2, docs/redis.md "Moves across shards").

A move stays in its job's shard while that shard has a free node for the pair
(store/placing.py). When the shard refuses it (the job is left waiting there) and another
shard serving the pair has a free node now (shard_free, asked), the job moves there under a
new id: it leaves its shard "moved" with the id it becomes (job_move_out), its job key's
claim follows (claim_move), it is created "waiting" under that id in the other shard
(job_move_in), and :class:`~scheduler.store.placing.ShardedPlacer` then moves it there as any
waiting job. Each step is idempotent; one cut short is taken up again at the next try, from
where it stopped. The caller learns the new id from :meth:`Relocator.relocated`; a release
of the old id follows ``moved_to`` (SchedulingClient.cancel).
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
from scheduler.store.items import Context, MoveJob
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import RedisAdapter, StaleCandidates, now_ms

log = logging.getLogger("scheduler.dispatcher")  # (placement's events are the dispatcher's)

KEPT = 10_000  # entries a bounded table keeps (oldest forgotten first)


def remember(table: OrderedDict, key: Any, value: Any) -> None:
    """Bounded: the oldest entry goes first (the placer's tables are hints, or moves under
    way that a lost placer would not finish anyway)."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > KEPT:
        table.popitem(last=False)


class Relocator:
    """The moves across shards of one placer (module docstring). ``free``: the placer's
    table of each shard's free share as last seen ((src, tgt, shard) -> (share, when)),
    updated with what shard_free says."""

    def __init__(self, redis: RedisAdapter, space: KeySpace,
                 candidates: Callable[[str, str, int, bool], Awaitable[lua.Candidates]],
                 numbers: Callable[[int], Awaitable[list[str]]], free: dict[tuple[str, str, int], tuple[float, float]],
                 on_event: Callable[[str], None]) -> None:
        self._redis = redis
        self._space = space
        self._candidates = candidates
        self._numbers = numbers  # fresh job numbers (the id sequence): a job moving across shards gets a new id
        self._free = free
        self._on_event = on_event
        self._relocating: OrderedDict[str, tuple[str, dict[str, str]]] = OrderedDict()  # old id -> (new id, its fields):
        # left its shard (job_move_out), not yet created in the other (claim_move, job_move_in); a retry goes on from here
        self._relocated: OrderedDict[str, str] = OrderedDict()  # old id -> new id, until the caller asks (relocated())

    def relocated(self, job_id: str) -> str | None:
        """The id a job moving from here took in another shard, if it moved since last asked
        (the caller's books follow it)."""
        return self._relocated.pop(job_id, None)

    def under_way(self, job_id: str) -> bool:
        """Whether a move of this job across shards stopped half way (the next try goes on)."""
        return job_id in self._relocating

    def crossed(self) -> set[str]:
        """Ids jobs took moving across shards that their caller has not asked about yet: they
        move no further in this call."""
        return set(self._relocated.values())

    def followed(self, m: MoveJob) -> MoveJob:
        """A move of a job that moved across shards since, as a move of the job it became."""
        new = self._relocated.get(m.job_id)
        return m if new is None else attrs.evolve(m, job_id=new)

    async def relocate(self, src: str, tgt: str, leaving: list[tuple[int, MoveJob]], replies: list[Any],
                        moves_again: dict[int, tuple[MoveJob, int]], serving: list[int], ctx: Context) -> None:
        """Moves their shard refused (``replies``), or that stopped half way across shards
        before: each job whose pair another shard serves with a free node now (shard_free)
        moves there (module docstring), and goes back into ``moves_again`` as a move of its
        new id (once per call: a job the caller has not yet asked about moves no further).
        A step that fails leaves the refusal (or the error) as the reply; the next try goes
        on from that step."""
        outs = [(i, m, self._relocating[m.job_id][0]) for i, m in leaving  # (a move_out whose reply was lost: again)
                if m.job_id in self._relocating and not self._relocating[m.job_id][1]]
        fresh = [(i, m) for i, m in leaving if m.job_id not in self._relocating]
        targets = await self._targets(src, tgt, [m for _, m in fresh], serving, ctx) if fresh else []
        fresh = [(i, m, k) for (i, m), k in zip(fresh, targets, strict=True) if k is not None]
        numbers = await self._numbers(len(fresh)) if fresh else []
        outs += [(i, m, self._space.job_id(k, int(n))) for (i, m, k), n in zip(fresh, numbers, strict=True)]
        got = await self._redis.script_many([lua.job_move_out(m.job_id, m.expected_attempt, new, now_ms(),
                                                              tag=self._space.job_tag(m.job_id)) for _, m, new in outs])
        for (i, m, new), reply in zip(outs, got, strict=True):
            if isinstance(reply, BaseException):  # (it may have gone through: repeated under the same new id)
                remember(self._relocating, m.job_id, (new, {}))
                replies[i] = reply
            elif reply[0] == "OK":
                remember(self._relocating, m.job_id, (new, dict(zip(reply[1::2], reply[2::2], strict=True))))
            else:
                self._relocating.pop(m.job_id, None)
                replies[i] = list(reply)  # (NOOP: answered, cancelled or moved meanwhile: nothing to move)
        going = [(i, m) for i, m in leaving if self._relocating.get(m.job_id, ('', {}))[1]]
        if going:
            await self._move_claims_and_jobs(going, replies, moves_again)

    async def _targets(self, src: str, tgt: str, moves: list[MoveJob], serving: list[int], ctx: Context) -> list[int | None]:
        """The shard each move its shard refused goes to: of the other shards serving the pair,
        the one whose eligible nodes have the largest free share of their slots now (asked,
        shard_free: a job moves only towards a free node, never back and forth between full
        shards; ties by the move's rand); None if none has a free slot."""
        shards = sorted({k for m in moves for k in serving if k != self._space.job_shard(m.job_id)})
        shares: dict[int, float] = {}
        for refresh in (False, True):  # (a node registered since the candidates were read: once more, fresh)
            ask = [k for k in shards if k not in shares]
            calls = [lua.shard_free(src, tgt, ctx.now_ms, ctx.node_ttl_ms, await self._candidates(src, tgt, k, refresh))
                     for k in ask]
            for k, reply in zip(ask, await self._redis.script_many(calls) if calls else [], strict=True):
                if not isinstance(reply, StaleCandidates):
                    shares[k] = int(reply[0]) / max(1, int(reply[1])) if not isinstance(reply, BaseException) else 0.0
                    self._free[(src, tgt, k)] = (shares[k], trio.current_time())
        out: list[int | None] = []
        for m in moves:
            old = self._space.job_shard(m.job_id)
            room = [k for k in shards if k != old and shares.get(k, 0.0) > 0]
            out.append(max(room, key=lambda k: (shares[k], (k + m.rand) % len(shards))) if room else None)
        return out

    async def _move_claims_and_jobs(self, going: list[tuple[int, MoveJob]], replies: list[Any],
                                    moves_again: dict[int, tuple[MoveJob, int]]) -> None:
        """The last two steps of moves across shards: the claims follow (claim_move), then the
        jobs are created waiting in their new shards (job_move_in)."""
        space = self._space
        calls = []
        for _, m in going:
            new, fields = self._relocating[m.job_id]
            claim_ttl_s = max(120, (int(fields.get("deadline_ms", 0)) - now_ms()) // 1000 + 180)
            calls.append(lua.claim_move(space.jobkey_key(m.session_id, fields["job_key"]), m.job_id, new, claim_ttl_s))
        got = await self._redis.script_many(calls)
        ins: list[tuple[int, MoveJob]] = []
        for (i, m), reply in zip(going, got, strict=True):
            if isinstance(reply, BaseException):
                replies[i] = reply
            elif reply[0] == "MOVED":
                ins.append((i, m))
            else:  # the key names another job now: it answers the key, this one has nothing left to move
                del self._relocating[m.job_id]
                replies[i] = ["NOOP", "cancelled", m.expected_attempt, "", "", 0]
        calls = []
        for _, m in ins:
            new, fields = self._relocating[m.job_id]
            calls.append(lua.job_move_in(new, fields["job_key"], m.job_id, fields, tag=space.job_tag(new)))
        got = await self._redis.script_many(calls) if calls else []
        for (i, m), reply in zip(ins, got, strict=True):
            new, fields = self._relocating[m.job_id]
            if isinstance(reply, BaseException):
                replies[i] = reply
                continue
            del self._relocating[m.job_id]
            if reply[0] == "EXISTS" and reply[1] == "burned":  # released meanwhile (its release followed moved_to)
                replies[i] = ["NOOP", "cancelled", m.expected_attempt, "", "", 0]
                continue
            remember(self._relocated, m.job_id, new)
            self._on_event("relocated")
            event(log, "job_relocated", job_key=fields["job_key"], job_id=m.job_id, to_job_id=new,
                  attempt=m.expected_attempt)
            replies[i] = None
            moves_again[i] = (attrs.evolve(m, job_id=new), 0)
