"""Reference client: stream a WAV file to ``/v1/session`` and print what comes back.

Audio goes out as binary frames of ``chunk_ms`` at real-time pace (or as fast as the socket
takes it with ``fast``). At the end the client sends ``finalize`` and ``close_session`` and
waits for ``session_closed``, so every result of the file is printed before it exits.
"""

from __future__ import annotations

import json
import sys
import wave
from collections.abc import Callable
from typing import Any, TextIO

import attrs
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

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
    def complete(self) -> bool:
        """session_closed seen and one result per finalized index, in order."""
        indexes = [r.utterance_index for r in self.results]
        return self.closed is not None and indexes == list(range(len(self.finalized)))


def _human(msg: Any, latency_ms: float | None) -> str:
    if isinstance(msg, Result):
        texts = " ".join(f"{lang}={t.status}:{t.text or t.error!s}" for lang, t in msg.translations.items())
        lat = f" latency_ms={latency_ms:.0f}" if latency_ms is not None else ""
        return f"result #{msg.utterance_index} {msg.status} reason={msg.reason} source={msg.source_text!r} {texts}{lat}"
    if isinstance(msg, UtteranceFinalized):
        return f"finalized #{msg.utterance_index} reason={msg.reason} audio_ms={msg.audio_ms} turn={msg.turn_id}"
    return f"{msg.TYPE} " + json.dumps(converter.unstructure(msg))


async def stream_session(
    url: str,
    pcm: bytes,
    *,
    src_lang: str,
    tgt_langs: list[str],
    sample_rate: int = 16000,
    chunk_ms: int = 100,
    fast: bool = False,
    out: Callable[[str], None] | None = None,
    as_json: bool = False,
) -> Transcript:
    """Run one session; returns its :class:`Transcript`. ``out`` gets one line per message."""
    url = url.rstrip("/")
    url = url if url.endswith("/v1/session") else url + "/v1/session"
    transcript = Transcript()
    chunk_bytes = max(2, int(sample_rate * chunk_ms / 1000) * 2)
    async with open_websocket_url(url) as ws:
        await ws.send_message(encode(SessionInit(src_lang=src_lang, tgt_langs=list(tgt_langs), sample_rate=sample_rate)))
        ready = parse_from_daemon(await ws.get_message(), "client")
        if isinstance(ready, Error):
            transcript.errors.append(ready)
            if out:
                out(_human(ready, None))
            return transcript
        assert isinstance(ready, SessionReady)
        transcript.session_id = ready.session_id
        if out:
            out(f"session_ready session_id={ready.session_id}" if not as_json else encode(ready))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_audio, ws, pcm, chunk_bytes, chunk_ms, fast)
            try:
                while True:
                    message = await ws.get_message()
                    msg = parse_from_daemon(message, "client")
                    latency = transcript.take(msg, trio.current_time())
                    if out:
                        out(message if as_json else _human(msg, latency))
                    if isinstance(msg, SessionClosed):
                        break
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()
    return transcript


async def _send_audio(ws: Any, pcm: bytes, chunk_bytes: int, chunk_ms: int, fast: bool) -> None:
    """Frames of ``chunk_bytes`` in real time (or as fast as possible), then finalize and close."""
    start = trio.current_time()
    for n, offset in enumerate(range(0, len(pcm), chunk_bytes)):
        if not fast:
            await trio.sleep_until(start + n * chunk_ms / 1000)
        await ws.send_message(pcm[offset : offset + chunk_bytes])
    await ws.send_message(encode(Finalize()))
    await ws.send_message(encode(CloseSession()))


def print_line(line: str, stream: TextIO = sys.stdout) -> None:
    print(line, file=stream, flush=True)
