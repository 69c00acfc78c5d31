"""Ownership records in Redis: which instance is alive, and which holds each session and node.

docs/scaling.md, "What works": a session is owned by the instance holding its client
socket, a node by the instance holding its node socket, recorded in Redis with a TTL the
owner keeps refreshing. Here:

- ``scheduler:instance:{id}``: this instance is alive (JSON: ws_url, pid, started_ms), and
  ``{scheduler}:instances`` (id -> lapse time) lists the instances;
- ``scheduler:owner:session:{session_id}`` and ``scheduler:owner:node:{node_id}``: the
  owning instance id.

All of them live ``owner_ttl_ms`` past the last refresh; :meth:`Ownership.run` refreshes
them every third of that in one pipeline. A connection arriving here claims its owner key
outright (the socket is here now); a refresh only extends a key that still names this
instance, so an instance never fights one that took a session or node over: it logs
``owner_lost`` and stops refreshing it, and a session taken over is ended here
(``session_lost``: it was resumed elsewhere, journal.py). When a session ends or a node leaves, its key is
dropped if it is still ours. A killed instance's records lapse within ``owner_ttl_ms``.

Refresh failures (Redis down) are logged and retried on the next tick; the records then
lapse, which is what a reader should conclude of an instance it cannot see.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable

import trio

from scheduler.ops.logs import event
from scheduler.placement import keys, lua
from scheduler.placement.redis_adapter import RedisAdapter, RedisUnavailable, now_ms
from scheduler.placement.resilient import every

log = logging.getLogger("scheduler.ownership")

REFRESH_CHUNK = 32


class Ownership:
    def __init__(self, redis: RedisAdapter, instance_id: str, ttl_ms: int, *, ws_url: str = "",
                 sessions: Callable[[], Iterable[str]] = tuple, nodes: Callable[[], Iterable[str]] = tuple,
                 session_lost: Callable[[str], None] = lambda _: None) -> None:
        self._redis = redis
        self.instance_id = instance_id
        self.ttl_ms = ttl_ms
        self.ws_url = ws_url
        self._sessions = sessions  # ids of the sessions held here now
        self._nodes = nodes
        self._session_lost = session_lost  # called with a session id another instance took over
        self._lost: set[str] = set()  # owner keys another instance took over
        self._started_ms = now_ms()

    # ------------------------------------------------------------ claims

    async def claim_session(self, session_id: str) -> str:
        """Record this instance as the session's owner; returns the previous owner ('' if none)."""
        return await self._claim(keys.session_owner(session_id))

    async def claim_node(self, node_id: str) -> str:
        return await self._claim(keys.node_owner(node_id))

    async def release_session(self, session_id: str) -> None:
        await self._release(keys.session_owner(session_id))

    async def release_node(self, node_id: str) -> None:
        await self._release(keys.node_owner(node_id))

    async def session_owner(self, session_id: str) -> str | None:
        """The instance holding the session now (None: nobody, e.g. its instance died)."""
        return await self._redis.command("GET", keys.session_owner(session_id))

    async def node_owner(self, node_id: str) -> str | None:
        """The instance holding the node's connection now (None: nobody)."""
        return await self._redis.command("GET", keys.node_owner(node_id))

    async def _claim(self, key: str) -> str:
        self._lost.discard(key)
        reply = await self._redis.script(*lua.owner_claim(key, self.instance_id, self.ttl_ms, force=True))
        return str(reply[1])

    async def _release(self, key: str) -> None:
        self._lost.discard(key)
        try:
            await self._redis.script(*lua.owner_release(key, self.instance_id))
        except RedisUnavailable:
            pass  # the key lapses by itself

    # ------------------------------------------------------------ keeping them alive

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh every ``ttl_ms / 3`` until cancelled; then drop the liveness records."""
        try:
            await self.refresh()
            task_status.started()
            await every(self.ttl_ms / 3000, self.refresh, name="owner_refresh", log=log)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self._redis.command("DEL", keys.instance(self.instance_id))
                    await self._redis.command("ZREM", keys.instances(), self.instance_id)
                except RedisUnavailable:
                    pass

    async def refresh(self) -> None:
        """One pipeline: the liveness keys, then every owner key of what is held here."""
        sessions = {keys.session_owner(s): s for s in self._sessions()}
        owned = [k for k in [*sessions, *(keys.node_owner(n) for n in self._nodes())] if k not in self._lost]
        info = json.dumps({"ws_url": self.ws_url, "pid": os.getpid(), "started_ms": self._started_ms})
        await self._redis.command("SET", keys.instance(self.instance_id), info, "PX", self.ttl_ms)
        await self._redis.command("ZADD", keys.instances(), now_ms() + self.ttl_ms, self.instance_id)
        replies: list[object] = []
        for start in range(0, len(owned), REFRESH_CHUNK):  # small groups: no long stall of other Redis calls
            chunk = owned[start:start + REFRESH_CHUNK]
            replies += await self._redis.script_many([lua.owner_claim(k, self.instance_id, self.ttl_ms, force=False) for k in chunk])
        for key, reply in zip(owned, replies, strict=True):
            if isinstance(reply, RedisUnavailable):
                raise reply
            if isinstance(reply, BaseException):
                event(log, "owner_refresh_error", logging.ERROR, key=key, error=str(reply))
            elif reply[0] == "LOST":
                self._lost.add(key)
                event(log, "owner_lost", logging.WARNING, key=key, owner=reply[1])
                if key in sessions:  # resumed elsewhere: this instance's copy must stop
                    self._session_lost(sessions[key])

    async def alive_instances(self) -> dict[str, float]:
        """Instance id -> seconds until its liveness lapses, for the instances alive now."""
        now = now_ms()
        await self._redis.command("ZREMRANGEBYSCORE", keys.instances(), "-inf", now)
        pairs = await self._redis.command("ZRANGE", keys.instances(), 0, -1, "WITHSCORES")  # redis-py: [[member, score]]
        return {str(member): round((float(score) - now) / 1000, 3) for member, score in pairs}
