"""Reference client: stream a WAV file to ``/v1/session`` and print what comes back.

Audio goes out as binary frames of ``chunk_ms`` at real-time pace (or as fast as the socket
takes it with ``fast``). At the end the client sends ``finalize`` and ``close_session`` and
waits for ``session_closed``, so every result of the file is printed before it exits. When
its daemon goes away it resumes the session on the next URL by itself: it is built on the
client library, :mod:`scheduler.client`.
"""

from __future__ import annotations

import json
import ssl
import sys
import wave
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attrs
import trio

from scheduler.client import Session, SessionFailed, connect
from scheduler.protocol import Error, Result, SessionClosed, SessionReady, UtteranceFinalized, converter, encode


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
        """session_closed seen and one result per utterance, in order (also across a resume)."""
        indexes = [r.utterance_index for r in self.results]
        return self.closed is not None and indexes == list(range(self.closed.utterances))


def _human(msg: Any, latency_ms: float | None, src_lang: str = "src") -> str:
    if isinstance(msg, Result):
        return human_result(msg, latency_ms, src_lang)
    if isinstance(msg, UtteranceFinalized):
        return f"finalized #{msg.utterance_index} reason={msg.reason} audio_ms={msg.audio_ms} turn={msg.turn_id}"
    return f"{msg.TYPE} " + json.dumps(converter.unstructure(msg))


def human_result(msg: Result, latency_ms: float | None, src_lang: str) -> str:
    """One line: the transcript and each translation side by side, then the latency from
    ``utterance_finalized`` and the cut (``#0 SUCCESS  en: hello  |  es: hola  (812 ms, pause)``)."""
    sides = [f"{src_lang}: {msg.source_text or ''}"]
    for lang, t in msg.translations.items():
        sides.append(f"{lang}: {t.text}" if t.status == "SUCCESS" else f"{lang}: {t.status} {t.error or ''}".rstrip())
    latency = f"{latency_ms:.0f} ms, " if latency_ms is not None else ""
    return f"#{msg.utterance_index} {msg.status}  " + "  |  ".join(sides) + f"  ({latency}{msg.reason})"


@attrs.define
class _Options:
    sample_rate: int
    chunk_ms: int
    fast: bool
    out: Callable[[str], None] | None
    as_json: bool
    src_lang: str = "src"

    @property
    def chunk_bytes(self) -> int:
        return max(2, int(self.sample_rate * self.chunk_ms / 1000) * 2)


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
    api_key: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Transcript:
    """Run one session with :func:`scheduler.client.connect`; returns its :class:`Transcript`.
    ``out`` gets one line per message. The library resumes on the next of ``urls`` when the
    connection breaks or the daemon shuts down. A refusal (an ``error`` at ``session_init``)
    ends up in ``transcript.errors``; raises OSError when no daemon could be reached at all."""
    opts = _Options(sample_rate, chunk_ms, fast, out, as_json, src_lang)
    transcript = Transcript()
    try:
        async with connect(urls, src_lang=src_lang, tgt_langs=tgt_langs, sample_rate=sample_rate, api_key=api_key,
                           ssl_context=ssl_context, reconnects=reconnects, backoff_s=backoff_s) as session:
            transcript.session_id = session.session_id
            _show(opts, session.ready)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_audio, session, pcm, opts)
                async for msg in session:
                    _show(opts, msg, transcript.take(msg, trio.current_time()))
                nursery.cancel_scope.cancel()
    except SessionFailed as exc:
        if exc.error is not None:
            transcript.errors.append(exc.error)
            _show(opts, exc.error)
        elif transcript.session_id is None:
            raise OSError(str(exc)) from exc
        elif out:
            out(f"session lost: {exc}")
    return transcript


HIDDEN = "(kept, not shown)"


def _show(opts: _Options, msg: Any, latency_ms: float | None = None) -> None:
    if isinstance(msg, SessionReady) and msg.resume_token:  # a secret: whoever has it can take the session over
        msg = attrs.evolve(msg, resume_token=HIDDEN)
    if opts.out:
        opts.out(encode(msg) if opts.as_json else _human(msg, latency_ms, opts.src_lang))


async def _send_audio(session: Session, pcm: bytes, opts: _Options) -> None:
    """Frames of ``chunk_bytes`` in real time (or as fast as possible), then finalize and close."""
    start, step = trio.current_time(), opts.chunk_bytes
    for n, offset in enumerate(range(0, len(pcm), step)):
        if not opts.fast:
            await trio.sleep_until(start + n * opts.chunk_ms / 1000)
        await session.send_audio(pcm[offset : offset + step])
    await session.finalize()
    await session.close()


def print_line(line: str, stream: TextIO = sys.stdout) -> None:
    print(line, file=stream, flush=True)
