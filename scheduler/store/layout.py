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
from scheduler.store.redis_adapter import RedisAdapter

LAYOUT = "1"
"""1: every scheduling key under the one hash tag ``{scheduler}`` (docs/redis.md, "Keys")."""


async def check(redis: RedisAdapter, url: str) -> None:
    """Raise :class:`UnsafeRedis` when Redis holds scheduling state of another key layout.
    A Redis that refuses writes now (full, loading) is only read: the layout is written by
    the health check once it takes writes (``SchedulingClient.data_marker``)."""
    set_reply, found = await redis.commands_many([("SET", keys.layout(), LAYOUT, "NX"), ("GET", keys.layout())])
    if isinstance(found, BaseException):
        raise found
    if found is None and isinstance(set_reply, BaseException):
        return  # nothing recorded, and nothing can be now: written later
    _refuse_other(str(found), url)


def check_url(url: str) -> None:
    """:func:`check` with a short-lived synchronous client, for a ``--workers`` supervisor
    before it starts any worker (N workers exiting 2 in turn would be restarted forever).
    Redis out of reach now: nothing to say (the workers check again once they reach it)."""
    import redis as redis_py

    from scheduler.ops.redis_client import client as redis_client

    try:
        client = redis_client(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        try:
            client.set(keys.layout(), LAYOUT, nx=True)
            found = client.get(keys.layout())
        finally:
            client.close()
    except (redis_py.exceptions.RedisError, OSError):
        return
    _refuse_other(str(found), url)


def _refuse_other(found: str, url: str) -> None:
    if found != LAYOUT:
        raise UnsafeRedis(
            f"Redis at {redacted(url)} holds scheduling state in key layout {found}, and this daemon uses layout "
            f"{LAYOUT}: the two cannot share it. Run daemons of one version against it, or give this one another "
            f"Redis (or database); once no daemon of layout {found} runs, delete the key {keys.layout()} to let "
            f"this one start (the old layout's keys then expire with their TTLs)")
