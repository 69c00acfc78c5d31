"""Where a session is: the location API (``GET /sessions/<id>`` on the admin port).

Answered from Redis alone, so that every instance gives the same answer: the session's
journal hash (journal.py: epoch, languages, how many utterances were finalized, those
still owed a result, whether it ended for good), its owner record and that instance's
liveness record (its WebSocket URL). States:

- ``live``: an instance that is alive holds its socket;
- ``resumable``: nobody holds it now (its socket or instance was lost, or it was drained
  for a restart); a client with its resume token may resume it on any instance;
- ``ended``: it ended for good (``client_close``, ``idle_timeout``).

Nothing secret is shown: no resume token or digest, no API key, no audio or result text.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from scheduler.store import keys
from scheduler.store.redis_adapter import RedisAdapter

if TYPE_CHECKING:
    from scheduler.cluster.ownership import Ownership


async def locate(redis: RedisAdapter, ownership: Ownership, session_id: str) -> dict[str, Any] | None:
    """The session's location and state, or None when Redis knows no such session (never
    opened, expired, or opened without a journal: ``--resume-keep-results 0``). Raises
    ``RedisUnavailable`` when Redis cannot answer."""
    key = redis.space.session_key(session_id)  # (its field names, not its values: the kept results may be large)
    (epoch, meta_json, finalized, closed), names = await redis.commands_many(
        [("HMGET", key, "epoch", "meta", "finalized", "closed"), ("HKEYS", key)], raise_errors=True)
    if epoch is None:
        return None
    meta = json.loads(meta_json or "{}")
    owner = await ownership.session_owner(session_id) if closed is None else None
    ws_url = None
    if owner:
        info = await redis.command("GET", keys.instance(owner))
        ws_url = json.loads(info).get("ws_url") if info else None
    return {
        "session_id": session_id,
        "state": "ended" if closed is not None else "live" if owner else "resumable",
        "instance_id": owner,
        "ws_url": ws_url,
        "epoch": int(epoch),
        "src_lang": meta.get("src_lang"),
        "tgt_langs": meta.get("tgt_langs"),
        "next_utterance_index": int(finalized or 0),
        "results_owed": sum(1 for name in names if name.startswith("u:")),
        "closed_reason": closed,
    }
