"""Ownership records in Redis: which instance is alive, and which holds each session and node.

docs/scaling.md, "What works". Liveness is per instance, not per session:

- ``scheduler:instance:{id}`` (JSON: ws_url, pid, started_ms, TTL ``owner_ttl_ms``) and the
  instance's score in ``{scheduler}:instances`` (when its liveness lapses, epoch ms): the
  only records :meth:`Ownership.run` refreshes, every third of ``owner_ttl_ms``: two
  commands per instance, whatever it holds, so an idle session costs Redis nothing;
- ``scheduler:owner:session:{session_id}`` and ``scheduler:owner:node:{node_id}``: the id
  of the instance holding the socket, written once when the socket arrives (the socket is
  here now, whoever held it before) and dropped when it leaves if it still names this
  instance; each is listed in the instance's ``scheduler:owned:{id}`` set.

An owner record is valid while its instance lives: :meth:`session_owner` and
:meth:`node_owner` name an instance only if its liveness has not lapsed. A killed instance's
records are therefore void within ``owner_ttl_ms``; any instance then collects them
(:meth:`collect_dead`, every ``COLLECT_EVERY_S``): its owner records are dropped, its nodes
marked offline (so ``dispatch_task`` never chooses them; before that, choose_node.lua skips
a node whose owner's liveness has lapsed) and it stays in ``{scheduler}:instances`` as a
tombstone, dead (store/liveness.py: the one rule every reader applies).

A session taken over (resumed on another instance) is told so by its new owner over the
relay (``cluster/routing.py``), and its journal writes are fenced anyway (journal.py).

Refresh failures (Redis down) are logged and retried on the next tick; the liveness then
lapses, which is what a reader should conclude of an instance it cannot see. But an outage
longer than ``owner_ttl_ms`` lapses every liveness, with nobody dead: so while Redis is out
and for one ``owner_ttl_ms`` after, a lapsed instance still counts as alive (:meth:`is_alive`,
and with it the owner records routing reads) and nobody is collected. The dispatcher's orphan
sweep and remote watch wait the same way (placement/dispatcher.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import trio

from scheduler.ops.logs import event
from scheduler.store import keys, liveness, lua, scheduling
from scheduler.store.redis_adapter import RedisAdapter, RedisUnavailable, now_ms
from scheduler.store.resilient import every

log = logging.getLogger("scheduler.ownership")

Held = tuple[list[str], list[tuple[str, bool, str]]]
"""What an instance holds: its session ids, and its nodes as (node id, draining, connection id)."""

COLLECT_EVERY_S = 5.0
"""How often an instance looks for dead instances' records to collect."""


class Ownership:
    def __init__(self, redis: RedisAdapter, instance_id: str, ttl_ms: int, *, ws_url: str = "",
                 grace_ms: int | None = None, stats: Callable[[], dict[str, int]] = dict,
                 held: Callable[[], Held] = lambda: ([], []), on_lapse: Callable[[], None] = lambda: None) -> None:
        self._redis = redis
        self._held = held  # what this instance holds now, re-claimed if its liveness lapsed (refresh)
        self._on_lapse = on_lapse
        self._refreshed = False
        self.instance_id = instance_id
        self.ttl_ms = ttl_ms
        self.grace_ms = ttl_ms if grace_ms is None else grace_ms  # after an outage: liveness lapsed by it still counts
        self.ws_url = ws_url
        self.stats = stats  # counts published with the liveness record (cluster/overview.py)
        self._started_ms = now_ms()

    # ------------------------------------------------------------ claims

    async def claim_session(self, session_id: str) -> str:
        """Record this instance as the session's owner; returns the previous owner if it is
        alive ('' if none)."""
        return await self._claim(keys.session_owner(session_id))

    async def claim_node(self, node_id: str) -> str:
        return await self._claim(keys.node_owner(node_id))

    async def release_session(self, session_id: str) -> None:
        await self._release(keys.session_owner(session_id))

    async def release_node(self, node_id: str) -> None:
        await self._release(keys.node_owner(node_id))

    async def session_owner(self, session_id: str) -> str | None:
        """The live instance holding the session now (None: nobody, e.g. its instance died)."""
        return await self._live_owner(keys.session_owner(session_id))

    async def node_owner(self, node_id: str) -> str | None:
        """The live instance holding the node's connection now (None: nobody)."""
        return await self._live_owner(keys.node_owner(node_id))

    async def is_alive(self, instance_id: str) -> bool:
        """False once the instance's liveness lapsed (store/liveness.py: the rule every reader
        applies; an instance not listed counts as alive, a collected one is listed dead). While
        Redis is out, and for one ``ttl_ms`` after, a lapsed instance counts as alive: its
        refreshes failed, it did not die (``OutageClock.recent``)."""
        return bool(await liveness.alive(self._redis, [instance_id], unsure=self._liveness_unsure()))

    async def _live_owner(self, owner_key: str) -> str | None:
        owner = await self._redis.command("GET", owner_key)
        return owner if owner and (owner == self.instance_id or await self.is_alive(owner)) else None

    async def _claim(self, key: str) -> str:
        previous = await self._redis.script(*lua.owner_claim(key, self.instance_id))
        await self._redis.command("SADD", keys.owned(self.instance_id), key)
        if previous and previous != self.instance_id and not await self.is_alive(previous):
            return ""
        return previous or ""

    async def _release(self, key: str) -> None:
        try:
            await self._redis.script(*lua.owner_release(key, self.instance_id))
            await self._redis.command("SREM", keys.owned(self.instance_id), key)
        except RedisUnavailable:
            pass  # void anyway once this instance is gone; collected then

    async def reassert(self, session_ids: list[str], node_ids: list[str]) -> None:
        """Redis lost its data: write the owner records of every session and node held here
        again (they are written once per connection, never refreshed)."""
        await self._write_owner_keys([keys.session_owner(s) for s in session_ids] + [keys.node_owner(n) for n in node_ids],
                                     only_free=False)

    # ------------------------------------------------------------ liveness

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh the liveness every ``ttl_ms / 3`` and collect dead instances' records every
        ``COLLECT_EVERY_S``, until cancelled; then drop this instance's records."""
        try:
            try:
                await self.drop_previous_life()
                await self.refresh()
            except RedisUnavailable as exc:  # (started during a Redis fault: refreshed on the next tick)
                event(log, "owner_refresh_failed", logging.WARNING, error=str(exc))
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: every(COLLECT_EVERY_S, self.collect_dead, name="owner_collect", log=log))
                await every(self.ttl_ms / 3000, self.refresh, name="owner_refresh", log=log)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self._redis.command("DEL", keys.instance(self.instance_id))
                    # dead from now on, not unlisted (liveness.py: unlisted counts as alive): jobs it
                    # leaves behind are orphans the others' sweep releases
                    await liveness.mark(self._redis, self.instance_id, liveness.tombstone(now_ms()))
                except RedisUnavailable:
                    pass

    async def refresh(self) -> None:
        """This instance is alive for another ``ttl_ms``: two commands (one more per shard in
        layout 2), whatever it holds.

        When the record was gone (its liveness lapsed: a stall longer than ``ttl_ms``, a
        refresh that failed; or Redis lost its data), another instance may have collected
        this one meanwhile: dropped its owner records and marked its nodes offline, though it
        still holds their sockets. It takes them back (:meth:`reclaim`), logged
        ``liveness_lapsed``."""
        info = json.dumps({"ws_url": self.ws_url, "pid": os.getpid(), "started_ms": self._started_ms, **self.stats()})
        previous = await self._redis.command("SET", keys.instance(self.instance_id), info, "PX", self.ttl_ms, "GET")
        await liveness.mark(self._redis, self.instance_id, now_ms() + self.ttl_ms)
        if previous is None and self._refreshed:
            sessions, nodes = self._held()
            event(log, "liveness_lapsed", logging.WARNING, sessions=len(sessions), nodes=len(nodes))
            await self.reclaim(sessions, nodes)
            self._on_lapse()
        self._refreshed = True

    async def reclaim(self, session_ids: list[str], nodes: list[tuple[str, bool, str]]) -> None:
        """After this instance's liveness lapsed: its owner records written again where nobody
        else wrote one meanwhile (a session resumed elsewhere stays there), and its nodes
        online again (with their drain) where it still owns them on the same connection
        (node_state checks both)."""
        await self._write_owner_keys([keys.session_owner(s) for s in session_ids] + [keys.node_owner(n) for n, _, _ in nodes],
                                     only_free=True)
        if nodes:
            await self._redis.script_many([lua.node_state(n, self.instance_id, online=True, draining=draining, conn_id=conn,
                                                          tag=self._redis.space.node_tag(n)) for n, draining, conn in nodes])

    async def _write_owner_keys(self, owner_keys: list[str], *, only_free: bool) -> None:
        """Name this instance in ``owner_keys`` (owner_claim: whoever held them), or with
        ``only_free`` only in those nobody holds, and list the written ones in its owned set;
        in groups of 64, so that no batch stalls other Redis calls for long."""
        for start in range(0, len(owner_keys), 64):
            chunk = owner_keys[start:start + 64]
            if only_free:
                written = await self._redis.commands_many([("SET", k, self.instance_id, "NX") for k in chunk],
                                                          raise_errors=True)
                chunk = [k for k, ok in zip(chunk, written, strict=True) if ok]
            else:
                await self._redis.script_many([lua.owner_claim(k, self.instance_id) for k in chunk])
            if chunk:
                await self._redis.command("SADD", keys.owned(self.instance_id), *chunk)

    async def collect_dead(self) -> int:
        """Drop the records of every instance whose liveness lapsed: its owner records (those
        that still name it), its nodes' online flag, its place in the instance list. Any
        instance may do it, any number of times. Returns how many instances were collected.

        Never this instance itself: a process that runs this is alive, even if a stall let its
        liveness lapse; its next refresh brings it back, with its records and nodes intact.
        Nor anyone while Redis is out or within ``ttl_ms`` after it came back (the adapter's
        outage clock): an outage longer than ``ttl_ms`` lets every instance's liveness lapse,
        because their refreshes failed, not because they died; each gets one ``ttl_ms`` to
        refresh it before it counts as dead."""
        if self._liveness_unsure():
            return 0
        lapsed = await self._redis.command("ZRANGEBYSCORE", keys.instances(), 0, now_ms() - 1)  # (not the tombstones)
        dead = [instance for instance in lapsed if instance != self.instance_id]
        for instance in dead:
            owned, nodes = await self._drop_records(instance)
            # listed as dead from now on (liveness.py): its orphaned jobs are still known as such
            await liveness.mark(self._redis, instance, liveness.tombstone(now_ms()), only_listed=True)
            event(log, "instance_collected", logging.WARNING, instance_id=instance, owned=owned, nodes=nodes)
        await liveness.drop_expired_tombstones(self._redis, now_ms())
        return len(dead)

    async def _drop_records(self, instance: str) -> tuple[int, int]:
        """Drop ``instance``'s owner records (those that still name it) and mark its nodes
        offline (those it still owns); returns how many of each."""
        owned = await self._redis.command("SMEMBERS", keys.owned(instance))
        node_prefix = keys.node_owner("")[:-2]  # "...:owner:node:" (the id follows in braces)
        nodes = [k[len(node_prefix):].strip("{}") for k in owned if k.startswith(node_prefix)]
        if owned:
            await self._redis.script_many([lua.owner_release(k, instance) for k in owned])
        known = await scheduling.learn_node_shards(self._redis, nodes)  # (layout 2: their shards)
        if known:
            await self._redis.script_many([lua.node_state(n, instance, online=False, draining=False,
                                                          tag=self._redis.space.node_tag(n)) for n in known])
        await self._redis.command("DEL", keys.owned(instance))
        return len(owned), len(nodes)

    async def drop_previous_life(self) -> None:
        """Before this process serves: what an earlier process under the same instance id left
        (killed and started again, as a supervisor restarts a worker) is void. Its nodes' sockets
        died with it, but they stay online under this id, and this id is alive again, so jobs
        would be placed on them. The records are dropped as a dead instance's are; logged
        ``previous_life_dropped`` when there were any."""
        owned, nodes = await self._drop_records(self.instance_id)
        if owned:
            event(log, "previous_life_dropped", logging.WARNING, instance_id=self.instance_id, owned=owned, nodes=nodes)

    def _liveness_unsure(self) -> bool:
        """Whether a lapsed instance may just not have refreshed its liveness yet: Redis is out,
        or came back less than ``grace_ms`` (one liveness TTL) ago (OutageClock.recent)."""
        return self._redis.outage.recent(trio.current_time(), self.grace_ms / 1000)

    async def alive_instances(self) -> dict[str, float]:
        """Instance id -> seconds until its liveness lapses, for the instances alive now."""
        now = now_ms()
        pairs = await self._redis.command("ZRANGEBYSCORE", keys.instances(), now, "+inf", "WITHSCORES")
        return {str(member): round((float(score) - now) / 1000, 3) for member, score in pairs}
