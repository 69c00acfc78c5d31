"""The cluster at a glance: ``GET /cluster`` on the admin port, and ``scheduler status``.

Answered from Redis alone, so that every instance (and a ``--workers`` supervisor, which
asks one of its workers) gives the same answer:

- ``instances``: each instance alive (its liveness record, ownership.py), with the counts it
  publishes there every refresh (about every second): its sessions, the nodes connected to
  it, its jobs in flight and waiting, and its WebSocket URL;
- ``nodes``: every registered node (state, slots, load score, its instance);
- ``lang_pairs``: per language pair the nodes that serve it, how many of them can take a job
  now (online, not draining, not saturated), their free and total slots, and their mean load
  (busy slots over slots);
- ``balance``: the jobs held per online node, as mean, standard deviation and their ratio
  (``cv``: 0 is even; None while no job is held);
- ``totals``: the sums over the instances and nodes.

Nothing secret is shown: no token, key, audio or text.
"""

from __future__ import annotations

import json
import statistics
from typing import TYPE_CHECKING, Any

from scheduler.store import keys
from scheduler.store.redis_adapter import RedisAdapter
from scheduler.store.scheduling import SchedulingClient

if TYPE_CHECKING:
    from scheduler.cluster.ownership import Ownership

COUNTS = ("sessions", "nodes", "jobs_in_flight", "jobs_waiting")


async def overview(redis: RedisAdapter, ownership: Ownership, scheduling: SchedulingClient) -> dict[str, Any]:
    """The cluster as Redis knows it now. Raises ``RedisUnavailable`` when Redis cannot answer."""
    alive = await ownership.alive_instances()
    records = await redis.commands_many([("GET", keys.instance(i)) for i in sorted(alive)], raise_errors=True)
    instances = []
    for instance_id, record in zip(sorted(alive), records, strict=True):
        info = json.loads(record) if record else {}
        instances.append({"instance_id": instance_id, "ws_url": info.get("ws_url"),
                          **{name: info.get(name) for name in COUNTS}, "lapses_in_s": alive[instance_id]})
    nodes = await scheduling.nodes_status()
    return {
        "instances": instances,
        "nodes": [{k: n[k] for k in ("node_id", "online", "draining", "saturated", "load_score", "current_jobs",
                                     "max_jobs", "owner", "lang_pairs")} for n in nodes],
        "lang_pairs": lang_pairs(nodes),
        "balance": balance([n["current_jobs"] for n in nodes if n["online"]]),
        "totals": {**{name: sum(i[name] or 0 for i in instances) for name in COUNTS},
                   "instances": len(instances), "nodes_online": sum(n["online"] for n in nodes)},
    }


def lang_pairs(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for n in nodes:
        if not n["online"]:
            continue
        for src, tgt in n["lang_pairs"]:
            p = pairs.setdefault((src, tgt), {"src_lang": src, "tgt_lang": tgt, "nodes": 0, "eligible": 0,
                                              "free_slots": 0, "slots": 0, "busy": 0})
            p["nodes"] += 1
            p["slots"] += n["max_jobs"]
            p["busy"] += n["current_jobs"]
            if not (n["draining"] or n["saturated"]):
                p["eligible"] += 1
                p["free_slots"] += max(0, n["max_jobs"] - n["current_jobs"])
    out = []
    for _, p in sorted(pairs.items()):
        busy = p.pop("busy")
        out.append({**p, "load": round(busy / p["slots"], 3) if p["slots"] else None})
    return out


def balance(jobs: list[int]) -> dict[str, float | None]:
    """Jobs held per online node: mean, population standard deviation, and stddev / mean."""
    if not jobs:
        return {"mean": None, "stddev": None, "cv": None}
    mean = statistics.fmean(jobs)
    stddev = statistics.pstdev(jobs)
    return {"mean": round(mean, 3), "stddev": round(stddev, 3), "cv": round(stddev / mean, 3) if mean else None}
