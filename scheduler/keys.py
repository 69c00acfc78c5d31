"""The Redis key schema. This is the only module that formats keys.

Names follow ``design.md`` word for word. The ``{...}`` part of a key is a Redis Cluster
hash tag: every key of one node shares the node's tag, every key of one session the
session's tag, so a script that touches one node or one session stays on one slot.
"""

from __future__ import annotations

PREFIX = "scheduler"

# Lifetime of keys that nothing else deletes (jobs, job keys, sessions, turns, node keys
# refreshed by heartbeats).
KEY_TTL_S = 3600

# How long a finished or cancelled job and its job key stay (late duplicates are still
# recognised), after which they are gone: memory does not grow with the number of jobs.
DONE_TTL_S = 120


def node_info(node_id: str) -> str:
    return f"{PREFIX}:node:info:{{{node_id}}}"


def node_runtime(node_id: str) -> str:
    return f"{PREFIX}:node:runtime:{{{node_id}}}"


def node_jobs(node_id: str) -> str:
    """Set of the job ids a node holds (status dispatched); its size is the node's slots in use."""
    return f"{PREFIX}:node:jobs:{{{node_id}}}"


def leases() -> str:
    """Sorted set: job id -> lease deadline (epoch ms) of every dispatched job."""
    return f"{PREFIX}:leases"


def nodes_all() -> str:
    """Set of every node id ever registered (for listing and expiry scans)."""
    return f"{PREFIX}:nodes"


def pool_members(pool: str) -> str:
    return f"{PREFIX}:pool:{{{pool}}}:members"


def lang_pools(src: str, tgt: str) -> str:
    """Hash: pool name -> "1" for every pool that serves ``src`` -> ``tgt``."""
    return f"{PREFIX}:lang:{{{src}}}:{{{tgt}}}"


def session(session_id: str) -> str:
    return f"{PREFIX}:session:{{{session_id}}}"


def turn(turn_id: str) -> str:
    return f"{PREFIX}:turn:{{{turn_id}}}"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{{{job_id}}}"


def jobkey(job_key: str) -> str:
    return f"{PREFIX}:jobkey:{{{job_key}}}"


def job_id_seq() -> str:
    return f"{PREFIX}:job:id_seq"


def job_key_for(session_id: str, utterance_index: int, tgt_lang: str) -> str:
    """``job_key = "{session_id}:{utterance_index}:{job_type}"`` (protocol.md)."""
    return f"{session_id}:{utterance_index}:{job_type_for(tgt_lang)}"


def job_type_for(tgt_lang: str) -> str:
    return f"translate:{tgt_lang}"
