"""The Redis key schema. This is the only module that formats keys.

Names follow the design's key schema (docs/redis.md, "Keys") with one change made for Redis
Cluster: the hash tag is the prefix, ``{scheduler}``, not the id. The design's
``scheduler:node:info:{node_id}`` is
``{scheduler}:node:info:n1`` here. Why: dispatch_task reads the load of every candidate node
and takes a slot on one of them in one atomic step, and it also touches the job, the job
key, the session, the turn and the leases. A tag per node or per session would put those on
different cluster slots, and a script can touch only one. With one tag, all scheduling state
is on one slot, and every script declares each key it touches in KEYS (see
``luascripts/lib/choose_node.lua`` for how candidates are declared). docs/redis.md explains
this choice and what it costs.
"""

from __future__ import annotations

PREFIX = "scheduler"
TAG = "{scheduler}"  # the Redis Cluster hash tag shared by every scheduling key

# Lifetime of keys that nothing else deletes (jobs, job keys, sessions, turns, node keys
# refreshed by heartbeats).
KEY_TTL_S = 3600

# How long a finished or cancelled job and its job key stay (late duplicates are still
# recognised), after which they are gone: memory does not grow with the number of jobs.
DONE_TTL_S = 120


def node_info(node_id: str) -> str:
    return f"{TAG}:node:info:{node_id}"


def node_runtime(node_id: str) -> str:
    return f"{TAG}:node:runtime:{node_id}"


def node_jobs(node_id: str) -> str:
    """Set of the job ids a node holds (status dispatched); its size is the node's slots in use."""
    return f"{TAG}:node:jobs:{node_id}"


def leases() -> str:
    """Sorted set: job id -> lease deadline (epoch ms) of every dispatched job."""
    return f"{TAG}:leases"


def nodes_all() -> str:
    """Set of every node id ever registered (for listing and expiry scans)."""
    return f"{TAG}:nodes"


def pool_members(pool: str) -> str:
    return f"{TAG}:pool:{pool}:members"


def lang_pools(src: str, tgt: str) -> str:
    """Hash: pool name -> "1" for every pool that serves ``src`` -> ``tgt``."""
    return f"{TAG}:lang:{src}:{tgt}"


def session(session_id: str) -> str:
    return f"{TAG}:session:{session_id}"


def turn(turn_id: str) -> str:
    return f"{TAG}:turn:{turn_id}"


def job(job_id: str) -> str:
    return f"{TAG}:job:{job_id}"


def jobkey(job_key: str) -> str:
    return f"{TAG}:jobkey:{job_key}"


def answer(job_key: str) -> str:
    """String: a job's accepted answer (JSON: translation, source_text), written by complete_task
    and kept until past the result deadline, so that whoever owns the session can take it."""
    return f"{TAG}:answer:{job_key}"


def data_marker() -> str:
    """String: a random id the first instance to see an empty Redis writes (SET NX). When it
    changes, Redis lost its data (restarted empty): instances write their journals again."""
    return f"{TAG}:data_marker"


def layout() -> str:
    """String: the key layout version of the scheduling state in this Redis (store/layout.py)."""
    return f"{TAG}:layout"


def job_id_seq() -> str:
    return f"{TAG}:job:id_seq"


# ---------------------------------------------------------------- ownership (several instances)
# Not touched by the scheduling scripts, so each carries its own id as hash tag and spreads
# over a cluster.


def instance(instance_id: str) -> str:
    """String (JSON: ws_url, pid, started_ms) with a TTL this instance keeps refreshing: it is alive."""
    return f"{PREFIX}:instance:{{{instance_id}}}"


def instances() -> str:
    """Sorted set: instance id -> when its liveness lapses (epoch ms); for listing."""
    return f"{TAG}:instances"


def session_owner(session_id: str) -> str:
    """String: the id of the instance holding the session's client socket (valid while it lives)."""
    return f"{PREFIX}:owner:session:{{{session_id}}}"


def node_owner(node_id: str) -> str:
    """String: the id of the instance holding the node's socket (valid while it lives)."""
    return f"{PREFIX}:owner:node:{{{node_id}}}"


def owned(instance_id: str) -> str:
    """Set: the owner keys an instance wrote (collected when it dies, ownership.py)."""
    return f"{PREFIX}:owned:{{{instance_id}}}"


# ---------------------------------------------------------------- relay between instances (relay.py)


def job_stream(instance_id: str) -> str:
    """Stream of jobs for the nodes an instance holds (consumer group ``relay``)."""
    return f"{PREFIX}:jobs:{{{instance_id}}}"


def answer_channel(instance_id: str) -> str:
    """Pub/Sub channel of answers for the sessions an instance holds."""
    return f"{PREFIX}:answers:{{{instance_id}}}"
