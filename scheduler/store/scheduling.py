"""The daemon's client of the Lua scheduling core: every scheduling verb the daemon says to
Redis, so that gateways and the server speak of nodes and jobs, never of keys and commands.

Node lifecycle: :meth:`register_node`, :meth:`heartbeats`, :meth:`node_state` (offline or
draining), :meth:`jobs_held`. Jobs: :meth:`complete` (a node's answer), :meth:`job_key_of`,
:meth:`serves` (is there a pool for a language pair), and placement (:meth:`run_many`,
:meth:`dispatch`, :meth:`redispatch`). Status: :meth:`nodes_status`.

What placement needs besides the scripts' arguments:

* Job ids come from ``{scheduler}:job:id_seq`` in blocks (one ``INCRBY`` per
  ``id_block`` jobs), so a job's id is known before dispatch_task runs and its hash is a
  declared key (Redis Cluster). The sequence starts at the wall clock in milliseconds
  times 1,000 (``SET NX`` in the same round trip), so when Redis lost its data the new
  sequence starts above every id handed out before (unless more than 1,000 jobs per
  millisecond were made since the old one started): a node still holding a job of the
  lost data set never meets a new job of the same id, and its late answer is refused
  (``UNKNOWN_JOB``), never taken for another job's. Should ids collide all the same,
  dispatch_task refuses with ``JOB_ID_TAKEN`` and the caller drops its block
  (:meth:`SchedulingClient.drop_job_ids`) and retries.
* Candidates (the pools of a language pair and their members) are cached per pair. The
  scripts check them: on ``STALE_CANDIDATES`` (a node registered since the last read) the
  cache is refreshed and the call repeated, up to ``STALE_RETRIES`` times.

Domain errors pass through as the adapter's typed exceptions.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from scheduler.protocol import Register
from scheduler.store import keys, lua, placing
from scheduler.store.layout import layout_value
from scheduler.store.redis_adapter import RedisAdapter, StaleCandidates, UnknownJob, now_ms

STALE_RETRIES = 3
SERVING_REFRESH_S = 2.0  # layout 2: how often the shards serving a language pair are read again
MOVED_HOPS = 16  # layout 2: moves across shards a release follows at most (each one a refused move of its own)
SERVING_RECHECK_S = 0.2  # ... and at most how often when every shard known to serve it refused a job


class SchedulingClient:
    def __init__(self, redis: RedisAdapter, *, id_block: int = 256) -> None:
        self._redis = redis
        self._space = redis.space
        self._id_block = id_block
        self._ids: deque[str] = deque()
        self._shard_candidates: dict[tuple[str, str, int], lua.Candidates] = {}  # (src, tgt, shard) -> as last read
        self._serving_read: dict[tuple[str, str], tuple[list[int], float]] = {}  # layout 2: pair -> (shards, when read)
        self._sharded = placing.ShardedPlacer(redis, self._space, self.shard_candidates, self.job_ids)
        self._order: list[int] | None = None  # layout 2: shards in the node directory's tie order
        self.candidate_refreshes = 0

    def _shard_order(self) -> list[int]:
        """Every shard, ordered so that consecutive ones are on different primaries (round
        robin over the primaries, from the cluster client's slot map): the node directory
        gives new nodes the emptiest shard, ties in this order."""
        if self._order is None:
            owners = self._redis.shard_primaries()
            by_primary: dict[str, list[int]] = {}
            for shard, owner in enumerate(owners):
                by_primary.setdefault(owner, []).append(shard)
            columns = list(by_primary.values())
            self._order = [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]
        return self._order

    def on_placement_event(self, count: Callable[[str], None]) -> None:
        """Layout 2: ``count("moved")`` when a claim moves to another shard, ``count("burned")``
        when a claim whose job never came is burned, ``count("relocated")`` when a job moves
        across shards (the metric)."""
        self._sharded.on_event = count

    def relocated(self, job_id: str) -> str | None:
        """Layout 2: the id a job that was moving took in another shard (a move across
        shards, placing.py), if it did since last asked; None otherwise."""
        return self._sharded.relocated(job_id) if self._space.shards > 1 else None

    async def job_ids(self, n: int) -> list[str]:
        """``n`` unused job ids (one round trip per ``id_block`` ids)."""
        while len(self._ids) < n:
            _, top = await self._redis.commands_many([("SET", keys.job_id_seq(), now_ms() * 1000, "NX"),
                                                      ("INCRBY", keys.job_id_seq(), self._id_block)], raise_errors=True)
            top = int(top)
            self._ids.extend(str(i) for i in range(top - self._id_block + 1, top + 1))
        return [self._ids.popleft() for _ in range(n)]

    def drop_job_ids(self) -> None:
        """Forget the ids taken so far: one turned out to be in use (Redis lost its data and
        the sequence started again), so the next ones come from a fresh INCRBY."""
        self._ids.clear()

    async def next_job_id(self) -> str:
        return (await self.job_ids(1))[0]

    async def candidates(self, src: str, tgt: str, *, refresh: bool = False) -> lua.Candidates:
        """The pools of a pair and their members (layout 1: its one shard), cached."""
        return await self.shard_candidates(src, tgt, 0, refresh)

    async def place_many(self, src: str, tgt: str, items: list[placing.Item], ctx: placing.Context) -> list[Any]:
        """Place these new jobs and moves of one language pair, oldest first: one reply per
        item, as layout 1's scripts reply, or the exception a refusal raised (placing.py)."""
        if self._space.shards == 1:
            return await self.run_many(src, tgt, [partial(placing.layout1_call, item, ctx) for item in items])
        serving = await self._serving(src, tgt)
        replies = await self._sharded.place(src, tgt, items, ctx, serving)
        if any(isinstance(r, placing.REFUSALS) for r in replies):  # every shard we knew of refused: a shard that
            fresh = await self._serving(src, tgt, max_age=SERVING_RECHECK_S)  # gained its first node for the pair may not
            if set(fresh) - set(serving):
                again = [i for i, r in enumerate(replies) if isinstance(r, placing.REFUSALS)]
                for i, reply in zip(again, await self._sharded.place(src, tgt, [items[i] for i in again], ctx, fresh),
                                    strict=True):
                    replies[i] = reply
        return replies

    async def _serving(self, src: str, tgt: str, *, max_age: float = SERVING_REFRESH_S) -> list[int]:
        """The shards with a pool of the pair, as read at most ``max_age`` seconds ago (a
        blocked lane retries often: it reads them again at most every ``SERVING_RECHECK_S``)."""
        pair = (src, tgt)
        seen = self._serving_read.get(pair)
        if seen is None or trio.current_time() - seen[1] >= max_age:
            found = [k for k in range(self._space.shards) if (await self.shard_candidates(src, tgt, k, True)).pools]
            seen = self._serving_read[pair] = (found, trio.current_time())
        return seen[0]

    async def shard_candidates(self, src: str, tgt: str, shard: int, refresh: bool = False) -> lua.Candidates:
        """The pools of a pair in one shard and their members, cached (layout 1 has shard 0 only)."""
        entry = (src, tgt, shard)
        if refresh or entry not in self._shard_candidates:
            self.candidate_refreshes += 1
            tag = self._space.shard_tag(shard)
            version, pools = await self._redis.commands_many(  # the version first: it stands for what is read after it
                [lua.pools_version_read(tag), ("HKEYS", keys.lang_pools(src, tgt, tag=tag))], raise_errors=True)
            listed = await self._redis.commands_many([("SMEMBERS", keys.pool_members(p, tag=tag)) for p in pools],
                                                     raise_errors=True)
            self._shard_candidates[entry] = lua.candidates_from(version, list(pools), list(listed), tag)
        return self._shard_candidates[entry]

    async def run_many(self, src: str, tgt: str, builders: list[Callable[[lua.Candidates], lua.Call]]) -> list[Any]:
        """dispatch_task / redispatch_task calls of one language pair, in this order, in one
        pipeline (so Redis places them in this order: FIFO per pool). Each builder makes its
        call from the candidates; calls refused with STALE_CANDIDATES are rebuilt with fresh
        candidates and run again, in order. Returns each reply or the exception it raised."""
        candidates = await self.candidates(src, tgt)
        results = await self._redis.script_many([build(candidates) for build in builders])
        for _ in range(STALE_RETRIES):
            stale = [i for i, r in enumerate(results) if isinstance(r, StaleCandidates)]
            if not stale:
                break
            candidates = await self.candidates(src, tgt, refresh=True)
            again = await self._redis.script_many([builders[i](candidates) for i in stale])
            for i, reply in zip(stale, again, strict=True):
                results[i] = reply
        return results

    # ------------------------------------------------------------ nodes

    async def register_node(self, reg: Register, instance_id: str, conn_id: str) -> None:
        """The node is online, held by ``instance_id`` over connection ``conn_id`` (a new
        connection empties the job set of the one before), in the pools it serves now and in
        no other (register_node.lua: the pools it served before are read first)."""
        space = self._space
        if space.shards > 1:  # layout 2: its shard, from the node directory
            known = space.node_shard(reg.node_id) if space.knows(reg.node_id) else None
            space.learn(reg.node_id, int(await self._redis.script(*lua.node_shard(reg.node_id, self._shard_order(), known))))
        for attempt in range(STALE_RETRIES + 1):
            old = await self._redis.command("HGET", self._space.node_info_key(reg.node_id), "pools")
            try:
                await self._redis.script(*lua.register_node(reg.node_id, reg.pool_pairs(), reg.max_jobs, now_ms(), instance_id,
                                                            reg.capabilities, conn_id, json.loads(old) if old else [],
                                                            tag=self._space.node_tag(reg.node_id)))
                for src, tgt in reg.lang_pairs:  # (layout 2: its shard may serve a pair for the first time: a lane
                    self._serving_read.pop((src, tgt), None)  # blocked on it reads the shards serving it again now)
                return
            except StaleCandidates:
                if attempt == STALE_RETRIES:
                    raise

    async def heartbeats(self, beats: list[lua.Beat]) -> list[Any]:
        """Several nodes' heartbeats: one heartbeats.lua call per node shard, all in one
        pipeline. Per beat, in order: "OK", "STALE_CONN" (not the node's connection in Redis: it
        reconnected since, or this one was closed; nothing written), "UNKNOWN_NODE" (Redis lost
        the node: register it again), or the exception its shard's call raised. A ``saturated``
        node gets no new jobs from any instance (choose_node.lua); a ``draining`` one says so
        again, in case its drain never reached Redis (luascripts/heartbeats.lua)."""
        by_tag: dict[str, list[int]] = {}
        for i, beat in enumerate(beats):
            by_tag.setdefault(self._space.node_tag(beat.node_id), []).append(i)
        tags = list(by_tag)
        replies = await self._redis.script_many([lua.heartbeats([beats[i] for i in by_tag[t]], now_ms(), tag=t) for t in tags])
        out: list[Any] = [None] * len(beats)
        for tag, reply in zip(tags, replies, strict=True):
            for i, one in zip(by_tag[tag], reply if isinstance(reply, list) else [reply] * len(by_tag[tag]), strict=True):
                out[i] = one if isinstance(one, BaseException) else str(one[0])
        return out

    async def node_state(self, node_ids: list[str], instance_id: str, *, online: bool, draining: bool, conn_id: str = "") -> None:
        """Mark nodes held by ``instance_id`` offline, or draining (no new jobs from any instance);
        with ``conn_id``, only while the node is still on that connection."""
        if node_ids:
            await self._redis.script_many([lua.node_state(n, instance_id, online=online, draining=draining, conn_id=conn_id,
                                                          tag=self._space.node_tag(n)) for n in node_ids])

    async def jobs_held(self, node_ids: list[str]) -> int:
        """How many jobs these nodes hold in all (a node whose count cannot be read counts 0)."""
        held = await self._redis.commands_many([("SCARD", keys.node_jobs(n, tag=self._space.node_tag(n))) for n in node_ids])
        return sum(n for n in held if not isinstance(n, BaseException))

    async def nodes_status(self) -> list[dict[str, Any]]:
        """Every registered node (any instance): id, state, capacity, load, owner, capabilities,
        language pairs; two round trips, however many nodes."""
        space = self._space
        listed = await self._redis.commands_many([("SMEMBERS", keys.nodes_all(tag=t)) for t in space.shard_tags],
                                                 raise_errors=True)
        for shard, members in enumerate(listed):
            for n in members:
                if not space.knows(n):
                    space.learn(n, shard)
        node_ids = sorted({n for members in listed for n in members})
        replies = await self._redis.commands_many(
            [c for n in node_ids for c in (("HGETALL", space.node_info_key(n)),
                                           ("HGET", keys.nodes_runtime(tag=space.node_tag(n)),
                                                   keys.runtime_field(n, "current_jobs")))],
            raise_errors=True)
        nodes = []
        for node_id, info, current in zip(node_ids, replies[::2], replies[1::2], strict=True):
            if not info:
                continue
            nodes.append({
                "node_id": node_id, "online": info.get("online") == "1", "draining": info.get("draining") == "1",
                "max_jobs": int(info.get("max_jobs", 0)), "current_jobs": int(current or 0),
                "last_heartbeat_ts": int(info.get("last_heartbeat_ts", 0)), "owner": info.get("owner"),
                "load": json.loads(info.get("load_json") or "{}"),
                "load_score": float(info["load_score"]) if info.get("load_score") else None,
                "lang_pairs": json.loads(info.get("lang_pairs") or "[]"),
                "saturated": info.get("saturated") == "1",
                "capabilities": json.loads(info.get("cap_json") or "{}"),
            })
        return nodes

    async def data_marker(self, mark: str) -> str:
        """Set the data marker to ``mark`` unless one is set; return the one set. A different
        one than last time means Redis restarted without its data. The key layout is written
        too, unless recorded (store/layout.py: after data loss, or a start on a full Redis).
        Layout 2 keeps a marker in every shard too (so on every primary of a cluster whose
        primaries each own a shard: docs/redis.md) and returns them joined: any primary that
        restarted empty changes it."""
        markers = [keys.data_marker()] + ([keys.data_marker(tag=t) for t in self._space.shard_tags]
                                          if self._space.shards > 1 else [])
        replies = await self._redis.commands_many([*(("SET", m, mark, "NX") for m in markers), *(("GET", m) for m in markers),
                                                   ("SET", keys.layout(), layout_value(self._space), "NX")])
        seen = replies[len(markers):2 * len(markers)]
        for reply in seen:
            if isinstance(reply, BaseException):
                raise reply
        return "|".join(seen)

    # ------------------------------------------------------------ jobs

    async def serves(self, src: str, tgt: str) -> bool:
        """Does any pool serve this language pair (a node registered it, ever, in any shard)?"""
        found = await self._redis.commands_many([("EXISTS", keys.lang_pools(src, tgt, tag=t)) for t in self._space.shard_tags],
                                                raise_errors=True)
        return any(found)

    async def job_key_of(self, job_id: str) -> str | None:
        """The job key of a job (None if unknown, or an id that names no shard: a peer's word)."""
        try:
            key = self._space.job_key(job_id)
        except ValueError:
            return None
        return await self._redis.command("HGET", key, "job_key")

    async def complete(self, job_id: str, job_key: str, node_id: str, attempt: int, ok: bool, *, answer: str,
                       answer_ttl_s: int, again: bool = False) -> Any:
        """complete_task: accept the answer of the node holding the current attempt, once,
        and keep it for ``answer_ttl_s``; refusals raise the adapter's typed errors. ``again``:
        a repeat of a call whose outcome was not known (its reply, if it went through)."""
        try:
            tag = self._space.job_tag(job_id)
        except ValueError:  # (a node's word: an id of no shard is a job nobody made)
            raise UnknownJob(f"UNKNOWN_JOB no such job {job_id[:64]}") from None
        return await self._redis.script(*lua.complete(job_id, job_key, node_id, attempt, ok, now_ms(), answer=answer,
                                                      answer_ttl_s=answer_ttl_s, again=again, tag=tag,
                                                      claim=self._space.shards == 1))

    async def cancel(self, job_id: str, job_key: str, node_id: str) -> Any:
        """cancel_task in the job's shard; with ``node_id`` '' (not known: a dispatch whose
        reply was lost), the node is read from the job first, and None is returned when there
        is no such job (that dispatch never went through). In layout 2 such a job is named by
        its number (the shard was chosen in the lost call): its claim says which job it is."""
        if self._space.shards > 1 and "." not in job_id:  # layout 2: the number of a job whose claim says where it went
            claimed = await self._redis.command("GET", self._space.jobkey_key(keys.session_of(job_key), job_key))
            if not claimed or placing.number_of(claimed) != job_id:
                return None  # its claim never went through (or is another job's)
            job_id = claimed
        tag = self._space.job_tag(job_id)
        if not node_id:
            node_id = await self._redis.command("HGET", keys.job(job_id, tag=tag), "node_id")
            if node_id is None:
                return None
        reply = await self._redis.script(*lua.cancel(job_id, job_key, node_id, now_ms(), tag=tag,
                                                     claim=self._space.shards == 1))
        for _ in range(MOVED_HOPS if self._space.shards > 1 else 0):
            if reply[0] == "NOOP" and reply[1] == "moved" and len(reply) > 2 and reply[2]:
                job_id = str(reply[2])  # it moved across shards (job_move_out): the job it became is released
            elif reply[0] != "NOOP" or reply[1] != "":
                break  # (an unknown id is burned: a creation on its way, a move's or a late placer's, makes nothing)
            reply = await self._cancel_or_burn(job_key, job_id)
            if reply[0] == "NOOP" and reply[1] == "burned":
                break
        return reply

    async def _cancel_or_burn(self, job_key: str, job_id: str) -> Any:
        """Layout 2: a job a release followed across shards (``moved_to``), or that did not
        exist: its id is burned if it still does not (its creation, on its way, then makes
        nothing: job_move_in, shard_dispatch), and ``NOOP burned`` replied; else it is cancelled
        as it is (and may have moved on: its reply says so)."""
        tag = self._space.job_tag(job_id)
        burned = await self._redis.script(*lua.job_burn(job_key, job_id, now_ms(), tag=tag))
        if burned[0] == "BURNED":
            return ["NOOP", "burned"]
        return await self._redis.script(*lua.cancel(job_id, job_key, str(burned[2]), now_ms(), tag=tag, claim=False))

    # ------------------------------------------------------------ recovery's reads and writes (placement/recovery.py)

    async def claimed_jobs(self, session_id: str, job_keys: list[str]) -> list[tuple[str, str, dict[str, str]]]:
        """(job key, job id, job hash) of each of ``job_keys`` whose job Redis holds (two
        pipelined round trips: the claims, then the jobs in their shards)."""
        space = self._space
        ids = await self._redis.commands_many([("GET", space.jobkey_key(session_id, k)) for k in job_keys])
        found = [(k, str(job_id)) for k, job_id in zip(job_keys, ids, strict=True)
                 if job_id and not isinstance(job_id, BaseException)]
        jobs = await self._redis.commands_many([("HGETALL", space.job_key(job_id)) for _, job_id in found])
        return [(k, job_id, job) for (k, job_id), job in zip(found, jobs, strict=True)
                if job and not isinstance(job, BaseException)]

    async def set_placed_by(self, job_ids: list[str], instance_id: str) -> None:
        await self._redis.commands_many([("HSET", self._space.job_key(j), "placed_by", instance_id) for j in job_ids])

    async def watch(self, job_ids: list[str], nodes: list[tuple[str, str]]) -> tuple[list[list], list[list]]:
        """One pipelined round trip: (status, attempt) of each job, (online, owner, conn_id)
        of each node, named with a job it holds: ``(node id, job id)`` (a job lives in its
        node's shard)."""
        space = self._space
        replies = await self._redis.commands_many(
            [("HMGET", space.job_key(j), "status", "attempt") for j in job_ids]
            + [("HMGET", keys.node_info(n, tag=space.job_tag(j)), "online", "owner", "conn_id") for n, j in nodes],
            raise_errors=True)
        return replies[:len(job_ids)], replies[len(job_ids):]

    async def jobs_exist(self, job_ids: list[str]) -> list[Any]:
        """EXISTS of each job's hash (1, 0, or the exception its read raised)."""
        return await self._redis.commands_many([("EXISTS", self._space.job_key(j)) for j in job_ids])

    async def expired_leases(self, before_ms: int, limit: int) -> list[str]:
        """Ids of jobs whose lease ran out before ``before_ms``, up to ``limit`` per shard."""
        found = await self._redis.commands_many([("ZRANGEBYSCORE", key, "-inf", before_ms, "LIMIT", 0, limit)
                                                 for key in self._space.all_leases()], raise_errors=True)
        return [str(job_id) for ids in found for job_id in ids]

    async def orphan(self, job_id: str) -> list[str | None]:
        """job_key, session_id, node_id, attempt and placed_by of a job (each None if gone)."""
        return await self._redis.command("HMGET", self._space.job_key(job_id), "job_key", "session_id", "node_id", "attempt",
                                         "placed_by")

    async def drop_lease(self, job_id: str) -> None:
        await self._redis.command("ZREM", keys.leases(tag=self._space.job_tag(job_id)), job_id)

    # ------------------------------------------------------------ placement

    async def dispatch(self, job_key: str, session_id: str, utterance_index: int, src: str, tgt: str, turn_id: str,
                       turn_action: str, now_ms: int, lease_ms: int, node_ttl_ms: int, rand: int, turn_jobs: int = 1) -> Any:
        """One dispatch_task with a fresh job id; reply as the script's (errors raised)."""
        job_id = await self.next_job_id()
        return _raised(await self.run_many(src, tgt, [lambda c: lua.dispatch(
            job_key, job_id, session_id, utterance_index, src, tgt, turn_id, turn_action, now_ms, lease_ms, node_ttl_ms,
            rand, c, turn_jobs)]))

    async def redispatch(self, job_id: str, old_node: str, expected_attempt: int, session_id: str, turn_id: str, src: str,
                         tgt: str, now_ms: int, lease_ms: int, node_ttl_ms: int, rand: int) -> Any:
        return _raised(await self.run_many(src, tgt, [lambda c: lua.redispatch(
            job_id, old_node, expected_attempt, session_id, turn_id, src, tgt, now_ms, lease_ms, node_ttl_ms, rand, c)]))


async def stored_answers(redis: RedisAdapter, wanted: list[tuple[str, list[str]]]) -> list[list[str | None] | BaseException]:
    """The answers complete_task keeps for these (session id, job keys), per session: the
    answer's text or None, or the exception its read raised. The job keys' claims first (one
    MGET per session, in its slot), then each claimed job's answer (its hash's ``answer``, in
    the job's shard): two round trips, whatever the layout."""
    space = redis.space
    claims = await redis.commands_many([("MGET", *(space.jobkey_key(s, k) for k in job_keys)) for s, job_keys in wanted])
    reads: list[tuple[int, int, str]] = []  # (session's place, job key's place, job hash)
    for i, claimed in enumerate(claims):
        if isinstance(claimed, BaseException):
            continue
        for j, job_id in enumerate(claimed):
            if job_id:
                reads.append((i, j, space.job_key(job_id)))
    texts = await redis.commands_many([("HGET", key, "answer") for _, _, key in reads])
    out: list[list[str | None] | BaseException] = [c if isinstance(c, BaseException) else [None] * len(c) for c in claims]
    for (i, j, _), text in zip(reads, texts, strict=True):
        row = out[i]
        if isinstance(text, BaseException):
            out[i] = text
        elif not isinstance(row, BaseException):
            row[j] = text
    return out


async def learn_node_shards(redis: RedisAdapter, node_ids: list[str]) -> list[str]:
    """Layout 2: learn the shards of these nodes from the node directory (one HMGET for those
    not known yet); returns the ones whose shard is known (a node the directory does not
    hold has no state in any shard)."""
    space = redis.space
    unknown = [n for n in node_ids if not space.knows(n)]
    if unknown:
        for node_id, shard in zip(unknown, await redis.command("HMGET", keys.node_directory(), *unknown), strict=True):
            if shard is not None:
                space.learn(node_id, int(shard))
    return [n for n in node_ids if space.knows(n)]


def _raised(results: list[Any]) -> Any:
    (reply,) = results
    if isinstance(reply, BaseException):
        raise reply
    return reply
