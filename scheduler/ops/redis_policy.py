"""A safe Redis or a loud refusal: the daemon's keys must never be evicted.

Under an evicting ``maxmemory-policy`` Redis deletes keys silently when it fills: session
journals, jobs, stored answers (results lost, sessions no longer resumable). ``volatile-*``
policies are no safer here, since every key of the daemon has a TTL. So ``serve`` (and the
``--workers`` supervisor, before it starts any worker) reads the policy of the server, or of
every primary of a cluster, from ``INFO memory`` (``CONFIG GET`` is often renamed away on
managed Redis) and exits 2 with one line saying why and how to fix it, unless
``--allow-evicting-redis`` (then it warns at every start). The embedded Valkey is started
with ``noeviction`` and ``maxmemory`` from ``embedded_maxmemory_mb``: full, it refuses writes
(``OOM``) instead of deleting keys.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from scheduler.ops.logs import event
from scheduler.ops.secrets import redacted

log = logging.getLogger("scheduler.redis")

EVICTION_SAFE = "noeviction"


class UnsafeRedis(Exception):
    """Redis would delete the daemon's keys when it fills; ``serve`` exits 2 with this text."""


def embedded_args(maxmemory_mb: int) -> list[str]:
    """valkey-server arguments: a memory bound, and never evict."""
    return ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", EVICTION_SAFE]


def memory_policies(info: Any) -> dict[str, str]:
    """``{server: policy}`` from an ``INFO memory`` reply (a dict; a dict of dicts from a
    cluster client, one per node)."""
    if isinstance(info, dict) and "maxmemory_policy" in info:
        return {"redis": str(info["maxmemory_policy"])}
    if isinstance(info, dict):
        return {str(node): str(v["maxmemory_policy"]) for node, v in info.items() if isinstance(v, dict) and "maxmemory_policy" in v}
    return {}


@attrs.frozen
class MemoryState:
    """What ``INFO memory`` says, for the health check: the fullest server's use and limit."""

    used: int  # used_memory, bytes
    limit: int  # maxmemory, bytes; 0 for none
    policies: dict[str, str]

    @property
    def ratio(self) -> float:
        return self.used / self.limit if self.limit else 0.0


def memory_state(info: Any) -> MemoryState:
    """:class:`MemoryState` from an ``INFO memory`` reply (one server, or one dict per node)."""
    servers = [info] if isinstance(info, dict) and "used_memory" in info else \
        [v for v in info.values() if isinstance(v, dict) and "used_memory" in v] if isinstance(info, dict) else []
    fullest = max(servers, key=lambda v: int(v["used_memory"]) / (int(v.get("maxmemory", 0)) or 2**63), default={})
    return MemoryState(int(fullest.get("used_memory", 0)), int(fullest.get("maxmemory", 0)), memory_policies(info))


def evicting(policies: dict[str, str]) -> dict[str, str]:
    """The servers among ``policies`` that would delete keys when full."""
    return {server: policy for server, policy in policies.items() if policy != EVICTION_SAFE}


def read_policies(url: str) -> dict[str, str]:
    """The policies read with a short-lived synchronous client ({} when Redis cannot be
    reached now: the workers check again once they reach it)."""
    import redis

    from scheduler.ops.redis_client import client as redis_client

    try:
        client = redis_client(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        try:
            return memory_policies(client.info("memory"))
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError):
        return {}


def describe(unsafe: dict[str, str]) -> str:
    return ", ".join(policy + (f" on {server}" if server != "redis" else "") for server, policy in sorted(unsafe.items()))


def check_policy(policies: dict[str, str], url: str, allow: bool) -> None:
    """Raise :class:`UnsafeRedis` when a server evicts (or, with ``allow``, warn)."""
    unsafe = evicting(policies)
    if not unsafe:
        return
    shown = describe(unsafe)
    if allow:
        event(log, "redis_evicting_policy", logging.WARNING, redis=redacted(url), policy=shown,
              detail="when Redis fills it will delete session, job and answer keys silently")
        return
    raise UnsafeRedis(f"Redis at {redacted(url)} has maxmemory-policy {shown}: when it fills it deletes session, job and "
                      f"answer keys silently (results lost, sessions not resumable). Set 'maxmemory-policy noeviction' on "
                      f"it (CONFIG SET, or redis.conf), or start with --allow-evicting-redis to run anyway")
