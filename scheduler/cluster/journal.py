"""Session journal: what a client was sent, kept in Redis so that any instance can resume it.

protocol.md, "Resume": a client whose instance died (or was stopped) reconnects to any
instance with ``session_id`` + ``resume_from``; it gets every result from that index on,
exactly once and in order, and numbering goes on without skip or repeat. For that, the
session hash (``{scheduler}:session:<id>``, see ``luascripts/session_journal.lua``) holds:
the fencing epoch, the session's languages, how many utterances were finalized, each
finalized utterance still owed a result, and the last ``resume_keep_results`` results as sent.

Write-ahead: the client gateway's writer hands each batch of outgoing messages to
:meth:`Journal.write` before it sends them (one EVALSHA per batch, through the batching
adapter), so the client never holds an ``utterance_finalized`` or ``result`` the journal
lacks. Audio that was not finalized yet is not journaled: the client resends it.

An ``utterance_finalized`` usually costs no call of its own: the creation of the utterance's
first job writes its entry in the same script (``dispatch_task`` / ``session_claim``, see
``lib/session_claim.lua``), and the dispatcher says so (:meth:`Journal.ahead`, through the
session registry) once that placement's reply is in. The writer waits for that word up to
:data:`AHEAD_WAIT_S` and writes the entry itself when the job was not created (a full pool, a
duplicate, Redis out) or the word did not come in time; an entry written twice is the same
entry, and the script never writes one for an utterance the journal counted already.

Resume secret: a new session gets a resume token (:func:`new_resume_token`, 192 random bits)
in its ``session_ready``; the journal keeps only its digest (``Meta.auth``, with the API key
that opened the session folded in: :func:`resume_digest`), and :func:`resume` passes the
digest of what the client presented to ``session_resume.lua``, which compares them in
constant time before it changes anything. Without the token nobody takes a session over.

Fencing: :func:`resume` raises the epoch atomically with reading the journal. From then on
the old owner's journal writes fail with :class:`~scheduler.store.redis_adapter.Fenced` (its
session ends as ``taken_over`` without cancelling jobs: the new owner wants their answers),
and so do its job creations (``dispatch_task`` checks the epoch too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import attrs
import trio

from scheduler.jobs import owed_entry
from scheduler.ops.logs import event
from scheduler.protocol import CLOSE_POLICY, UNKNOWN_SESSION, ProtocolError, Result, SessionClosed, UtteranceFinalized, encode
from scheduler.store import keys, lua
from scheduler.store.redis_adapter import RedisAdapter, RedisUnavailable, now_ms

log = logging.getLogger("scheduler.journal")

RETRY_S = 0.5
AHEAD_WAIT_S = 0.25
"""How long the writer waits for the word that an utterance's first job wrote its journal entry."""
AHEAD_KEPT = 64
"""Words about utterances the writer has not asked for yet, kept per session (the oldest go)."""
FINAL_CLOSE_REASONS = ("client_close", "idle_timeout")  # not resumable; "shutdown" and lost sockets are


RESUME_REFUSED = "is not known here (never opened, expired, ended, or the resume_token does not match)"
"""The one text of every refused resume: an unknown id, an ended session and a wrong token look alike."""


def new_resume_token() -> str:
    """A session's resume secret: 192 random bits, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


def resume_digest(token: str, api_key: str | None) -> str:
    """What the journal keeps of a resume token (and of the API key that opened the session,
    "" when the daemon requires none): SHA-256, hex. The token itself is stored nowhere."""
    return hashlib.sha256(b"scheduler.resume.v1\0" + token.encode() + b"\0" + (api_key or "").encode()).hexdigest()


@attrs.frozen
class Meta:
    src_lang: str
    tgt_langs: tuple[str, ...]
    sample_rate: int
    auth: str = attrs.field(default="", repr=False)  # resume_digest of the session's token (and key)

    def to_json(self) -> str:
        return json.dumps({"src_lang": self.src_lang, "tgt_langs": list(self.tgt_langs), "sample_rate": self.sample_rate,
                           "auth": self.auth})

    @classmethod
    def from_json(cls, text: str) -> Meta:
        data = json.loads(text)
        return cls(str(data["src_lang"]), tuple(data["tgt_langs"]), int(data["sample_rate"]), str(data.get("auth", "")))


@attrs.frozen
class Owed:
    """A finalized utterance whose result the client has not had; ``deadline_ms`` is epoch ms."""

    index: int
    reason: str
    turn_id: str
    deadline_ms: int


@attrs.frozen
class Resumed:
    """The journal as :func:`resume` found it, under the new ``epoch``."""

    epoch: int
    meta: Meta
    next_index: int
    sent: list[tuple[int, str]]  # (index, result JSON as sent), ascending
    owed: list[Owed]  # consecutive, ending at next_index - 1

    def results_from(self, index: int) -> list[str]:
        return [text for i, text in self.sent if i >= index]

    def owed_from(self, index: int) -> list[Owed]:
        """Owed utterances the client still wants: it says it has those below ``index`` (a
        resume_from set past what the journal knows was sent)."""
        return [o for o in self.owed if o.index >= index]


async def open_session(redis: RedisAdapter, session_id: str, instance_id: str, meta: Meta) -> int:
    """Start the journal of a new session; returns its epoch (1)."""
    key = redis.space.session_key(session_id)
    await redis.commands_many([
        ("HSET", key, "epoch", 1, "meta", meta.to_json(), "owner", instance_id, "finalized", 0),
        ("EXPIRE", key, keys.KEY_TTL_S)], raise_errors=True)
    return 1


class ResumeRefused(ProtocolError):
    """``UNKNOWN_SESSION`` (fatal, 1008), one text for every cause; ``why`` (``unknown``,
    ``denied``, ``closed``) is for the metric only, never for the peer."""

    def __init__(self, session_id: str, why: str) -> None:
        super().__init__(UNKNOWN_SESSION, f"session {session_id} {RESUME_REFUSED}", fatal=True, close_code=CLOSE_POLICY)
        self.why = why


async def resume(redis: RedisAdapter, session_id: str, instance_id: str, auth: str) -> Resumed:
    """Take the session over (epoch + 1) and read its journal, if ``auth`` (:func:`resume_digest`
    of the presented token and key) matches; :class:`ResumeRefused` if it does not, or there is
    no such session (never existed, expired, or closed for good)."""
    reply = await redis.script(*lua.session_resume(session_id, instance_id, auth, tag=redis.space.session_tag(session_id)))
    if reply[0] != "OK":
        raise ResumeRefused(session_id, str(reply[0]).lower())
    return parse(int(reply[1]), reply[2])


def parse(epoch: int, flat: list[Any]) -> Resumed:
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    next_index = int(fields.get("finalized", 0))
    sent, owed_by_index = [], {}
    for field, value in fields.items():
        kind, _, index = field.partition(":")
        if kind == "r":
            sent.append((int(index), value))
        elif kind == "u":
            data = json.loads(value)
            owed_by_index[int(index)] = Owed(int(index), data["reason"], data["turn_id"], int(data["deadline_ms"]))
    sent.sort()
    owed: list[Owed] = []
    if owed_by_index:
        # consecutive up to the last finalized index; a hole (never expected) is owed at once
        owed = [owed_by_index.get(i) or Owed(i, "close", "", 0) for i in range(min(owed_by_index), next_index)]
    return Resumed(epoch, Meta.from_json(fields["meta"]), next_index, sent, owed)


class Journal:
    """The write-ahead journal of one session held here (used by its writer task only)."""

    def __init__(self, redis: RedisAdapter, session_id: str, epoch: int | None, meta: Meta, *, keep: int,
                 result_deadline_ms: int, finalized: int = 0, owed: list[Owed] | tuple[Owed, ...] = (),
                 jobs_write_ahead: bool = False,
                 observe: Callable[[str, float], None] = lambda written_by, waited_s: None) -> None:
        """``epoch`` None (``keep`` 0): the journal is off, :meth:`write` only encodes.
        ``finalized`` and ``owed`` continue a resumed session's journal. ``jobs_write_ahead``:
        the session's jobs write their utterance's entry (module docstring), so the writer
        waits for :meth:`ahead` before it writes one itself; ``observe`` gets who wrote each
        (``job`` or ``writer``) and how long the writer waited for the word, for the metrics."""
        self._redis = redis
        self.session_id = session_id
        self.epoch = epoch
        self._meta = meta.to_json()
        self._keep = keep
        self._deadline_ms = result_deadline_ms
        # what this writer knows the journal must hold: the count of finalized utterances and
        # the "u" entry of each one still owed a result (written again if Redis loses them)
        self._finalized = finalized
        self._owed: dict[int, str] = {o.index: owed_entry(o.reason, o.turn_id, o.deadline_ms) for o in owed}
        self._jobs_write_ahead = jobs_write_ahead and epoch is not None
        self._observe = observe
        self._ahead: dict[int, bool] = {}  # utterance index -> whether its job wrote its entry (the dispatcher's word)
        self._awaited: tuple[int, trio.Event] | None = None  # the word the writer waits for now

    def ahead(self, index: int, written: bool) -> None:
        """The dispatcher's word about utterance ``index``: the creation of its first job wrote
        its journal entry (``written``), or did not. The first word counts."""
        if index in self._ahead:
            return
        self._ahead[index] = written
        if len(self._ahead) > AHEAD_KEPT:
            del self._ahead[next(iter(self._ahead))]
        if self._awaited is not None and self._awaited[0] == index:
            self._awaited[1].set()

    async def _written_ahead(self, index: int) -> bool:
        """Whether utterance ``index``'s entry is in the journal already (its job wrote it);
        waits for the word up to :data:`AHEAD_WAIT_S`."""
        waited = 0.0
        if index not in self._ahead:
            started = trio.current_time()
            self._awaited = (index, trio.Event())
            with trio.move_on_after(AHEAD_WAIT_S):
                await self._awaited[1].wait()
            self._awaited = None
            waited = trio.current_time() - started
        written = self._ahead.pop(index, False)
        self._observe("job" if written else "writer", waited)
        return written

    def entries(self, msgs: list[Any], texts: list[str]) -> list[tuple[str, int, str]]:
        out = []
        for msg, text in zip(msgs, texts, strict=True):
            if isinstance(msg, UtteranceFinalized):
                owed = owed_entry(msg.reason, msg.turn_id, now_ms() + self._deadline_ms)
                out.append(("u", msg.utterance_index, owed))
                self._owed[msg.utterance_index] = owed
                self._finalized = max(self._finalized, msg.utterance_index + 1)
            elif isinstance(msg, Result):
                out.append(("r", msg.utterance_index, text))
                self._owed.pop(msg.utterance_index, None)
            elif isinstance(msg, SessionClosed) and msg.reason in FINAL_CLOSE_REASONS:
                out.append(("c", 0, msg.reason))
        return out

    async def write(self, msgs: list[Any]) -> list[str]:
        """Journal ``msgs`` (those that matter for a resume) and return them encoded, ready
        to send. Retries while Redis is unavailable; raises ``Fenced`` once resumed elsewhere."""
        texts = [encode(m) for m in msgs]
        entries = self.entries(msgs, texts) if self.epoch is not None else []
        if self._jobs_write_ahead:
            entries = [e for e in entries if e[0] != "u" or not await self._written_ahead(e[1])]
        if entries:
            await self._write(entries)
        return texts

    async def reassert(self) -> None:
        """Write again what the journal must hold (finalized count, owed utterances): after
        Redis lost its data, a resume must still find the session and what it owes."""
        if self.epoch is not None:
            await self._write([])

    async def _write(self, entries: list[tuple[str, int, str]]) -> None:
        reply = await self._call(entries)
        if reply[0] == "OK" and reply[1:] == ["NEW"] and self._owed:
            # the journal was gone (Redis lost its data): the owed entries written before too
            reply = await self._call([("u", i, payload) for i, payload in sorted(self._owed.items())])
        if reply[0] == "FENCED":
            raise Fenced(f"session {self.session_id} is at epoch {reply[1]}, this owner at {self.epoch}")

    async def _call(self, entries: list[tuple[str, int, str]]) -> list[Any]:
        assert self.epoch is not None
        call = lua.session_journal(self.session_id, self.epoch, self._meta, self._keep, entries, self._finalized,
                                   tag=self._redis.space.session_tag(self.session_id))
        logged = False
        while True:
            try:
                return await self._redis.script(*call)
            except RedisUnavailable as exc:
                if not logged:
                    event(log, "journal_write_waiting", logging.WARNING, session_id=self.session_id, error=str(exc))
                    logged = True
                await trio.sleep(RETRY_S)


class Fenced(Exception):
    """The session was resumed by a newer owner; this one must stop writing."""
