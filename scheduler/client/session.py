"""One client session over ``/v1/session`` that outlives its connections (see the package docstring)."""

from __future__ import annotations

import base64
import collections
import contextlib
import random
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

from scheduler.protocol import (
    SUBPROTOCOL,
    AudioChunk,
    CloseSession,
    Error,
    Finalize,
    Result,
    SessionClosed,
    SessionInit,
    SessionReady,
    UtteranceFinalized,
    bearer_subprotocol,
    encode,
    parse_from_daemon,
)

MESSAGES_BUFFER = 256
"""Messages received and not yet iterated; past it the client stops reading its socket."""


class SessionFailed(ConnectionError):
    """No daemon could take the session (again) within the reconnect budget, or one refused it."""

    def __init__(self, message: str, error: Error | None = None) -> None:
        super().__init__(message)
        self.error = error


class _TryAgain(Exception):
    """The daemon refused for now (``SERVER_FULL``, ``UNAVAILABLE``) and said when to try again."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.retry_after_s = (error.retry_after_ms or 0) / 1000


TRY_AGAIN_CODES = ("SERVER_FULL", "UNAVAILABLE", "SHUTTING_DOWN")  # (SHUTTING_DOWN: another instance, or worker, next)


@attrs.define
class _Kept:
    """Audio sent since the last ``utterance_finalized``: what a resume sends again."""

    limit: int
    frames: collections.deque[tuple[bytes, bool]] = attrs.Factory(collections.deque)
    nbytes: int = 0

    def add(self, pcm: bytes, is_final: bool) -> None:
        self.frames.append((pcm, is_final))
        self.nbytes += len(pcm)
        while self.nbytes > self.limit and len(self.frames) > 1:
            self.nbytes -= len(self.frames.popleft()[0])

    def clear(self) -> None:
        self.frames.clear()
        self.nbytes = 0


class Session:
    """Made by :func:`connect`; iterate it for the daemon's messages (``utterance_finalized``,
    ``result``, ``busy``, ``error``, ``session_closed``, and ``session_ready`` after each
    resume) as typed objects, or :meth:`results` for the results alone. Iteration ends after
    ``session_closed``; it raises :class:`SessionFailed` if the session was lost for good."""

    def __init__(self, urls: list[str], init: SessionInit, *, api_key: str | None, ssl_context: ssl.SSLContext | None,
                 reconnects: int, backoff_s: float, keep_s: float) -> None:
        self._urls = urls
        self._init = init
        self._protocols = [SUBPROTOCOL] + ([bearer_subprotocol(api_key)] if api_key else [])
        self._ssl = ssl_context
        self._reconnects = reconnects
        self._backoff_s = backoff_s
        self._kept = _Kept(int(keep_s * init.sample_rate * 2))
        self._send, self._receive = trio.open_memory_channel[Any](MESSAGES_BUFFER)
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._failed: SessionFailed | None = None
        self._finishing = False
        self.session_id: str | None = None
        self._resume_token: str | None = None  # from the first session_ready; never logged or shown
        self.ready: SessionReady | None = None
        self.next_result = 0  # results arrive in index order: the first one not received yet
        self.resumes = 0
        self._ready_seen = False

    # ------------------------------------------------------------ sending

    async def send_audio(self, pcm: bytes, *, is_final: bool = False) -> None:
        """One frame of s16le PCM at the session's sample rate (``is_final``: cut after it).
        Waits while the session is reconnecting; raises :class:`SessionFailed` if it cannot."""
        self._kept.add(pcm, is_final)
        await self._send_now(pcm, is_final)

    async def finalize(self) -> None:
        await self._send_text(encode(Finalize()))

    async def close(self) -> None:
        """close_session: no more audio. The daemon sends what it owes, then ``session_closed``
        (after which iteration ends)."""
        self._finishing = True
        await self._send_text(encode(CloseSession()))

    async def _send_now(self, pcm: bytes, is_final: bool) -> None:
        ws = await self._connection()
        with contextlib.suppress(ConnectionClosed):  # the reader notices and resumes; the frame is kept
            await ws.send_message(_frame(pcm, is_final))

    async def _send_text(self, text: str) -> None:
        ws = await self._connection()
        with contextlib.suppress(ConnectionClosed):
            await ws.send_message(text)

    async def _connection(self) -> WebSocketConnection:
        while True:
            if self._failed is not None:
                raise self._failed
            if self._ws is not None and self._connected.is_set():
                return self._ws
            await self._connected.wait()

    # ------------------------------------------------------------ receiving

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        async for msg in self._receive:
            yield msg
        if self._failed is not None:
            raise self._failed

    async def results(self) -> AsyncIterator[Result]:
        """The ``result`` messages alone, in index order, each once (also across resumes)."""
        async for msg in self:
            if isinstance(msg, Result):
                yield msg

    # ------------------------------------------------------------ the connection loop

    async def _run(self) -> None:
        """Connect, and connect again (the next URL, round robin, after a backoff doubling from
        ``backoff_s``) whenever the connection breaks or the daemon closes the session for a
        shutdown, until ``session_closed``, a refusal, or ``reconnects`` failures in a row. A
        daemon that is full, cannot reach Redis or is stopping (``SERVER_FULL``, ``UNAVAILABLE``,
        ``SHUTTING_DOWN``) says when to try again: the next URL is tried after its ``retry_after_ms`` (with jitter: 0.8-1.2
        times it, so refused clients do not all come back at once), as one more failure."""
        async with self._send:
            tries = failures = 0
            while True:
                url = self._urls[tries % len(self._urls)]
                tries += 1
                self._ready_seen = False
                wait: float | None = None  # (the daemon's retry_after_ms, when it said one)
                try:
                    if await self._one_connection(url):
                        return
                    why = "connection lost"
                except SessionFailed as exc:
                    self._fail(exc)
                    return
                except _TryAgain as exc:
                    why, wait = str(exc), exc.retry_after_s * random.uniform(0.8, 1.2)
                except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                failures = 1 if self._ready_seen else failures + 1
                if failures > self._reconnects:
                    self._fail(SessionFailed(f"no daemon took the session after {failures} attempts ({why})"))
                    return
                await trio.sleep(self._backoff_s * 2 ** min(failures - 1, 4) if wait is None else wait)

    def _fail(self, exc: SessionFailed) -> None:
        self._failed = exc
        self._connected.set()  # wake senders: they raise

    async def _one_connection(self, url: str) -> bool:
        """True when the session is over; False to resume on the next URL."""
        init = self._init
        if self.session_id is not None:
            init = attrs.evolve(init, session_id=self.session_id, resume_from=self.next_result, resume_token=self._resume_token)
        async with open_websocket_url(url, ssl_context=self._ssl, subprotocols=self._protocols) as ws:
            await ws.send_message(encode(init))
            ready = parse_from_daemon(await ws.get_message(), "client")
            if isinstance(ready, Error):
                if ready.code in TRY_AGAIN_CODES and ready.retry_after_ms is not None:
                    raise _TryAgain(ready)
                raise SessionFailed(f"{ready.code}: {ready.message}", ready)
            assert isinstance(ready, SessionReady)
            if self.session_id is not None:
                self.resumes += 1
                await self._send.send(ready)  # resumed: the caller sees it in the message stream
            self.session_id, self.ready = ready.session_id, ready
            self._resume_token = ready.resume_token or self._resume_token  # the session's secret: presented on every resume
            self._ready_seen = True
            for pcm, is_final in list(self._kept.frames):  # what the daemon may not have
                await ws.send_message(_frame(pcm, is_final))
            if self._finishing:
                await ws.send_message(encode(CloseSession()))
            self._ws = ws
            self._connected.set()
            try:
                return await self._read(ws)
            finally:
                self._ws = None
                self._connected = trio.Event()

    async def _read(self, ws: WebSocketConnection) -> bool:
        try:
            while True:
                msg = parse_from_daemon(await ws.get_message(), "client")
                if isinstance(msg, Result):
                    if msg.utterance_index < self.next_result:
                        continue  # re-sent after a resume: had it
                    self.next_result = msg.utterance_index + 1
                elif isinstance(msg, UtteranceFinalized):
                    self._kept.clear()
                elif isinstance(msg, SessionClosed) and msg.reason == "shutdown":
                    return False  # the daemon is draining: resume elsewhere
                await self._send.send(msg)
                if isinstance(msg, SessionClosed):
                    return True
        except ConnectionClosed:
            return False


def _frame(pcm: bytes, is_final: bool) -> bytes | str:
    """A binary frame, or ``audio_chunk`` when the frame carries ``is_final``."""
    return encode(AudioChunk(base64.b64encode(pcm).decode(), is_final=True)) if is_final else pcm


@asynccontextmanager
async def connect(urls: str | Sequence[str], *, src_lang: str, tgt_langs: Sequence[str], sample_rate: int = 16000,
                  api_key: str | None = None, ssl_context: ssl.SSLContext | None = None, reconnects: int = 5,
                  backoff_s: float = 0.5, keep_s: float = 30.0) -> AsyncIterator[Session]:
    """Open a session (waits for ``session_ready``; raises :class:`SessionFailed` if refused or
    unreachable) and keep it across broken connections and daemon shutdowns. Leaving the
    block closes the connection (send :meth:`Session.close` first for a clean end)."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    urls = [u.rstrip("/") if u.rstrip("/").endswith("/v1/session") else u.rstrip("/") + "/v1/session" for u in urls]
    session = Session(urls, SessionInit(src_lang=src_lang, tgt_langs=list(tgt_langs), sample_rate=sample_rate),
                      api_key=api_key, ssl_context=ssl_context, reconnects=reconnects, backoff_s=backoff_s, keep_s=keep_s)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._run)
            await session._connection()  # session_ready, or SessionFailed
            yield session
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # one error (the caller's, or SessionFailed): raise it as it is
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
