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

Layout 2 (docs/redis.md, "Scheduling shards") spreads these keys over several slots: every
function of a scheduling key takes the ``tag`` of its slot, and :class:`KeySpace` says which
tag a session, a node or a job has. The default tag is layout 1's ``{scheduler}``.
"""

from __future__ import annotations

import itertools
import uuid
from functools import cached_property

from scheduler.store import shards as shard_tags

PREFIX = "scheduler"
TAG = "{scheduler}"  # the Redis Cluster hash tag shared by every scheduling key

# Lifetime of keys that nothing else deletes (jobs, job keys, sessions, turns, node keys
# refreshed by heartbeats).
KEY_TTL_S = 3600

# How long a finished or cancelled job and its job key stay (late duplicates are still
# recognised), after which they are gone: memory does not grow with the number of jobs.
DONE_TTL_S = 120


class KeySpace:
    """Which hash tag each key carries: the slot a scheduling key lives on.

    Layout 1 (``shards`` = 1, the only one the daemon runs today) gives every scheduling key
    the one tag ``{scheduler}``. Layout 2 (docs/redis.md, "Scheduling shards") gives a
    session's own keys (session hash, turns, job-key claims) the session's tag
    ``{s:<session_id>}`` and a node's keys, pools, jobs, leases and answers the tag of one of
    ``shards`` placement shards (``scheduler/store/shards.py``); which shard a node is in, the
    node directory in Redis says (``luascripts/node_shard.lua``), and the key space remembers. With one shard both are
    ``{scheduler}``: layout 1, byte for byte.
    """

    def __init__(self, shards: int = 1) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        self.shards = shards
        self._node_shards: dict[str, int] = {}  # node id -> its shard, as the node directory said (layout 2)
        self._session_turn = itertools.count()  # the slot range of the next new session (layout 2)

    @cached_property
    def _shard_tags(self) -> tuple[str, ...]:
        if self.shards == 1:
            return (TAG,)
        return tuple("{" + t + "}" for t in shard_tags.shard_tags(self.shards))

    def shard_tag(self, k: int) -> str:
        """The hash tag (with braces) of placement shard ``k``."""
        return self._shard_tags[k]

    def node_shard(self, node_id: str) -> int:
        """The shard a node belongs to, as the node directory gave it (layout 2: the store
        learns it at registration, or reads it: :meth:`learn`); KeyError for a node not
        learnt yet (a caller bug: every path learns a node's shard before it uses it)."""
        return 0 if self.shards == 1 else self._node_shards[node_id]

    def learn(self, node_id: str, shard: int) -> None:
        """The node directory (``node_shard.lua``) put ``node_id`` in ``shard``."""
        if self.shards > 1:
            self._node_shards[node_id] = shard

    def knows(self, node_id: str) -> bool:
        return self.shards == 1 or node_id in self._node_shards

    def node_tag(self, node_id: str) -> str:
        return self.shard_tag(self.node_shard(node_id))

    def job_id(self, shard: int, n: int) -> str:
        """Job number ``n`` of shard ``shard``: ``"<n>"`` in layout 1, ``"<shard>.<n>"`` in
        layout 2, so that a job id names the shard its job lives in."""
        return str(n) if self.shards == 1 else f"{shard}.{n}"

    def job_shard(self, job_id: str) -> int:
        """The shard a job id names; ValueError for an id this key space did not make (a
        peer's word: the caller answers it as an unknown job)."""
        if self.shards == 1:
            return 0
        head, dot, tail = job_id.partition(".")
        if not (dot and head.isdigit() and tail.isdigit() and int(head) < self.shards):
            raise ValueError(f"not a job id of {self.shards} shards")
        return int(head)

    def job_tag(self, job_id: str) -> str:
        return self.shard_tag(self.job_shard(job_id))

    def new_session_id(self) -> str:
        """A new session's id: 128 random bits in hex. In layout 2 drawn again until its tag's
        slot lies in the next of ``shards`` equal slot ranges, round robin, so that the
        sessions of a daemon spread over the primaries as evenly as the shard tags do (about
        ``shards`` draws; the id keeps about 124 random bits, and the resume token, not the
        id, is the session's secret)."""
        if self.shards == 1:
            return uuid.uuid4().hex
        k = next(self._session_turn) % self.shards
        low, high = k * shard_tags.SLOTS // self.shards, (k + 1) * shard_tags.SLOTS // self.shards
        while True:
            session_id = uuid.uuid4().hex
            if low <= shard_tags.slot_of_tag("s:" + session_id) < high:
                return session_id

    def session_tag(self, session_id: str) -> str:
        """The hash tag of a session's own keys (session ids hold no braces: protocol.ID_PATTERN)."""
        return TAG if self.shards == 1 else "{s:" + session_id + "}"

    @property
    def shard_tags(self) -> tuple[str, ...]:
        return self._shard_tags

    # the keys whose tag follows from their own ids
    def session_key(self, session_id: str) -> str:
        return session(session_id, tag=self.session_tag(session_id))

    def jobkey_key(self, session_id: str, job_key: str) -> str:
        """The claim of a job key (in its session's slot)."""
        return jobkey(job_key, tag=self.session_tag(session_id))

    def job_key(self, job_id: str) -> str:
        """The hash of a job (in its shard); ValueError for an id of no shard (job_shard)."""
        return job(job_id, tag=self.job_tag(job_id))

    def node_info_key(self, node_id: str) -> str:
        return node_info(node_id, tag=self.node_tag(node_id))

    def all_leases(self) -> list[str]:
        """Every shard's leases set."""
        return [leases(tag=t) for t in self._shard_tags]

    def all_instances(self) -> list[str]:
        """Where an instance's liveness is written: the one list (``{scheduler}``) that
        instances read, and in layout 2 a copy in every shard, for node choice there."""
        return [instances()] + ([instances(tag=t) for t in self._shard_tags] if self.shards > 1 else [])

    def __repr__(self) -> str:
        return f"KeySpace(shards={self.shards})"


def session_of(job_key: str) -> str:
    """The session id a job key names (``<session_id>:<index>:<job type>``; a session id holds
    no colon: protocol.ID_PATTERN)."""
    return job_key.split(":", 1)[0]


def node_info(node_id: str, *, tag: str = TAG) -> str:
    return f"{tag}:node:info:{node_id}"


def nodes_runtime(*, tag: str = TAG) -> str:
    """The runtime table of a shard's nodes (one hash): per node, ``<node_id>:current_jobs``
    (:func:`runtime_field`) and ``<node_id>``, the packed copy of its info that node choice
    reads (:func:`scheduler.store.lua.runtime_copy`); ``#pools``, the pool tables' version
    (luascripts/register_node.lua, luascripts/lib/runtime_table.lua)."""
    return f"{tag}:nodes:runtime"


def runtime_field(node_id: str, field: str) -> str:
    """A node's field in its shard's runtime table (node ids hold no ':': protocol.ID_PATTERN)."""
    return f"{node_id}:{field}"


def node_jobs(node_id: str, *, tag: str = TAG) -> str:
    """Set of the job ids a node holds (status dispatched); its size is the node's slots in use."""
    return f"{tag}:node:jobs:{node_id}"


def leases(*, tag: str = TAG) -> str:
    """Sorted set: job id -> lease deadline (epoch ms) of every dispatched job."""
    return f"{tag}:leases"


def nodes_all(*, tag: str = TAG) -> str:
    """Set of every node id ever registered (for listing and expiry scans)."""
    return f"{tag}:nodes"


def pool_members(pool: str, *, tag: str = TAG) -> str:
    return f"{tag}:pool:{pool}:members"


def lang_pools(src: str, tgt: str, *, tag: str = TAG) -> str:
    """Hash: pool name -> "1" for every pool that serves ``src`` -> ``tgt``."""
    return f"{tag}:lang:{src}:{tgt}"


def session(session_id: str, *, tag: str = TAG) -> str:
    return f"{tag}:session:{session_id}"


def turn(turn_id: str, *, tag: str = TAG) -> str:
    return f"{tag}:turn:{turn_id}"


def job(job_id: str, *, tag: str = TAG) -> str:
    return f"{tag}:job:{job_id}"


def jobkey(job_key: str, *, tag: str = TAG) -> str:
    return f"{tag}:jobkey:{job_key}"


def data_marker(*, tag: str = TAG) -> str:
    """String: a random id the first instance to see an empty Redis writes (SET NX). When it
    changes, Redis lost its data (restarted empty): instances write their journals again."""
    return f"{tag}:data_marker"


def node_directory() -> str:
    """Hash (layout 2): node id -> the shard it belongs to (node_shard.lua)."""
    return f"{TAG}:node_shards"


def node_directory_counts() -> str:
    """Hash (layout 2): shard -> how many nodes the directory gave it."""
    return f"{TAG}:node_shard_counts"


def layout() -> str:
    """String: the key layout version of the scheduling state in this Redis (store/layout.py)."""
    return f"{TAG}:layout"


def job_id_seq(*, tag: str = TAG) -> str:
    return f"{tag}:job:id_seq"


# ---------------------------------------------------------------- ownership (several instances)
# Not touched by the scheduling scripts, so each carries its own id as hash tag and spreads
# over a cluster.


def instance(instance_id: str) -> str:
    """String (JSON: ws_url, pid, started_ms) with a TTL this instance keeps refreshing: it is alive."""
    return f"{PREFIX}:instance:{{{instance_id}}}"


def instances(*, tag: str = TAG) -> str:
    """Sorted set: instance id -> when its liveness lapses (epoch ms); for listing."""
    return f"{tag}:instances"


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
