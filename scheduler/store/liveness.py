"""Whether an instance is alive: one rule for every reader (issue: the remote watch asked
``EXISTS`` of the instance key while placement and routing read ``{scheduler}:instances``,
and the two disagreed right after Redis lost its data).

``{scheduler}:instances`` maps each instance id to when its liveness lapses (epoch ms),
pushed forward by every refresh (cluster/ownership.py). An instance is

- **alive** when its lapse is in the future, or when it is not listed at all: after Redis
  lost its data every instance is unlisted until its next refresh (within a third of the
  TTL), and choose_node.lua counts it alive for that;
- **dead** when its lapse is past. A dead instance stays listed once collected, or once it
  stopped cleanly, with the negated time of that as its score (a *tombstone*: ``collect_dead``,
  ``Ownership.run``), so that the jobs it
  placed are still known to be orphans (the orphan sweep) until the tombstone is dropped
  after :data:`TOMBSTONE_MS`; an instance that comes back under the same id refreshes its
  score and is alive again;
- but while Redis is out, and for one liveness TTL after (``unsure``: ``OutageClock.recent``),
  a lapsed instance counts as alive: its refreshes failed, it did not die.
"""

from __future__ import annotations

from collections.abc import Iterable

from scheduler.store import keys
from scheduler.store.redis_adapter import RedisAdapter, now_ms

TOMBSTONE_MS = 24 * 3600 * 1000
"""How long a collected instance stays listed as dead (longer than any job or lease lives)."""


def is_alive(lapses: float | str | None, now: float, unsure: bool) -> bool:
    """The rule, for one instance's score in ``{scheduler}:instances`` (None: not listed)."""
    return lapses is None or float(lapses) >= now or unsure


async def alive(redis: RedisAdapter, instance_ids: Iterable[str], *, unsure: bool) -> set[str]:
    """The ids among ``instance_ids`` that are alive (one ZMSCORE)."""
    ids = sorted(set(instance_ids))
    if not ids:
        return set()
    scores = await redis.command("ZMSCORE", keys.instances(), *ids)
    now = now_ms()
    return {i for i, score in zip(ids, scores, strict=True) if is_alive(score, now, unsure)}


async def mark(redis: RedisAdapter, instance_id: str, score: int, *, only_listed: bool = False) -> None:
    """List ``instance_id`` with ``score`` (its lapse time, or a :func:`tombstone`) in the
    instance list and, in layout 2, in every shard's copy (node choice reads the copy in its
    own slot: luascripts/lib/choose_node.lua). ``only_listed``: where it is listed already."""
    flags = ("XX",) if only_listed else ()
    await redis.commands_many([("ZADD", key, *flags, score, instance_id) for key in redis.space.all_instances()],
                              raise_errors=True)


async def drop_expired_tombstones(redis: RedisAdapter, now: int) -> None:
    await redis.commands_many([("ZREMRANGEBYSCORE", key, *expired_tombstones(now)) for key in redis.space.all_instances()],
                              raise_errors=True)


def tombstone(now: int) -> int:
    """The score a collected instance keeps: negative, so it is dead and never collected again."""
    return -now


def expired_tombstones(now: int) -> tuple[str, str]:
    """The ZREMRANGEBYSCORE range of tombstones older than :data:`TOMBSTONE_MS`."""
    return f"({tombstone(now - TOMBSTONE_MS)}", "(0"
