"""Client gateway: one ``/v1/session`` WebSocket -> one session, transport only.

Per connection: wait for a ``session_init`` the session lifecycle admits (a non-fatal error
leaves the socket open for a corrected one), let it open the session (session/lifecycle.py:
admitting, opening or resuming, holding and releasing a session live there), then run three
things in the connection's nursery: the reader (frames -> typed events -> actor inbox), the
writer (actor outbox -> journal -> socket) and the actor itself. Bad frames get an ``error``
and touch nothing else. The connection ends when the actor ends (close, idle, shutdown),
when the client disconnects (the actor is cancelled and cleans up), or on a fatal error.
"""
from __future__ import annotations

import logging
from typing import Any

import trio

from scheduler.cluster import journal
from scheduler.edge import wsutil
from scheduler.edge.ratelimit import AudioPacer
from scheduler.edge.wsconn import ServerWebSocket
from scheduler.ops.logs import event
from scheduler.protocol import (
    BAD_MESSAGE,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    SLOW_CONSUMER,
    AudioChunk,
    CloseSession,
    Encoded,
    Finalize,
    ProtocolError,
    Result,
    SessionInit,
    SessionReady,
    parse_client,
)
from scheduler.session.actor import SessionActor, SlowClient
from scheduler.session.admission import AdmissionControl
from scheduler.session.audio import BYTES_PER_SAMPLE
from scheduler.session.events import AudioIn, CloseIn, FinalizeIn
from scheduler.session.lifecycle import OpenSession, SessionLifecycle

log = logging.getLogger("scheduler.client_gateway")

WRITE_BATCH = 64
PACE_BURST_S = 10.0  # audio a client may send at once before --max-realtime-factor paces it


class ClientGateway(wsutil.Gateway):
    side = "client"
    parse = staticmethod(parse_client)

    def __init__(self, *, admission: AdmissionControl, **deps: Any) -> None:
        super().__init__(**deps)
        self.lifecycle = SessionLifecycle(admission=admission, **deps)

    async def handle(self, ws: ServerWebSocket, presented: str | None = None) -> None:
        """Serve one client connection; ``presented`` is the API key its handshake carried
        (``Authorization: Bearer`` or the bearer subprotocol: edge/handshake.py), if any.
        Admitting, opening, holding and releasing the session: session/lifecycle.py."""
        peer = wsutil.peer(ws)
        admission = await self.first_message(ws, peer, lambda message: self.lifecycle.admit(message, presented))
        if admission is None:
            return
        with admission.slot:  # this connection's place (session/admission.py), until it ends
            try:
                opened = await self.lifecycle.open(admission)
            except ProtocolError as err:  # (Redis unavailable)
                await wsutil.send_error(ws, err)
                return
            await self.lifecycle.hold(opened, peer, lambda session: self._serve(ws, session, peer))

    async def _serve(self, ws: ServerWebSocket, opened: OpenSession, peer: str) -> str:
        """``session_ready``, the results a resume sends again and what it is owed, then the
        session's frames both ways until it ends; returns why it ended."""
        actor = opened.actor
        await wsutil.send(ws, SessionReady(session_id=actor.session_id, resumed=opened.resumed is not None,
                                           next_utterance_index=actor.next_index, limits=self.settings.limits,
                                           resume_token=opened.admission.token))
        if opened.resumed is not None:
            for text in opened.replay():
                await wsutil.send(ws, Encoded(Result.TYPE, text))
            if opened.owed:
                await self.lifecycle.recover_owed(actor)
        return await self._run(ws, actor, opened.writer, peer)

    async def _run(self, ws: ServerWebSocket, actor: SessionActor, writer: journal.Journal, peer: str) -> str:
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

    async def _write(self, ws: ServerWebSocket, actor: SessionActor, writer: journal.Journal, peer: str) -> None:
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

    async def _reader(self, ws: ServerWebSocket, actor: SessionActor, scope: trio.CancelScope, peer: str) -> None:
        """Client frames into the session's backlog, until the client goes away or is refused
        fatally; then the connection's nursery ends."""

        pacer = AudioPacer(self.settings.max_realtime_factor, PACE_BURST_S)
        bytes_per_s = actor.sample_rate * BYTES_PER_SAMPLE

        async def audio(pcm: bytes, is_final: bool = False) -> None:
            waited = await pacer.take(len(pcm) / bytes_per_s)  # faster than --max-realtime-factor: read more slowly
            if waited:
                self._metrics.audio_paced_seconds_total.inc(waited)
                if pacer.paced_s == waited:  # the first time
                    self._metrics.sessions_paced_total.inc()
                    event(log, "client_paced", session_id=actor.session_id, factor=self.settings.max_realtime_factor)
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
