"""The reference node with --asr pocketsphinx transcribes real speech through the daemon.

tests/data/speech-en.wav was made with Debian's ``flite`` (voice ``rms``): "hello world, this is
a test", one second of silence, "the weather is good today", as 16 kHz mono s16le (sox). An
espeak-ng recording came first, but pocketsphinx heard its words only now and then ("test" or
"dust"), and a test that stands on one word it may mishear fails by chance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.reference.client import read_wav, stream_session
from scheduler.reference.node import translate_placeholder

from .helpers import start_node

pytestmark = pytest.mark.slow
WAV = Path(__file__).parent / "data" / "speech-en.wav"


def test_placeholder_translation_retags_the_source():
    assert translate_placeholder("[en] hello world", "en", "de") == "[de] hello world"
    assert translate_placeholder("hello world", "en", "de") == "[de] hello world"


async def test_pocketsphinx_node_transcribes_streamed_speech(start_daemon, nursery):
    pytest.importorskip("pocketsphinx")
    # node and daemon share this process here, and loading the model or decoding holds the
    # GIL for a while on a busy box: heartbeats every 2 s with a 30 s TTL, not the FAST 2 s
    daemon = await start_daemon(pause_ms=600, heartbeat_interval_ms=2000, node_ttl_ms=30_000)
    await start_node(nursery, daemon, node_id="asr-1", lang_pairs=(("en", "de"),), engine="pocketsphinx", delay_ms=0)
    pcm, rate = read_wav(str(WAV))
    transcript = await stream_session(daemon.ws_url, pcm, src_lang="en", tgt_langs=["de"], sample_rate=rate, fast=True)
    assert transcript.complete and not transcript.errors
    assert len(transcript.results) == 2  # two sentences, cut at the pause between them
    texts = [r.source_text or "" for r in transcript.results]
    assert all(r.status == "SUCCESS" for r in transcript.results), transcript.results
    # recognisable words of each sentence (pocketsphinx hears them all in the clean recording)
    assert len({"hello", "world", "this", "test"} & set(texts[0].split())) >= 3, texts
    assert len({"weather", "good", "today"} & set(texts[1].split())) >= 2, texts
    assert all(r.translations["de"].text == f"[de] {t}" for r, t in zip(transcript.results, texts, strict=True))
    # the node registered the engine it runs, not "fake"
    nodes = await daemon.scheduling.nodes_status()
    assert [n["capabilities"] for n in nodes if n["node_id"] == "asr-1"] == [{"engine": "pocketsphinx", "mt": "echo"}]
