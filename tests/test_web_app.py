"""The web client (``/app`` on the admin port) in a real headless Chromium with a fake
microphone playing a recorded voice (``tests/data/speech-en.wav``), against a daemon with a pocketsphinx node:
AudioWorklet capture and resampling to 16 kHz, 100 ms frames, results in order, SUCCESS,
recognisable words.

Chromium is driven through its DevTools protocol (a WebSocket, spoken with trio-websocket):
the test reads the page's table until the session is closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from scheduler.reference.client import read_wav

from .helpers import BROWSER_FLAGS, start_node

pytestmark = pytest.mark.slow
WAV = Path(__file__).parent / "data" / "speech-en.wav"
SPOKEN = {"hello", "world", "this", "is", "test", "weather", "good", "today"}
"""The words of the recording; pocketsphinx hears all eight in it, and 7 or 8 of them in 20 copies
run through the worklet's resampling at 44.1 and 48 kHz with random offsets, gains and noise."""

READ_PAGE = """JSON.stringify({
  state: document.body.dataset.state || "",
  frames: Number(document.body.dataset.frames || 0), peak_dbfs: Number(document.body.dataset.peakDbfs || -120),
  note: document.getElementById("note").textContent,
  rows: [...document.querySelectorAll("#rows tr")].map((tr) => ({
    index: Number(tr.dataset.index), status: tr.dataset.status || "", cut: tr.cells[1].textContent,
    source: tr.cells[3].textContent, translations: tr.cells[4].textContent, latency: tr.cells[5].textContent})),
})"""


async def _devtools_port(profile: Path) -> int:
    """Chromium writes the port it chose for --remote-debugging-port=0 into its profile."""
    with trio.fail_after(30):
        while not (profile / "DevToolsActivePort").exists() or not (profile / "DevToolsActivePort").read_text().strip():
            await trio.sleep(0.1)
    return int((profile / "DevToolsActivePort").read_text().split()[0])


async def _page_socket(port: int) -> str:
    def targets() -> list[dict]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
            return json.loads(resp.read())

    with trio.fail_after(20):
        while True:
            pages = [t for t in await trio.to_thread.run_sync(targets) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            await trio.sleep(0.2)


async def test_web_app_streams_the_microphone_and_shows_ordered_transcripts(start_daemon, nursery, chromium, tmp_path):
    pytest.importorskip("pocketsphinx")
    recording, rate = read_wav(str(WAV))
    seconds = len(recording) / 2 / rate
    # the pocketsphinx node shares this process (and the GIL) with the daemon: a long TTL
    daemon = await start_daemon(pause_ms=600, heartbeat_interval_ms=2000, node_ttl_ms=30_000)
    node = await start_node(nursery, daemon, node_id="asr-web", lang_pairs=(("en", "de"),), engine="pocketsphinx", delay_ms=0)
    heard = _keep_job_audio(node)
    audio = tmp_path / "mic.wav"
    shutil.copy(WAV, audio)
    profile = tmp_path / "profile"
    url = f"http://127.0.0.1:{daemon.admin_port}/app?autostart=1&src=en&tgt=de&seconds={seconds + 1.5:.1f}"
    cmd = [chromium, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
           "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
           f"--use-file-for-fake-audio-capture={audio}%noloop", "--autoplay-policy=no-user-gesture-required", url]
    with open(tmp_path / "chromium.log", "wb") as log:  # its own process group: killed whole, helpers too
        proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=log, start_new_session=True)
    try:
        port = await _devtools_port(profile)
        async with open_websocket_url(await _page_socket(port)) as cdp:
            page = await _read_until_closed(cdp, timeout=seconds + 45)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    rows = page["rows"]
    assert page["state"] == "closed" and "client_close" in page["note"], page
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) >= 2, page
    assert all(r["status"] == "SUCCESS" for r in rows), page
    words = " ".join(r["source"] for r in rows).split()
    assert len(SPOKEN & set(words)) >= 5, page  # the recording's words, heard through the page's resampler
    assert all(r["translations"].startswith("de: [de] ") for r in rows), page
    assert all(r["latency"].endswith(" ms") for r in rows), page
    # the worklet's 16 kHz is the recording again: each half second of speech lines up with a
    # stretch of it. Windows, not whole utterances: a loaded box can make Chromium's fake capture
    # drop or insert a block, which shifts the rest of that utterance (one window is then lost, a
    # whole-utterance match falls to ~0.7). A rate error of 0.2 % already fails half the windows.
    matches = [round(m, 3) for pcm in heard for m in _window_matches(pcm, recording)]
    assert len(heard) == len(rows) and len(matches) >= 6, (len(heard), matches)
    assert sum(m > 0.9 for m in matches) >= 0.75 * len(matches), matches  # a 1 % rate error: none


def _keep_job_audio(node) -> list[bytes]:
    """Wrap the node's engine so the test keeps every job's audio (16 kHz s16le from the page)."""
    heard: list[bytes] = []
    transcribe = node.engine.transcribe

    async def keep(pcm: bytes, sample_rate: int, src_lang: str) -> str:
        assert sample_rate == 16000
        heard.append(pcm)
        return await transcribe(pcm, sample_rate, src_lang)

    node.engine.transcribe = keep
    return heard


def _window_matches(pcm: bytes, recording: bytes, window: int = 8000) -> list[float]:
    """Each voiced half second of an utterance: its normalised correlation with the stretch of the
    recording it matches best (each window finds its own stretch)."""
    import numpy as np

    x = np.frombuffer(recording, "<i2").astype(float)
    y = np.frombuffer(pcm, "<i2").astype(float)
    n = 1 << (len(x) + window).bit_length()
    spectrum = np.fft.rfft(x, n)
    energy = np.concatenate(([0.0], np.cumsum(x**2)))
    norms = np.sqrt(np.maximum(energy[window:] - energy[:-window], 0.0))  # |x[o : o + window]|
    out = []
    for start in range(0, len(y) - window + 1, window):
        w = y[start : start + window]
        if np.sqrt((w**2).mean()) < 300:  # silence (about -40 dBFS): nothing to line up
            continue
        dots = np.fft.irfft(spectrum * np.conj(np.fft.rfft(w, n)), n)[: len(norms)]  # x[o : o + window] . w
        out.append(float((dots / (norms * np.sqrt((w**2).sum()) + 1e-3)).max()))
    return out


async def _read_until_closed(cdp, timeout: float) -> dict:
    """Evaluate READ_PAGE every 0.5 s until the page's session is closed."""
    page: dict = {}
    with trio.move_on_after(timeout):
        for n in range(1, 10_000):
            await cdp.send_message(json.dumps({"id": n, "method": "Runtime.evaluate",
                                               "params": {"expression": READ_PAGE, "returnByValue": True}}))
            while True:
                reply = json.loads(await cdp.get_message())
                if reply.get("id") == n:
                    break
            value = reply.get("result", {}).get("result", {}).get("value")
            if value:
                page = json.loads(value)
                if page["state"] == "closed":
                    return page
            await trio.sleep(0.5)
    return page
