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

import hmac
import logging
import uuid

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from . import keys, wsutil
from .logs import event
from .protocol import (
    BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    NOT_INITIALIZED,
    UNAUTHORIZED,
    UNKNOWN_SESSION,
    UNSUPPORTED_LANG_PAIR,
    AudioChunk,
    CloseSession,
    Finalize,
    ProtocolError,
    Result,
    SessionInit,
    SessionReady,
    parse_client,
)
from .redis_adapter import RedisUnavailable
from .session import AudioIn, CloseIn, FinalizeIn, SessionActor, SlowClient

log = logging.getLogger("scheduler.client_gateway")


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The API key of an ``Authorization: Bearer KEY`` request header, if any."""
    for name, value in headers:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
    return None


class ClientGateway(wsutil.Gateway):
    side = "client"

    async def handle(self, ws: WebSocketConnection, headers: list[tuple[bytes, bytes]] = ()) -> None:
        """Serve one client connection; ``headers`` are its handshake request headers."""
        peer = wsutil.peer(ws)
        presented = _bearer(headers)
        init = await self.first_message(ws, peer, lambda message: self._accept_init(message, presented))
        if init is None:
            return
        session_id = uuid.uuid4().hex
        actor = SessionActor(
            session_id=session_id,
            src_lang=init.src_lang,
            tgt_langs=init.tgt_langs,
            sample_rate=init.sample_rate,
            settings=self.settings,
            jobs=self._dispatcher,
            metrics=self._metrics,
        )
        try:
            await self._redis.command(
                "HSET", keys.session(session_id), "owner", self.settings.instance_id, "src_lang", init.src_lang,
                "tgt_langs", ",".join(init.tgt_langs), "next_utterance_index", 0,
            )
            await self._redis.command("EXPIRE", keys.session(session_id), keys.KEY_TTL_S)
            await self._ownership.claim_session(session_id)
        except RedisUnavailable as exc:
            await wsutil.send_error(ws, ProtocolError("INTERNAL", f"redis unavailable: {exc}", fatal=True, close_code=1011))
            return
        self._sessions.add(actor)
        self._metrics.sessions_total.inc()
        event(log, "session_started", session_id=session_id, peer=peer, src_lang=init.src_lang,
              tgt_langs=",".join(init.tgt_langs), sample_rate=init.sample_rate)
        reason = "disconnected"
        try:
            await wsutil.send(ws, SessionReady(session_id=session_id, resumed=False, next_utterance_index=0,
                                               limits=self.settings.limits))
            reason = await self._run(ws, actor, peer)
        finally:
            self._sessions.remove(actor)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self._ownership.release_session(session_id)
            event(log, "session_ended", session_id=session_id, reason=reason, utterances=actor.next_index)

    async def _accept_init(self, message: str | bytes, presented_key: str | None) -> SessionInit:
        """The first frame must be a valid session_init (with an API key when keys are configured)
        for language pairs some pool serves."""
        if isinstance(message, bytes):
            raise ProtocolError(NOT_INITIALIZED, "send session_init before audio")
        msg = parse_client(message)
        if isinstance(msg, AudioChunk):
            raise ProtocolError(NOT_INITIALIZED, "send session_init before audio")
        if not isinstance(msg, SessionInit):
            raise ProtocolError(BAD_MESSAGE, f"expected session_init first, got {msg.TYPE}")
        keys_ = self.settings.api_keys
        if keys_:
            key = (presented_key or msg.api_key or "").encode()
            if not any(hmac.compare_digest(key, k.encode()) for k in keys_):
                raise ProtocolError(UNAUTHORIZED, "missing or unknown API key", fatal=True, close_code=CLOSE_POLICY)
        if msg.session_id is not None:
            raise ProtocolError(UNKNOWN_SESSION, f"session {msg.session_id} is not held by this daemon",
                                fatal=True, close_code=CLOSE_POLICY)
        await self._check_pairs(msg)
        return msg

    async def _check_pairs(self, init: SessionInit) -> None:
        missing = []
        for tgt in init.tgt_langs:
            try:
                if not await self._redis.command("EXISTS", keys.lang_pools(init.src_lang, tgt)):
                    missing.append(f"{init.src_lang}->{tgt}")
            except RedisUnavailable as exc:
                raise ProtocolError("INTERNAL", f"redis unavailable: {exc}", fatal=True, close_code=1011) from None
        if missing:
            raise ProtocolError(UNSUPPORTED_LANG_PAIR, f"no node pool serves {', '.join(missing)}",
                                fatal=True, close_code=CLOSE_POLICY)

    async def _run(self, ws: WebSocketConnection, actor: SessionActor, peer: str) -> str:
        async with trio.open_nursery() as nursery:
            writer_done = trio.Event()

            def on_sent(msg: object) -> None:
                if isinstance(msg, Result):
                    self._sessions.note_result(actor.session_id, msg)

            async def writer() -> None:
                try:
                    await wsutil.pump(ws, actor.outbox, peer, on_sent)
                finally:
                    writer_done.set()

            nursery.start_soon(writer)
            nursery.start_soon(self._reader, ws, actor, nursery.cancel_scope, peer)
            try:
                reason = await actor.run()
            except SlowClient as exc:
                event(log, "slow_client_closed", logging.WARNING, session_id=actor.session_id, detail=str(exc))
                nursery.cancel_scope.cancel()
                await wsutil.close(ws, CLOSE_POLICY, "SLOW_CONSUMER: client does not read its results")
                return "slow_client"
            with trio.move_on_after(wsutil.CLOSE_TIMEOUT * 2):
                await writer_done.wait()
            await wsutil.close(ws, CLOSE_GOING_AWAY if reason == "shutdown" else CLOSE_NORMAL, reason)
            nursery.cancel_scope.cancel()
            return reason
        return "disconnected"  # the reader cancelled the nursery: the client went away

    async def _reader(self, ws: WebSocketConnection, actor: SessionActor, scope: trio.CancelScope, peer: str) -> None:
        limit = self.settings.max_frame_bytes
        bucket = self.rate_limit()
        try:
            while True:
                await bucket.take()
                message = await ws.get_message()
                try:
                    wsutil.check_size(message, limit)
                    if isinstance(message, bytes):
                        await actor.put_client_event(AudioIn.of(message))
                        continue
                    msg = parse_client(message)
                    if isinstance(msg, AudioChunk):
                        await actor.put_client_event(AudioIn.of(msg.pcm, msg.is_final))
                    elif isinstance(msg, Finalize):
                        await actor.put_client_event(FinalizeIn())
                    elif isinstance(msg, CloseSession):
                        await actor.put_client_event(CloseIn("client_close"))
                    elif isinstance(msg, SessionInit):
                        raise ProtocolError(BAD_MESSAGE, "session already initialized")
                except ProtocolError as err:
                    await self.refuse(ws, err, session_id=actor.session_id)
                    if err.fatal:
                        scope.cancel()
                        return
        except (ConnectionClosed, trio.BrokenResourceError):
            scope.cancel()
