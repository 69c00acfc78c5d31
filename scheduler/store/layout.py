"""The key layout version Redis holds (``{scheduler}:layout``), so that daemons of two key
layouts never share scheduling state by accident: each would read the other's keys as
missing, place jobs twice and count slots wrong.

The first daemon to find the key missing writes its :data:`LAYOUT` (``SET NX``, at start-up,
and with every health check, so after Redis lost its data or refused writes too); a daemon that finds another one refuses to start (exit
status 2, with both versions and what to do). docs/redis.md, "Keys".
"""

from __future__ import annotations

from scheduler.ops.redis_policy import UnsafeRedis
from scheduler.ops.secrets import redacted
from scheduler.store import keys
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import RedisAdapter

LAYOUT = "1"
"""1: every scheduling key under the one hash tag ``{scheduler}`` (docs/redis.md, "Keys")."""


def layout_value(space: KeySpace) -> str:
    """What ``{scheduler}:layout`` holds for this key space: ``1``, or ``2:S`` for S shards
    (docs/redis.md, "Scheduling shards"; daemons sharing a Redis must agree on S too)."""
    return LAYOUT if space.shards == 1 else f"2:{space.shards}"


async def check(redis: RedisAdapter, url: str) -> None:
    """Raise :class:`UnsafeRedis` when Redis holds scheduling state of another key layout.
    A Redis that refuses writes now (full, loading) is only read: the layout is written by
    the health check once it takes writes (``SchedulingClient.data_marker``)."""
    wanted = layout_value(redis.space)
    set_reply, found = await redis.commands_many([("SET", keys.layout(), wanted, "NX"), ("GET", keys.layout())])
    if isinstance(found, BaseException):
        raise found
    if found is None and isinstance(set_reply, BaseException):
        return  # nothing recorded, and nothing can be now: written later
    _refuse_other(str(found), url, wanted)


def describe(redis: RedisAdapter) -> dict[str, object]:
    """What the start-up log says of the key layout (``key_layout``): its value, the shard
    count and how many shards each primary owns (from the cluster client's slot map)."""
    space = redis.space
    per_primary: dict[str, int] = {}
    for primary in redis.shard_primaries():
        per_primary[primary] = per_primary.get(primary, 0) + 1
    return {"layout": layout_value(space), "shards": space.shards, "shards_per_primary": per_primary}


def check_url(url: str, space: KeySpace | None = None) -> None:
    """:func:`check` with a short-lived synchronous client, for a ``--workers`` supervisor
    before it starts any worker (N workers exiting 2 in turn would be restarted forever).
    Redis out of reach now: nothing to say (the workers check again once they reach it)."""
    import redis as redis_py

    from scheduler.ops.redis_client import client as redis_client

    wanted = layout_value(space or KeySpace())
    try:
        client = redis_client(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        try:
            client.set(keys.layout(), wanted, nx=True)
            found = client.get(keys.layout())
        finally:
            client.close()
    except (redis_py.exceptions.RedisError, OSError):
        return
    _refuse_other(str(found), url, wanted)


def _refuse_other(found: str, url: str, wanted: str) -> None:
    if found != wanted:
        raise UnsafeRedis(
            f"Redis at {redacted(url)} holds scheduling state in key layout {found}, and this daemon uses layout "
            f"{wanted}: the two cannot share it. Run daemons of one version and one --redis-shards against it, "
            f"or give this one another "
            f"Redis (or database); once no daemon of layout {found} runs, delete the key {keys.layout()} to let "
            f"this one start (the old layout's keys then expire with their TTLs)")
