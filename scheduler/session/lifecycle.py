"""Session lifecycle: admitting, opening (or resuming), holding and releasing one session.

The client gateway (edge/client_gateway.py) is transport: frames in, frames out. What makes
a connection a session is here, in the order it happens:

1. :meth:`SessionLifecycle.admit`: the first frame must be a valid ``session_init`` (with an
   API key when keys are configured), admitted by admission control (``SERVER_FULL`` past
   ``max_sessions``: session/admission.py), for language pairs some pool serves, or the
   resume of a session Redis still holds, by the holder of its resume token (and of the key
   that opened it). Refusals are :class:`~scheduler.protocol.ProtocolError`s the gateway sends.
2. :meth:`SessionLifecycle.open`: the journal (a new session's, when results are kept for a
   resume) and the owner claim; the :class:`SessionActor` and its journal writer; a resumed
   session's previous owner is told it was taken over.
3. :meth:`SessionLifecycle.hold`: the session is in the registry (a newer connection to the
   same session here takes it over), counted and logged while the gateway serves it; a
   resumed session first gets back what it is owed (:meth:`recover_owed`). When it ends,
   however it ends, it leaves the registry and its owner record is released (unless another
   connection took it over). Its admission slot is given back then (the gateway holds it
   from admission on, so that a session that fails to open gives it back too).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from scheduler.cluster import journal
from scheduler.cluster.journal import Meta
from scheduler.ops import secrets
from scheduler.ops.config import Settings
from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.protocol import (
    BAD_MESSAGE,
    CLOSE_POLICY,
    NOT_INITIALIZED,
    UNAUTHORIZED,
    UNSUPPORTED_LANG_PAIR,
    AudioChunk,
    ProtocolError,
    SessionInit,
    redis_unavailable,
)
from scheduler.session.actor import SessionActor
from scheduler.session.admission import AdmissionControl, Slot
from scheduler.session.core import PendingUtterance
from scheduler.store.redis_adapter import RedisAdapter, RedisUnavailable, now_ms

if TYPE_CHECKING:
    from scheduler.cluster.ownership import Ownership
    from scheduler.cluster.routing import Router
    from scheduler.placement.dispatcher import Dispatcher
    from scheduler.session.registry import SessionRegistry
    from scheduler.store.scheduling import SchedulingClient

log = logging.getLogger("scheduler.client_gateway")  # (the session_started/ended events keep their logger)


@attrs.frozen
class Admission:
    """An accepted ``session_init``: a new session (``resumed`` None; ``auth`` the digest its
    journal keeps) or a resume; ``token`` is the session's resume secret (sent back in
    ``session_ready``, never logged)."""

    init: SessionInit
    resumed: journal.Resumed | None
    token: str = attrs.field(repr=False)
    auth: str = attrs.field(repr=False)
    slot: Slot = attrs.field(factory=lambda: Slot(None), repr=False)  # its place (admission.py): released when it ends


@attrs.frozen
class OpenSession:
    """A session made from an :class:`Admission`: its actor and journal writer, and how
    many finalized utterances a resumed one still owes results for."""

    admission: Admission
    actor: SessionActor
    writer: journal.Journal
    owed: int

    @property
    def resumed(self) -> journal.Resumed | None:
        return self.admission.resumed

    def replay(self) -> list[str]:
        """The results a resumed session sends again (encoded ``result`` texts)."""
        resumed, init = self.admission.resumed, self.admission.init
        return list(resumed.results_from(init.resume_from or 0)) if resumed else []


class SessionLifecycle:
    def __init__(self, *, settings: Settings, redis: RedisAdapter, scheduling: SchedulingClient, dispatcher: Dispatcher,
                 router: Router, sessions: SessionRegistry, metrics: Metrics, ownership: Ownership,
                 admission: AdmissionControl) -> None:
        self.settings = settings
        self.admission = admission
        self._redis = redis
        self._scheduling = scheduling
        self._dispatcher = dispatcher
        self._router = router
        self._sessions = sessions
        self._metrics = metrics
        self._ownership = ownership

    # ------------------------------------------------------------ 1. admit

    async def admit(self, msg: object, presented_key: str | None) -> Admission:
        """The first frame, checked (module docstring). Every refused resume looks the same to
        the client (journal.ResumeRefused); a missing token is checked like a wrong one,
        through the same script, so that neither answers sooner."""
        if isinstance(msg, bytes | AudioChunk):
            raise ProtocolError(NOT_INITIALIZED, "send session_init before audio")
        if not isinstance(msg, SessionInit):
            raise ProtocolError(BAD_MESSAGE, f"expected session_init first, got {msg.TYPE}")
        key = self._api_key(msg, presented_key)
        slot = self.admission.take(resume=msg.session_id is not None)  # (before any Redis work: a refusal leaves nothing)
        try:
            return await self._admitted(msg, key, slot)
        except BaseException:
            slot.release()
            raise

    async def _admitted(self, msg: SessionInit, key: str | None, slot: Slot) -> Admission:
        if msg.session_id is not None:
            token = msg.resume_token or ""
            try:
                resumed = await journal.resume(self._redis, msg.session_id, self.settings.instance_id, journal.resume_digest(token, key))
            except journal.ResumeRefused as exc:
                self._metrics.resume_refused_total.labels(exc.why).inc()
                raise
            except RedisUnavailable as exc:
                raise redis_unavailable(exc) from None
            return Admission(msg, resumed, token, "", slot)
        await self._check_pairs(msg)
        token = journal.new_resume_token()
        return Admission(msg, None, token, journal.resume_digest(token, key), slot)

    def _api_key(self, msg: SessionInit, presented: str | None) -> str | None:
        """The API key the client presented, once checked (None: the daemon requires none)."""
        keys_ = self.settings.api_keys
        if not keys_:
            return None
        key = presented or msg.api_key or ""
        if not secrets.matches(key, keys_):
            raise ProtocolError(UNAUTHORIZED, "missing or unknown API key", fatal=True, close_code=CLOSE_POLICY)
        return key

    async def _check_pairs(self, init: SessionInit) -> None:
        missing = []
        for tgt in init.tgt_langs:
            try:
                if not await self._scheduling.serves(init.src_lang, tgt):
                    missing.append(f"{init.src_lang}->{tgt}")
            except RedisUnavailable as exc:
                raise redis_unavailable(exc) from None
        if missing:
            raise ProtocolError(UNSUPPORTED_LANG_PAIR, f"no node pool serves {', '.join(missing)}",
                                fatal=True, close_code=CLOSE_POLICY)

    # ------------------------------------------------------------ 2. open

    async def open(self, admission: Admission) -> OpenSession:
        """The session's journal and owner claim, its actor and journal writer (module
        docstring). Redis unavailable: ProtocolError ``UNAVAILABLE``, nothing held."""
        init, resumed = admission.init, admission.resumed
        if resumed is None:
            meta = Meta(init.src_lang, tuple(init.tgt_langs), init.sample_rate, admission.auth)
            session_id, next_index, owed = self._redis.space.new_session_id(), 0, []
        else:
            session_id, meta, next_index = init.session_id, resumed.meta, resumed.next_index
            owed = list(resumed.owed_from(init.resume_from or 0))
        pending = [PendingUtterance(o.index, o.reason, o.turn_id, trio.current_time() + (o.deadline_ms - now_ms()) / 1000)
                   for o in owed]
        try:
            if resumed:
                epoch: int | None = resumed.epoch
            elif self.settings.resume_keep_results:
                epoch = await journal.open_session(self._redis, session_id, self.settings.instance_id, meta)
            else:
                epoch = None  # no journal: not resumable, not fenced
            previous_owner = await self._ownership.claim_session(session_id)
        except RedisUnavailable as exc:
            raise redis_unavailable(exc) from None
        actor = SessionActor(
            session_id=session_id, src_lang=meta.src_lang, tgt_langs=meta.tgt_langs, sample_rate=meta.sample_rate,
            settings=self.settings, jobs=self._dispatcher, metrics=self._metrics, next_index=next_index, pending=pending,
            epoch=epoch,
        )
        writer = journal.Journal(self._redis, session_id, epoch, meta, keep=self.settings.resume_keep_results,
                                 result_deadline_ms=self.settings.result_deadline_ms, finalized=next_index, owed=owed,
                                 jobs_write_ahead=True, observe=self._observe_journal_entry)
        if resumed:
            await self._router.session_taken_over(previous_owner, session_id)
        return OpenSession(admission, actor, writer, len(pending))

    def _observe_journal_entry(self, written_by: str, waited_s: float) -> None:
        self._metrics.journal_finalize_entries_total.labels(written_by).inc()
        self._metrics.journal_ahead_wait_seconds.observe(waited_s)

    # ------------------------------------------------------------ 3. hold, recover, release

    async def hold(self, opened: OpenSession, peer: str, serve: Callable[[OpenSession], Awaitable[str]]) -> None:
        """Hold the session while ``serve`` runs (the gateway's part; it returns why the
        session ended): in the registry, counted and logged; then released (module docstring)."""
        actor, resumed = opened.actor, opened.resumed
        previous = self._sessions.add(actor, opened.writer)
        if previous is not None:  # resumed on a newer connection to this same instance
            previous.take_over_nowait()
        (self._metrics.sessions_resumed_total if resumed else self._metrics.sessions_total).inc()
        event(log, "session_resumed" if resumed else "session_started", session_id=actor.session_id, peer=peer,
              src_lang=actor.src_lang, tgt_langs=",".join(actor.tgt_langs), sample_rate=actor.sample_rate, epoch=actor.epoch,
              next_utterance_index=actor.next_index, owed=opened.owed)
        reason = "disconnected"
        try:
            reason = await serve(opened)
        finally:
            self._sessions.remove(actor)
            if reason != "taken_over":
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._ownership.release_session(actor.session_id)
            event(log, "session_ended", session_id=actor.session_id, reason=reason, utterances=actor.next_index)

    async def recover_owed(self, actor: SessionActor) -> None:
        """A resumed session owes results: take the answers Redis kept for it (whoever
        received them), and adopt the jobs still running or waiting, whose audio Redis kept
        (their node may be gone with the old owner: this instance moves them then)."""
        with trio.move_on_after(2):
            try:
                await self._router.take_stored({actor.session_id: actor.missing_answers()})
                await self._dispatcher.recovery.adopt(actor.session_id, actor.epoch, actor.missing_answers())
            except RedisUnavailable:
                pass  # the answer poller looks again; unadopted jobs end SKIPPED at their deadline
