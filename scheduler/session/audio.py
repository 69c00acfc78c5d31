"""PCM helpers: duration and a simple energy VAD (mono, signed 16-bit little-endian)."""

from __future__ import annotations

import numpy as np

FULL_SCALE = 32768.0
BYTES_PER_SAMPLE = 2


def pcm_ms(nbytes: int, sample_rate: int) -> float:
    """Duration in milliseconds of ``nbytes`` of 16-bit mono PCM."""
    return nbytes / BYTES_PER_SAMPLE * 1000.0 / sample_rate


def silence_threshold(silence_dbfs: float) -> float:
    """Mean-square level (in sample units squared) below which a frame is silent."""
    amplitude = FULL_SCALE * 10.0 ** (silence_dbfs / 20.0)
    return amplitude * amplitude


def is_silent(pcm: bytes, threshold_ms: float) -> bool:
    """True when the frame's RMS is below the threshold; empty and all-zero frames are silent.

    ``threshold_ms`` is the mean-square value from :func:`silence_threshold`. A trailing odd
    byte (half a sample) is ignored for the measurement, never dropped from the audio.
    """
    n = len(pcm) // BYTES_PER_SAMPLE
    if n == 0:
        return True
    samples = np.frombuffer(pcm, dtype="<i2", count=n).astype(np.float32)
    return float(np.dot(samples, samples)) / n < threshold_ms


def tone(ms: int, sample_rate: int = 16000, *, freq: float = 440.0, amplitude: float = 0.3) -> bytes:
    """A sine tone (speech stand-in) of ``ms`` milliseconds."""
    n = int(sample_rate * ms / 1000)
    t = np.arange(n, dtype=np.float64) / sample_rate
    return (np.sin(2 * np.pi * freq * t) * amplitude * (FULL_SCALE - 1)).astype("<i2").tobytes()


def silence(ms: int, sample_rate: int = 16000) -> bytes:
    return bytes(int(sample_rate * ms / 1000) * BYTES_PER_SAMPLE)
