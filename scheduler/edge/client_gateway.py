"""Client gateway: one ``/v1/session`` WebSocket -> one session actor.

Per connection: wait for a valid ``session_init`` (a non-fatal error leaves the socket open
for a corrected one), check the language pairs, start a :class:`SessionActor`, then run
three things in the connection's nursery: the reader (frames -> typed events -> actor
inbox), the writer (actor outbox -> socket) and the actor itself. Bad frames get an
``error`` and touch nothing else. The connection ends when the actor ends (close, idle,
shutdown), when the client disconnects (the actor is cancelled and cleans up), or on a
fatal error.
"""

from __future__ import annotations

import logging
import uuid

import attrs
import trio
from trio_websocket import WebSocketConnection

from scheduler.cluster import journal
from scheduler.cluster.journal import Meta
from scheduler.edge import wsutil
from scheduler.ops import secrets
from scheduler.ops.logs import event
from scheduler.placement.redis_adapter import RedisUnavailable, now_ms
from scheduler.protocol import (
    BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    NOT_INITIALIZED,
    SLOW_CONSUMER,
    UNAUTHORIZED,
    UNSUPPORTED_LANG_PAIR,
    AudioChunk,
    CloseSession,
    Encoded,
    Finalize,
    ProtocolError,
    Result,
    SessionInit,
    SessionReady,
    parse_client,
    redis_unavailable,
)
from scheduler.session.actor import SessionActor, SlowClient
from scheduler.session.core import PendingUtterance
from scheduler.session.events import AudioIn, CloseIn, FinalizeIn

log = logging.getLogger("scheduler.client_gateway")

WRITE_BATCH = 64


@attrs.frozen
class Admission:
    """An accepted ``session_init``: a new session (``resumed`` None; ``auth`` the digest its
    journal keeps) or a resume; ``token`` is the session's resume secret (sent back in
    ``session_ready``, never logged)."""

    init: SessionInit
    resumed: journal.Resumed | None
    token: str = attrs.field(repr=False)
    auth: str = attrs.field(repr=False)


class ClientGateway(wsutil.Gateway):
    side = "client"
    parse = staticmethod(parse_client)

    async def handle(self, ws: WebSocketConnection, presented: str | None = None) -> None:
        """Serve one client connection; ``presented`` is the API key its handshake carried
        (``Authorization: Bearer`` or the bearer subprotocol: edge/handshake.py), if any."""
        peer = wsutil.peer(ws)
        accepted = await self.first_message(ws, peer, lambda message: self._accept_init(message, presented))
        if accepted is None:
            return
        init, resumed, token = accepted.init, accepted.resumed, accepted.token
        if resumed is None:
            meta = Meta(init.src_lang, tuple(init.tgt_langs), init.sample_rate, accepted.auth)
            session_id, next_index, pending = uuid.uuid4().hex, 0, []
        else:
            session_id, meta, next_index = init.session_id, resumed.meta, resumed.next_index
            pending = [PendingUtterance(o.index, o.reason, o.turn_id, trio.current_time() + (o.deadline_ms - now_ms()) / 1000)
                       for o in resumed.owed_from(init.resume_from or 0)]
        try:
            if resumed:
                epoch: int | None = resumed.epoch
            elif self.settings.resume_keep_results:
                epoch = await journal.open_session(self._redis, session_id, self.settings.instance_id, meta)
            else:
                epoch = None  # no journal: not resumable, not fenced
            previous_owner = await self._ownership.claim_session(session_id)
        except RedisUnavailable as exc:
            await wsutil.send_error(ws, redis_unavailable(exc))
            return
        actor = SessionActor(
            session_id=session_id, src_lang=meta.src_lang, tgt_langs=meta.tgt_langs, sample_rate=meta.sample_rate,
            settings=self.settings, jobs=self._dispatcher, metrics=self._metrics, next_index=next_index, pending=pending,
            epoch=epoch,
        )
        writer = journal.Journal(self._redis, session_id, epoch, meta, keep=self.settings.resume_keep_results,
                                 result_deadline_ms=self.settings.result_deadline_ms, finalized=next_index,
                                 owed=resumed.owed_from(init.resume_from or 0) if resumed else ())
        if resumed:
            await self._router.session_taken_over(previous_owner, session_id)
        previous = self._sessions.add(actor, writer)
        if previous is not None:  # resumed on a newer connection to this same instance
            previous.take_over_nowait()
        (self._metrics.sessions_resumed_total if resumed else self._metrics.sessions_total).inc()
        event(log, "session_resumed" if resumed else "session_started", session_id=session_id, peer=peer,
              src_lang=meta.src_lang, tgt_langs=",".join(meta.tgt_langs), sample_rate=meta.sample_rate, epoch=epoch,
              next_utterance_index=next_index, owed=len(pending))
        reason = "disconnected"
        try:
            await wsutil.send(ws, SessionReady(session_id=session_id, resumed=resumed is not None,
                                               next_utterance_index=next_index, limits=self.settings.limits,
                                               resume_token=token))
            if resumed is not None:
                for text in resumed.results_from(init.resume_from or 0):
                    await wsutil.send(ws, Encoded(Result.TYPE, text))
                if pending:
                    await self._recover_owed(actor)
            reason = await self._run(ws, actor, writer, peer)
        finally:
            self._sessions.remove(actor)
            if reason != "taken_over":
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._ownership.release_session(session_id)
            event(log, "session_ended", session_id=session_id, reason=reason, utterances=actor.next_index)

    async def _recover_owed(self, actor: SessionActor) -> None:
        """A resumed session owes results: take the answers Redis kept for it (whoever
        received them), and adopt the jobs still running or waiting, whose audio Redis kept
        (their node may be gone with the old owner: this instance moves them then)."""
        with trio.move_on_after(2):
            try:
                await self._router.take_stored({actor.session_id: actor.missing_answers()})
                await self._dispatcher.adopt(actor.session_id, actor.epoch, actor.missing_answers())
            except RedisUnavailable:
                pass  # the answer poller looks again; unadopted jobs end SKIPPED at their deadline

    async def _accept_init(self, msg: object, presented_key: str | None) -> Admission:
        """The first frame must be a valid session_init (with an API key when keys are configured)
        for language pairs some pool serves, or the resume of a session Redis still holds by
        the holder of its resume token (and of the key that opened it). Every refused resume
        looks the same to the client (journal.ResumeRefused); a missing token is checked like
        a wrong one, through the same script, so that neither answers sooner."""
        if isinstance(msg, bytes | AudioChunk):
            raise ProtocolError(NOT_INITIALIZED, "send session_init before audio")
        if not isinstance(msg, SessionInit):
            raise ProtocolError(BAD_MESSAGE, f"expected session_init first, got {msg.TYPE}")
        key = self._api_key(msg, presented_key)
        if msg.session_id is not None:
            token = msg.resume_token or ""
            try:
                resumed = await journal.resume(self._redis, msg.session_id, self.settings.instance_id, journal.resume_digest(token, key))
            except journal.ResumeRefused as exc:
                self._metrics.resume_refused_total.labels(exc.why).inc()
                raise
            except RedisUnavailable as exc:
                raise redis_unavailable(exc) from None
            return Admission(msg, resumed, token, "")
        await self._check_pairs(msg)
        token = journal.new_resume_token()
        return Admission(msg, None, token, journal.resume_digest(token, key))

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

    async def _run(self, ws: WebSocketConnection, actor: SessionActor, writer: journal.Journal, peer: str) -> str:
        async with trio.open_nursery() as nursery:
            writer_done = trio.Event()

            async def write() -> None:
                try:
                    await self._write(ws, actor, writer, peer)
                finally:
                    writer_done.set()

            nursery.start_soon(write)
            nursery.start_soon(self._reader, ws, actor, nursery.cancel_scope, peer)
            try:
                reason = await actor.run()
            except SlowClient as exc:
                event(log, "slow_client_closed", logging.WARNING, session_id=actor.session_id, detail=str(exc))
                nursery.cancel_scope.cancel()
                await wsutil.close(ws, CLOSE_POLICY, f"{SLOW_CONSUMER}: client does not read its results")
                return "slow_client"
            if reason == "taken_over":
                self._metrics.sessions_taken_over_total.inc()
                nursery.cancel_scope.cancel()
                await wsutil.close(ws, CLOSE_GOING_AWAY, "SESSION_TAKEN_OVER: resumed on another connection")
                return reason
            with trio.move_on_after(wsutil.CLOSE_TIMEOUT * 2):
                await writer_done.wait()
            await wsutil.close(ws, CLOSE_GOING_AWAY if reason == "shutdown" else CLOSE_NORMAL, reason)
            nursery.cancel_scope.cancel()
            return reason
        return "disconnected"  # the reader cancelled the nursery: the client went away

    async def _write(self, ws: WebSocketConnection, actor: SessionActor, writer: journal.Journal, peer: str) -> None:
        """Writer task: take what the actor emitted (up to ``WRITE_BATCH`` at a time), journal
        it (journal.py: write-ahead, one Redis call per batch), then send it, until the outbox
        is closed or the socket is. Fenced (resumed elsewhere): the actor is told to stop."""
        async for first in actor.outbox:
            batch = [first]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(actor.outbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                texts = await writer.write(batch)
            except journal.Fenced as exc:
                event(log, "session_fenced", session_id=actor.session_id, detail=str(exc))
                actor.take_over_nowait()
                return
            for msg, text in zip(batch, texts, strict=True):
                if not await wsutil.send(ws, Encoded(msg.TYPE, text)):
                    event(log, "send_on_closed_socket", logging.DEBUG, peer=peer, type=msg.TYPE)
                    return
                if isinstance(msg, Result):
                    self._sessions.note_result(actor.session_id, msg)

    async def _reader(self, ws: WebSocketConnection, actor: SessionActor, scope: trio.CancelScope, peer: str) -> None:
        """Client frames into the session's backlog, until the client goes away or is refused
        fatally; then the connection's nursery ends."""

        async def audio(pcm: bytes, is_final: bool = False) -> None:
            await actor.put_client_event(AudioIn.of(pcm, is_final))

        async def finalize(_: Finalize) -> None:
            await actor.put_client_event(FinalizeIn())

        async def close(_: CloseSession) -> None:
            await actor.put_client_event(CloseIn("client_close"))

        async def init_again(_: SessionInit) -> None:
            raise ProtocolError(BAD_MESSAGE, "session already initialized")

        handlers = {AudioChunk: lambda m: audio(m.pcm, m.is_final), Finalize: finalize, CloseSession: close,
                    SessionInit: init_again}
        await self.read_frames(ws, handlers, on_bytes=audio, session_id=actor.session_id)
        scope.cancel()
