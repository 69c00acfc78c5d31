"""Speech engines of the reference node: ``fake`` (duration + CRC-32) and ``pocketsphinx``.

``pocketsphinx`` transcribes English with the model bundled in the ``pocketsphinx`` wheel
(no download at run time; install with ``pip install 'speech-scheduler[asr]'``). There is
no offline translation model, so the "translation" is a marked placeholder: the source text
tagged with the target language (``[de] hello world``). Decoding is CPU-bound: it runs in
worker threads, one decoder per thread, at most ``concurrency`` at once.
"""

from __future__ import annotations

import threading
import zlib

import numpy as np
import trio

from scheduler.session.audio import pcm_ms

ENGINES = ("fake", "pocketsphinx")
ASR_RATE = 16000


def fake_transcript(pcm: bytes, sample_rate: int, src_lang: str) -> str:
    return f"[{src_lang}] {pcm_ms(len(pcm), sample_rate):.0f}ms crc32={zlib.crc32(pcm):08x}"


def resample(pcm: bytes, rate: int, to: int = ASR_RATE) -> bytes:
    """Linear-interpolation resampling of 16-bit mono PCM (enough for the reference engine)."""
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    if rate == to or len(samples) == 0:
        return samples.astype("<i2").tobytes()
    n = int(len(samples) * to / rate)
    return np.interp(np.arange(n) * rate / to, np.arange(len(samples)), samples).astype("<i2").tobytes()


class PocketSphinx:
    def __init__(self, concurrency: int) -> None:
        try:
            from pocketsphinx import Decoder  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("the pocketsphinx engine needs: pip install 'speech-scheduler[asr]'") from exc
        self._limiter = trio.CapacityLimiter(concurrency)
        self._local = threading.local()

    def _decode(self, pcm: bytes, sample_rate: int) -> str:
        from pocketsphinx import Decoder

        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            decoder = self._local.decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")
        decoder.start_utt()
        decoder.process_raw(resample(pcm, sample_rate), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    async def transcribe(self, pcm: bytes, sample_rate: int, src_lang: str) -> str:
        return await trio.to_thread.run_sync(self._decode, pcm, sample_rate, limiter=self._limiter)


class Fake:
    async def transcribe(self, pcm: bytes, sample_rate: int, src_lang: str) -> str:
        return fake_transcript(pcm, sample_rate, src_lang)


def make_engine(name: str, concurrency: int) -> Fake | PocketSphinx:
    if name == "pocketsphinx":
        return PocketSphinx(concurrency)
    if name == "fake":
        return Fake()
    raise ValueError(f"unknown engine {name!r}; choose one of {ENGINES}")
