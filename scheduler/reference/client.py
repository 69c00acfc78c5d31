"""Reference client: stream a WAV file to ``/v1/session`` and print what comes back.

Audio goes out as binary frames of ``chunk_ms`` at real-time pace (or as fast as the socket
takes it with ``fast``). At the end the client sends ``finalize`` and ``close_session`` and
waits for ``session_closed``, so every result of the file is printed before it exits. When
its daemon goes away it resumes the session on the next URL by itself (:func:`stream_session`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import wave
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from scheduler.protocol import (
    CloseSession,
    Error,
    Finalize,
    Result,
    SessionClosed,
    SessionInit,
    SessionReady,
    UtteranceFinalized,
    converter,
    encode,
    parse_from_daemon,
)


class WavError(ValueError):
    """The WAV file is not mono 16-bit PCM."""


def read_wav(path: str) -> tuple[bytes, int]:
    """(pcm, sample_rate) of a mono 16-bit PCM WAV file."""
    try:
        with wave.open(path, "rb") as w:
            if w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise WavError(f"{path}: need mono 16-bit PCM, got {w.getnchannels()} channel(s) of {8 * w.getsampwidth()} bits")
            return w.readframes(w.getnframes()), w.getframerate()
    except (wave.Error, EOFError) as exc:
        raise WavError(f"{path}: not a PCM WAV file ({exc})") from None


def write_wav(path: str, pcm: bytes, sample_rate: int = 16000) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)


@attrs.define
class Transcript:
    """Everything the daemon sent during one session, in arrival order."""

    session_id: str | None = None
    finalized: list[UtteranceFinalized] = attrs.Factory(list)
    results: list[Result] = attrs.Factory(list)
    errors: list[Error] = attrs.Factory(list)
    closed: SessionClosed | None = None
    latencies_ms: dict[int, float] = attrs.Factory(dict)
    _finalized_at: dict[int, float] = attrs.Factory(dict)

    def take(self, msg: Any, now: float) -> float | None:
        """Record one message that arrived at ``now``; returns a result's latency (ms) since
        its utterance was finalized, when known."""
        if isinstance(msg, UtteranceFinalized):
            self.finalized.append(msg)
            self._finalized_at[msg.utterance_index] = now
        elif isinstance(msg, Result):
            self.results.append(msg)
            if msg.utterance_index in self._finalized_at:
                latency = self.latencies_ms[msg.utterance_index] = (now - self._finalized_at[msg.utterance_index]) * 1000
                return latency
        elif isinstance(msg, Error):
            self.errors.append(msg)
        elif isinstance(msg, SessionClosed):
            self.closed = msg
        return None

    @property
    def next_result(self) -> int:
        """The index of the first result not received yet (results come in index order)."""
        return self.results[-1].utterance_index + 1 if self.results else 0

    @property
    def complete(self) -> bool:
        """session_closed seen and one result per utterance, in order (also across a resume)."""
        indexes = [r.utterance_index for r in self.results]
        return self.closed is not None and indexes == list(range(self.closed.utterances))


def _human(msg: Any, latency_ms: float | None) -> str:
    if isinstance(msg, Result):
        texts = " ".join(f"{lang}={t.status}:{t.text or t.error!s}" for lang, t in msg.translations.items())
        lat = f" latency_ms={latency_ms:.0f}" if latency_ms is not None else ""
        return f"result #{msg.utterance_index} {msg.status} reason={msg.reason} source={msg.source_text!r} {texts}{lat}"
    if isinstance(msg, UtteranceFinalized):
        return f"finalized #{msg.utterance_index} reason={msg.reason} audio_ms={msg.audio_ms} turn={msg.turn_id}"
    return f"{msg.TYPE} " + json.dumps(converter.unstructure(msg))


@attrs.define
class _Options:
    src_lang: str
    tgt_langs: list[str]
    sample_rate: int
    chunk_ms: int
    fast: bool
    out: Callable[[str], None] | None
    as_json: bool

    @property
    def chunk_bytes(self) -> int:
        return max(2, int(self.sample_rate * self.chunk_ms / 1000) * 2)


@attrs.define
class _Progress:
    """How far the audio got, across connections."""

    sent: int = 0  # bytes of pcm sent so far
    resume_at: int = 0  # where to start again after a break: the position when the last
    # utterance_finalized arrived (what came before it is in a finalized utterance)


async def stream_session(
    urls: str | Sequence[str],
    pcm: bytes,
    *,
    src_lang: str,
    tgt_langs: list[str],
    sample_rate: int = 16000,
    chunk_ms: int = 100,
    fast: bool = False,
    out: Callable[[str], None] | None = None,
    as_json: bool = False,
    reconnects: int = 5,
    backoff_s: float = 0.5,
) -> Transcript:
    """Run one session; returns its :class:`Transcript`. ``out`` gets one line per message.

    Resume: when the connection breaks, or the daemon closes the session with reason
    ``shutdown``, the client connects again (to the next of ``urls``, round robin, waiting
    ``backoff_s`` doubled each time, up to ``reconnects`` times) with ``session_id`` and
    ``resume_from`` (its next missing result), and sends the audio again from where it was
    when the last ``utterance_finalized`` arrived. Raises OSError when no daemon could be
    reached at all."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    opts = _Options(src_lang, list(tgt_langs), sample_rate, chunk_ms, fast, out, as_json)
    transcript, progress = Transcript(), _Progress()
    for attempt in range(reconnects + 1):
        url = urls[attempt % len(urls)].rstrip("/")
        url = url if url.endswith("/v1/session") else url + "/v1/session"
        try:
            if await _connection(url, pcm, transcript, progress, opts):
                return transcript
        except (OSError, HandshakeError) as exc:
            if transcript.session_id is None and attempt == reconnects:
                raise OSError(str(exc)) from exc
        if out:
            out(f"reconnecting (attempt {attempt + 1} of {reconnects})")
        await trio.sleep(backoff_s * 2 ** min(attempt, 4))
    return transcript


async def _connection(url: str, pcm: bytes, transcript: Transcript, progress: _Progress, opts: _Options) -> bool:
    """One connection of the session; True when it is over (closed, or refused), False to resume."""
    init = SessionInit(src_lang=opts.src_lang, tgt_langs=opts.tgt_langs, sample_rate=opts.sample_rate)
    if transcript.session_id is not None:
        init = attrs.evolve(init, session_id=transcript.session_id, resume_from=transcript.next_result)
    async with open_websocket_url(url) as ws:
        await ws.send_message(encode(init))
        ready = parse_from_daemon(await ws.get_message(), "client")
        if opts.out:
            opts.out(encode(ready) if opts.as_json else _human(ready, None))
        if isinstance(ready, Error):
            transcript.errors.append(ready)
            return True
        assert isinstance(ready, SessionReady)
        transcript.session_id = ready.session_id
        progress.sent = progress.resume_at
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_audio, ws, pcm, progress, opts)
            try:
                while True:
                    message = await ws.get_message()
                    msg = parse_from_daemon(message, "client")
                    if isinstance(msg, Result) and msg.utterance_index < transcript.next_result:
                        continue  # already had it
                    if isinstance(msg, UtteranceFinalized):
                        progress.resume_at = progress.sent
                    latency = transcript.take(msg, trio.current_time())
                    if opts.out:
                        opts.out(message if opts.as_json else _human(msg, latency))
                    if isinstance(msg, SessionClosed):
                        nursery.cancel_scope.cancel()
                        return msg.reason != "shutdown"  # the daemon stops: resume elsewhere
            except ConnectionClosed:
                nursery.cancel_scope.cancel()
                return False


async def _send_audio(ws: Any, pcm: bytes, progress: _Progress, opts: _Options) -> None:
    """Frames of ``chunk_bytes`` from ``progress.sent`` on, in real time (or as fast as
    possible), then finalize and close."""
    start, step = trio.current_time(), opts.chunk_bytes
    with contextlib.suppress(ConnectionClosed):  # the reader sees it too
        for n, offset in enumerate(range(progress.sent, len(pcm), step)):
            if not opts.fast:
                await trio.sleep_until(start + n * opts.chunk_ms / 1000)
            await ws.send_message(pcm[offset : offset + step])
            progress.sent = offset + len(pcm[offset : offset + step])
        await ws.send_message(encode(Finalize()))
        await ws.send_message(encode(CloseSession()))


def print_line(line: str, stream: TextIO = sys.stdout) -> None:
    print(line, file=stream, flush=True)
