"""One function per Lua script: builds its ``(name, KEYS, ARGV)`` in the order the script binds them.

Callers (dispatcher, node gateway, tests, benchmarks) never spell out a script's argument
list themselves; ``adapter.script(*lua.dispatch(...))`` runs it. Each script's contract is in
the header comment of ``luascripts/NAME.lua``.
"""

from __future__ import annotations

import json
from typing import Any

from . import keys

Call = tuple[str, list[str], list[Any]]


def register_node(node_id: str, pool_pairs: list[tuple[str, str, str]], max_jobs: int, now_ms: int, owner: str,
                  capabilities: dict[str, Any] | None = None) -> Call:
    return (
        "register_node",
        [keys.node_info(node_id), keys.node_runtime(node_id), keys.node_jobs(node_id), keys.nodes_all()]
        + [keys.pool_members(pool) for pool, _, _ in pool_pairs]
        + [keys.lang_pools(src, tgt) for _, src, tgt in pool_pairs],
        [node_id, json.dumps(capabilities or {}), max_jobs, now_ms, owner, len(pool_pairs)] + [p for p, _, _ in pool_pairs]
        + [keys.KEY_TTL_S],
    )


def heartbeat(node_id: str, now_ms: int, load: dict[str, Any] | None = None) -> Call:
    return "heartbeat", [keys.node_info(node_id), keys.node_runtime(node_id)], [now_ms, json.dumps(load or {}), keys.KEY_TTL_S]


def node_state(node_id: str, owner: str, *, online: bool, draining: bool) -> Call:
    return "node_state", [keys.node_info(node_id)], [owner, "1" if online else "0", "1" if draining else "0"]


def dispatch(job_key: str, session_id: str, utterance_index: int, src: str, tgt: str, turn_id: str, turn_action: str,
             now_ms: int, lease_ms: int, node_ttl_ms: int, rand: int, turn_jobs: int = 1) -> Call:
    return (
        "dispatch_task",
        [keys.jobkey(job_key), keys.job_id_seq(), keys.session(session_id), keys.turn(turn_id), keys.lang_pools(src, tgt),
         keys.leases()],
        [job_key, session_id, utterance_index, src, tgt, turn_id, turn_action, now_ms, lease_ms, node_ttl_ms,
         keys.KEY_TTL_S, rand, turn_jobs, keys.PREFIX],
    )


def redispatch(job_id: str, old_node: str, expected_attempt: int, session_id: str, turn_id: str, src: str, tgt: str,
               now_ms: int, lease_ms: int, node_ttl_ms: int, rand: int) -> Call:
    return (
        "redispatch_task",
        [keys.job(job_id), keys.node_runtime(old_node), keys.node_jobs(old_node), keys.leases(), keys.session(session_id),
         keys.turn(turn_id), keys.lang_pools(src, tgt)],
        [job_id, expected_attempt, now_ms, lease_ms, node_ttl_ms, rand, keys.PREFIX, old_node],
    )


def complete(job_id: str, node_id: str, attempt: int, ok: bool, now_ms: int, done_ttl_s: int = keys.DONE_TTL_S) -> Call:
    return (
        "complete_task",
        [keys.job(job_id), keys.node_runtime(node_id), keys.node_jobs(node_id), keys.leases()],
        [node_id, attempt, "finished" if ok else "failed", now_ms, job_id, done_ttl_s],
    )


def cancel(job_id: str, node_id: str, now_ms: int, done_ttl_s: int = keys.DONE_TTL_S) -> Call:
    return (
        "cancel_task",
        [keys.job(job_id), keys.node_runtime(node_id), keys.node_jobs(node_id), keys.leases()],
        [now_ms, job_id, done_ttl_s],
    )
