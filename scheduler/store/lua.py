"""One function per Lua script: builds its ``(name, KEYS, ARGV)`` in the order the script binds them.

Callers (dispatcher, node gateway, tests, benchmarks) never spell out a script's argument
list themselves; ``adapter.script(*lua.dispatch(...))`` runs it. Each script's contract is in
the header comment of ``luascripts/NAME.lua``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from scheduler.store import keys

Call = tuple[str, list[str], list[Any]]


def register_node(node_id: str, pool_pairs: list[tuple[str, str, str]], max_jobs: int, now_ms: int, owner: str,
                  capabilities: dict[str, Any] | None = None, conn_id: str = "", old_pools: list[str] | tuple = (), *,
                  tag: str = keys.TAG) -> Call:
    """``conn_id``: the id of the node's connection (dispatch_task returns it with each placement).
    ``old_pools``: the pools its info hash named when read (``'pools'``): the ones it no longer
    serves, it leaves. ``tag``: the node's shard (KeySpace.node_tag)."""
    t = tag
    return (
        "register_node",
        [keys.node_info(node_id, tag=t), keys.nodes_runtime(tag=t), keys.node_jobs(node_id, tag=t),
         keys.nodes_all(tag=t)]
        + [keys.pool_members(pool, tag=t) for pool, _, _ in pool_pairs]
        + [keys.lang_pools(src, tgt, tag=t) for _, src, tgt in pool_pairs]
        + [keys.pool_members(pool, tag=t) for pool in old_pools],
        [node_id, json.dumps(capabilities or {}), max_jobs, now_ms, owner, len(pool_pairs)] + [p for p, _, _ in pool_pairs]
        + [keys.KEY_TTL_S, conn_id, len(old_pools), *old_pools,
           json.dumps(sorted({(src, tgt) for _, src, tgt in pool_pairs}))],
    )


@attrs.frozen
class Beat:
    """One node's heartbeat, as :func:`heartbeats` batches them."""

    node_id: str
    load: dict[str, Any] | None = None
    load_score: float | None = None
    saturated: bool = False
    draining: bool = False
    conn_id: str = ""


def heartbeats(beats: list[Beat], now_ms: int, *, tag: str = keys.TAG) -> Call:
    """The heartbeats of several nodes of one shard (``tag``) in one call
    (luascripts/heartbeats.lua): one reply per node, in order."""
    keys_: list[str] = [keys.nodes_runtime(tag=tag)]
    args: list[Any] = [now_ms, keys.KEY_TTL_S]
    for b in beats:
        keys_.append(keys.node_info(b.node_id, tag=tag))
        args += [b.node_id, json.dumps(b.load or {}), "" if b.load_score is None else repr(float(b.load_score)),
                 "1" if b.saturated else "0", "1" if b.draining else "", b.conn_id]
    return "heartbeats", keys_, args


def heartbeat(node_id: str, now_ms: int, load: dict[str, Any] | None = None, load_score: float | None = None,
              saturated: bool = False, draining: bool = False, conn_id: str = "", *, tag: str = keys.TAG) -> Call:
    """One node's heartbeat: a :func:`heartbeats` call of one (its reply: a list of one)."""
    return heartbeats([Beat(node_id, load, load_score, saturated, draining, conn_id)], now_ms, tag=tag)


def node_state(node_id: str, owner: str, *, online: bool, draining: bool, conn_id: str = "", tag: str = keys.TAG) -> Call:
    """``conn_id``: only if the node is still on this connection ('': whichever)."""
    return ("node_state", [keys.node_info(node_id, tag=tag), keys.nodes_runtime(tag=tag)],
            [owner, "1" if online else "0", "1" if draining else "0", conn_id, node_id])


@attrs.frozen
class Candidates:
    """The pools of a language pair and their member nodes, as the caller last read them,
    with the version of the pool tables they were read at.

    dispatch_task and redispatch_task take the nodes' keys as declared keys (Redis Cluster: a
    script touches only keys named in KEYS) and trust the list while the version is still
    Redis's (lib/choose_node.lua). When it is not (a node registered since), the script fails
    with STALE_CANDIDATES and the caller reads them again (:func:`candidates_from`).
    """

    pools: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    tag: str = keys.TAG  # the shard they belong to (layout 2; layout 1 has one)
    members: tuple[tuple[str, ...], ...] | None = None  # per pool, its members (None: every node in every pool)
    version: str = ""  # the runtime table's '#pools' when they were read ('' none)

    def keys(self) -> list[str]:
        t = self.tag
        return [keys.nodes_runtime(tag=t)] + [keys.node_jobs(n, tag=t) for n in self.nodes]

    def args(self) -> list[Any]:
        index = {n: i + 1 for i, n in enumerate(self.nodes)}
        members = self.members if self.members is not None else tuple(self.nodes for _ in self.pools)
        return [len(self.pools), len(self.nodes), self.version, *self.pools, *self.nodes,
                *(len(m) for m in members), *(index[n] for m in members for n in m)]


RUNTIME_COPY_FIELDS = ("online", "draining", "saturated", "max_jobs", "last_heartbeat_ts", "load_score", "conn_id", "owner")
"""A node's copy of its info in the runtime table (field ``<node_id>``), in this order, joined
by '|', the owner (any text) last (luascripts/lib/runtime_table.lua)."""


def runtime_copy(text: str | None) -> dict[str, str] | None:
    """A node's packed copy (the runtime table's field ``<node_id>``) as a dict, None if none."""
    if text is None:
        return None
    parts = text.split("|", len(RUNTIME_COPY_FIELDS) - 1)
    return dict(zip(RUNTIME_COPY_FIELDS, parts, strict=True))


def candidates_from(version: str | None, pools: list[str], members: list[Any], tag: str = keys.TAG) -> Candidates:
    """Candidates from what was read, in this order: the runtime table's ``'#pools'``
    (:func:`pools_version_read`), the pair's pools (``HKEYS``), each pool's members
    (``SMEMBERS``, in the order of ``pools``)."""
    order = sorted(range(len(pools)), key=lambda i: pools[i])
    per_pool = tuple(tuple(sorted(members[i])) for i in order)
    nodes = tuple(sorted({n for m in per_pool for n in m}))
    return Candidates(tuple(pools[i] for i in order), nodes, tag, per_pool, version or "")


def pools_version_read(tag: str = keys.TAG) -> tuple[str, str, str]:
    """The command that reads the pool tables' version: before the pools and members it stands for."""
    return ("HGET", keys.nodes_runtime(tag=tag), "#pools")


def read_candidates(client: Any, src: str, tgt: str, *, tag: str = keys.TAG) -> Candidates:
    """Read the pools of ``src -> tgt`` and their members (in the shard of ``tag``) with a
    synchronous redis-py client (tests, benchmarks). The daemon reads them through the
    adapter (scheduling.py)."""
    version = client.execute_command(*pools_version_read(tag))
    pools = list(client.hkeys(keys.lang_pools(src, tgt, tag=tag)))
    return candidates_from(version, pools, [client.smembers(keys.pool_members(p, tag=tag)) for p in pools], tag)


def dispatch(job_key: str, job_id: str, session_id: str, utterance_index: int, src: str, tgt: str, turn_id: str,
             turn_action: str, now_ms: int, lease_ms: int, node_ttl_ms: int, rand: int, candidates: Candidates,
             turn_jobs: int = 1, *, epoch: int | None = None, placed_by: str = "", audio_b64: str = "",
             sample_rate: int = 16000, deadline_ms: int = 0, locality_slack: float = 0.0, journal_entry: str = "") -> Call:
    """``epoch``: the session's fencing epoch (None: not fenced); ``placed_by``: the placing instance,
    whose nodes are preferred within ``locality_slack`` of load (lib/choose_node.lua);
    ``audio_b64``, ``sample_rate``, ``deadline_ms``: kept with the job until it is answered (adoption);
    ``journal_entry``: the utterance's resume-journal entry, written with a fresh claim
    (lib/session_claim.lua, claim_record; '' none)."""
    return (
        "dispatch_task",
        [keys.jobkey(job_key), keys.job(job_id), keys.session(session_id), keys.turn(turn_id), keys.lang_pools(src, tgt),
         keys.leases(), keys.instances(), *candidates.keys()],
        [job_key, job_id, session_id, utterance_index, src, tgt, turn_id, turn_action, now_ms, lease_ms, node_ttl_ms,
         keys.KEY_TTL_S, rand, turn_jobs, "" if epoch is None else epoch, placed_by, audio_b64, sample_rate, deadline_ms,
         locality_slack, journal_entry, *candidates.args()],
    )


def redispatch(job_id: str, old_node: str, expected_attempt: int, session_id: str, turn_id: str, src: str, tgt: str,
               now_ms: int, lease_ms: int, node_ttl_ms: int, rand: int, candidates: Candidates, *, near: str = "",
               locality_slack: float = 0.0) -> Call:
    """``near``: the moving instance, whose nodes are preferred within ``locality_slack`` of load."""
    return (
        "redispatch_task",
        [keys.job(job_id), keys.nodes_runtime(), keys.node_jobs(old_node), keys.leases(), keys.session(session_id),
         keys.turn(turn_id), keys.lang_pools(src, tgt), keys.instances(), *candidates.keys()],
        [job_id, expected_attempt, now_ms, lease_ms, node_ttl_ms, rand, old_node, near, locality_slack,
         *candidates.args()],
    )


def complete(job_id: str, job_key: str, node_id: str, attempt: int, ok: bool, now_ms: int,
             done_ttl_s: int = keys.DONE_TTL_S, *, answer: str = "", answer_ttl_s: int = 0, again: bool = False,
             tag: str = keys.TAG, claim: bool = True) -> Call:
    """``answer``: the accepted answer's JSON, kept in the job hash (field ``answer``) for ``answer_ttl_s``.
    ``again``: this call repeats one whose outcome was not known (a timeout): if that one went
    through, its reply comes back instead of ``ALREADY_COMPLETED``. ``tag``: the job's shard;
    ``claim``: the job key is in that slot too (layout 1) and is checked and cut to the done TTL
    (or to ``answer_ttl_s`` when that is longer, as the job is)."""
    return (
        "complete_task",
        [keys.job(job_id, tag=tag), keys.nodes_runtime(tag=tag), keys.node_jobs(node_id, tag=tag),
         keys.leases(tag=tag)] + ([keys.jobkey(job_key, tag=tag)] if claim else []),
        [node_id, attempt, "finished" if ok else "failed", now_ms, job_id, done_ttl_s, answer, answer_ttl_s, "1" if again else "",
         keys.KEY_TTL_S],
    )


def cancel(job_id: str, job_key: str, node_id: str, now_ms: int, done_ttl_s: int = keys.DONE_TTL_S, *,
           tag: str = keys.TAG, claim: bool = True) -> Call:
    """``tag`` and ``claim`` as in :func:`complete`."""
    return (
        "cancel_task",
        [keys.job(job_id, tag=tag), keys.nodes_runtime(tag=tag), keys.node_jobs(node_id, tag=tag),
         keys.leases(tag=tag)] + ([keys.jobkey(job_key, tag=tag)] if claim else []),
        [now_ms, job_id, done_ttl_s, node_id],
    )


def session_claim(job_key: str, job_id: str, session_id: str, utterance_index: int, turn_id: str, turn_action: str,
                  turn_jobs: int = 1, *, epoch: int | None = None, affinity: str = "", replaces: str = "",
                  claim_ttl_s: int = keys.KEY_TTL_S, tag: str = keys.TAG, journal_entry: str = "",
                  now_ms: int | None = None) -> Call:
    """Layout 2's first step: claim ``job_key`` for ``job_id`` in the session's slot (``tag``);
    ``affinity``: the node the turn's previous ("keep") job went to; ``replaces``: a claim the
    caller found dead; ``journal_entry``: as for :func:`dispatch` (luascripts/session_claim.lua);
    ``now_ms``: the session's TTL is renewed once per half TTL (None: at every claim)."""
    return (
        "session_claim",
        [keys.session(session_id, tag=tag), keys.turn(turn_id, tag=tag), keys.jobkey(job_key, tag=tag)],
        [job_key, job_id, session_id, utterance_index, turn_id, turn_action, keys.KEY_TTL_S, turn_jobs,
         "" if epoch is None else epoch, affinity, replaces, claim_ttl_s, journal_entry, "" if now_ms is None else now_ms],
    )


def shard_dispatch(job_key: str, job_id: str, session_id: str, utterance_index: int, src: str, tgt: str, turn_id: str,
                   now_ms: int, lease_ms: int, node_ttl_ms: int, rand: int, candidates: Candidates, *,
                   preferred: str = "", affinity: str = "", placed_by: str = "", audio_b64: str = "",
                   sample_rate: int = 16000, deadline_ms: int = 0, locality_slack: float = 0.0) -> Call:
    """Layout 2's second step: create the claimed job in the shard of ``candidates.tag`` and
    place it there (luascripts/shard_dispatch.lua); ``preferred`` and ``affinity`` as
    session_claim replied them."""
    t = candidates.tag
    return (
        "shard_dispatch",
        [keys.job(job_id, tag=t), keys.lang_pools(src, tgt, tag=t), keys.leases(tag=t), keys.instances(tag=t),
         *candidates.keys()],
        [job_key, job_id, session_id, utterance_index, src, tgt, turn_id, now_ms, lease_ms, node_ttl_ms, keys.KEY_TTL_S,
         rand, placed_by, audio_b64, sample_rate, deadline_ms, locality_slack, preferred, affinity, *candidates.args()],
    )


def shard_redispatch(job_id: str, old_node: str, expected_attempt: int, src: str, tgt: str, now_ms: int, lease_ms: int,
                     node_ttl_ms: int, rand: int, candidates: Candidates, *, near: str = "", locality_slack: float = 0.0,
                     preferred: str = "", affinity: str = "") -> Call:
    """Layout 2's move, in the job's shard (``candidates.tag``): luascripts/shard_redispatch.lua."""
    t = candidates.tag
    return (
        "shard_redispatch",
        [keys.job(job_id, tag=t), keys.nodes_runtime(tag=t), keys.node_jobs(old_node, tag=t), keys.leases(tag=t),
         keys.lang_pools(src, tgt, tag=t), keys.instances(tag=t), *candidates.keys()],
        [job_id, expected_attempt, now_ms, lease_ms, node_ttl_ms, rand, old_node, near, locality_slack, preferred, affinity,
         *candidates.args()],
    )


def job_burn(job_key: str, job_id: str, now_ms: int, *, tag: str) -> Call:
    """Layout 2: take over a claimed job as it is, or burn its id if it was never made
    (luascripts/job_burn.lua)."""
    return "job_burn", [keys.job(job_id, tag=tag)], [job_key, job_id, now_ms, keys.DONE_TTL_S]


MOVE_IN_SKIPS = frozenset({"job_id", "job_key", "status", "finished_ts", "moved_to", "moved_from"})
"""Fields of a job leaving its shard that are not copied to the job it becomes (the rest, its
node, attempt and lease included, are what a job waiting in its shard keeps in layout 1)."""


def job_move_out(job_id: str, expected_attempt: int, moved_to: str, now_ms: int, *, tag: str) -> Call:
    """Layout 2: a waiting job leaves its shard for ``moved_to`` in another (luascripts/job_move_out.lua)."""
    return "job_move_out", [keys.job(job_id, tag=tag)], [expected_attempt, moved_to, now_ms, keys.DONE_TTL_S]


def claim_move(claim_key: str, from_id: str, to_id: str, claim_ttl_s: int) -> Call:
    """Layout 2: the job key's claim (``claim_key``, in the session's slot) follows its job
    to another shard (luascripts/claim_move.lua)."""
    return "claim_move", [claim_key], [from_id, to_id, claim_ttl_s]


def job_move_in(job_id: str, job_key: str, moved_from: str, fields: dict[str, str], *, tag: str) -> Call:
    """Layout 2: the job that left ``moved_from`` is created as ``job_id``, waiting, in its new
    shard (luascripts/job_move_in.lua); ``fields``: the old job's hash."""
    kept = [x for name, value in sorted(fields.items()) if name not in MOVE_IN_SKIPS for x in (name, value)]
    return "job_move_in", [keys.job(job_id, tag=tag)], [job_id, job_key, moved_from, keys.KEY_TTL_S, *kept]


def shard_free(src: str, tgt: str, now_ms: int, node_ttl_ms: int, candidates: Candidates) -> Call:
    """Layout 2, read only: the free slots and slots of the eligible nodes for a pair in the
    shard of ``candidates.tag`` (luascripts/shard_free.lua)."""
    t = candidates.tag
    return ("shard_free", [keys.lang_pools(src, tgt, tag=t), keys.instances(tag=t), *candidates.keys()],
            [now_ms, node_ttl_ms, *candidates.args()])


def node_shard(node_id: str, order: list[int], known: int | None = None) -> Call:
    """Layout 2: the node's shard from the node directory, given now if it has none
    (luascripts/node_shard.lua); ``order``: every shard, ties broken in this order; ``known``:
    the shard the caller knew it in (given again if the directory lost it)."""
    return "node_shard", [keys.node_directory(), keys.node_directory_counts()], [
        node_id, "" if known is None else known, *order]


def owner_claim(owner_key: str, instance_id: str) -> Call:
    return "owner_claim", [owner_key], [instance_id]


def owner_release(owner_key: str, instance_id: str) -> Call:
    return "owner_release", [owner_key], [instance_id]


def session_journal(session_id: str, epoch: int, meta: str, keep: int, entries: list[tuple[str, int, str]],
                    finalized: int | None = None, *, tag: str = keys.TAG) -> Call:
    """``entries``: (kind, utterance index, payload) with kind "u" (finalized), "r" (result), "c" (closed);
    ``finalized``: the writer's count of finalized utterances (the journal's never goes below it);
    ``tag``: the session's (KeySpace.session_tag)."""
    return ("session_journal", [keys.session(session_id, tag=tag)],
            [epoch, keys.KEY_TTL_S, meta, keep, "" if finalized is None else finalized, *(x for entry in entries for x in entry)])


def session_resume(session_id: str, instance_id: str, auth: str, *, tag: str = keys.TAG) -> Call:
    """``auth``: the digest of the presented resume token (and API key), journal.resume_digest."""
    return "session_resume", [keys.session(session_id, tag=tag)], [instance_id, keys.KEY_TTL_S, auth]
