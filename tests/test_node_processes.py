"""Nodes as real processes against a real daemon: SIGTERM drains the reference node, the
twenty-line example of docs/examples/ runs as it is, and real speech becomes real Spanish.

``apertium`` (the fixture) installs Debian's apertium and apertium-eng-spa with apt-get when
they are missing and we are root, as on CI; elsewhere the Apertium tests skip with the reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from scheduler.reference import mt
from scheduler.reference.client import read_wav, stream_session

from .conftest import apt_install
from .helpers import session, speak

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "http_node.py"
WAV = Path(__file__).parent / "data" / "speech-en.wav"


async def node_process(args: list[str], log: Path, env: dict | None = None) -> trio.Process:
    with log.open("wb") as out:
        return await trio.lowlevel.open_process(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env={**os.environ, **(env or {})}, cwd=ROOT)


async def registered(daemon, node_id: str, proc: trio.Process, log: Path) -> None:
    with trio.fail_after(30):
        while node_id not in daemon.nodes:
            assert proc.poll() is None, log.read_text()
            await trio.sleep(0.05)


async def holds_a_job(daemon, node_id: str) -> None:
    with trio.fail_after(10):
        while not [n for n in await daemon.scheduling.nodes_status() if n["node_id"] == node_id and n["current_jobs"]]:
            await trio.sleep(0.02)


async def exit_code(proc: trio.Process, log: Path, within_s: float = 15) -> int:
    with trio.fail_after(within_s):
        while proc.poll() is None:
            await trio.sleep(0.05)
    return proc.returncode


def events(log: Path) -> list[str]:
    return [json.loads(line).get("event", "") for line in log.read_text().splitlines() if line.startswith("{")]


async def test_sigterm_drains_the_reference_node(daemon, tmp_path):
    log = tmp_path / "node.log"
    proc = await node_process([sys.executable, "-m", "scheduler", "node", "--url", daemon.ws_url, "--node-id", "p1",
                               "--lang-pair", "en:es", "--delay-ms", "1500", "--max-jobs", "2"], log)
    try:
        await registered(daemon, "p1", proc, log)
        async with session(daemon, src="en", tgts=("es",)) as p:
            await speak(p)
            await p.send(type="finalize")
            await holds_a_job(daemon, "p1")
            proc.send_signal(signal.SIGTERM)  # mid-job: the node drains, answers it, leaves
            result, _ = await p.recv_until("result")
        assert result["translations"]["es"]["status"] == "SUCCESS", result
        assert result["translations"]["es"]["text"].startswith("[es] 300ms crc32="), result
        assert await exit_code(proc, log) == 0, log.read_text()
    finally:
        proc.kill()
    seen = events(log)
    assert seen.index("node_stop_requested") < seen.index("node_draining") < seen.index("node_stopped"), seen
    assert "p1" not in daemon.nodes


class ModelServer(ThreadingHTTPServer):
    """A stand-in for an engine owner's HTTP model server: the transcript says how much
    audio came, the translation is fixed."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N802, N805
                body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
                self.requests.append(body)
                pcm = base64.b64decode(body["audio"])
                answer = json.dumps({"transcript": f"{len(pcm) // 2} samples", "translation": f"hola ({body['tgt']})"})
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.end_headers()
                handler.wfile.write(answer.encode())

            def log_message(handler, *args) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def model_server():
    server = ModelServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_the_twenty_line_example_node_answers_through_its_model_server(daemon, tmp_path, model_server):
    lines = [line for line in EXAMPLE.read_text().split('"""', 2)[2].splitlines() if line.strip()]
    assert len(lines) <= 20, len(lines)  # its code, after the docstring
    help_text = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert help_text.returncode == 0 and "--token-file" in help_text.stdout and "$MODEL_URL" in help_text.stdout
    log = tmp_path / "example.log"
    url = f"http://127.0.0.1:{model_server.server_address[1]}/translate"
    proc = await node_process([sys.executable, str(EXAMPLE), "--url", daemon.ws_url, "--node-id", "example"], log,
                              env={"MODEL_URL": url})
    try:
        await registered(daemon, "example", proc, log)
        async with session(daemon, src="en", tgts=("es",)) as p:
            await speak(p)
            await p.send(type="finalize")
            result, _ = await p.recv_until("result")
        assert result["source_text"] == "4800 samples" and result["translations"]["es"]["text"] == "hola (es)", result
        assert [(r["src"], r["tgt"], r["sample_rate"]) for r in model_server.requests] == [("en", "es", 16000)]
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, log) == 0, log.read_text()
    finally:
        proc.kill()


def test_apertium_missing_exits_with_the_line_that_installs_it(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").symlink_to(sys.executable)  # a PATH with no apertium on it
    done = subprocess.run([sys.executable, "-m", "scheduler", "node", "--mt", "apertium"],  # (its default pair: en:es)
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PATH": str(bare)}, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines()[-1] == (
        "scheduler node: --mt apertium needs Debian's Apertium: apt-get install apertium apertium-eng-spa"), done.stderr


@pytest.fixture(scope="session")
def apertium():
    """Debian's apertium with its English-Spanish pair (apt-get as root when missing)."""
    binary = shutil.which("apertium")
    if binary is None or "eng-spa" not in mt.installed_modes(binary):
        apt_install("apertium", "apertium-eng-spa")
        binary = shutil.which("apertium")
    if binary is None or "eng-spa" not in mt.installed_modes(binary):
        pytest.skip("needs Debian's apertium and apertium-eng-spa (apt-get install apertium apertium-eng-spa); "
                    "CI installs them as root")
    return binary


def test_apertium_translates_english_into_spanish(apertium):
    done = subprocess.run(mt.command(apertium, "en", "es"), input="the weather is good today", capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "El tiempo es bien hoy", done


async def test_speech_becomes_spanish_through_pocketsphinx_and_apertium(start_daemon, nursery, apertium):
    pytest.importorskip("pocketsphinx")
    from scheduler.reference.node import NodeOptions, ReferenceNode

    # as in test_asr_node: decoding holds the GIL of this shared process for a while
    daemon = await start_daemon(pause_ms=600, heartbeat_interval_ms=2000, node_ttl_ms=30_000)
    node = ReferenceNode(NodeOptions(url=daemon.ws_url, node_id="es-1", lang_pairs=(("en", "es"),), engine="pocketsphinx",
                                     mt="apertium", delay_ms=0, reconnect=False))
    await nursery.start(node.run)
    pcm, rate = read_wav(str(WAV))
    transcript = await stream_session(daemon.ws_url, pcm, src_lang="en", tgt_langs=["es"], sample_rate=rate, fast=True)
    assert transcript.complete and not transcript.errors and len(transcript.results) == 2, transcript
    for result in transcript.results:  # each translation is Apertium's Spanish for the transcript beside it
        assert result.status == "SUCCESS" and result.source_text, result
        expected = subprocess.run(mt.command(apertium, "en", "es"), input=result.source_text, capture_output=True,
                                  text=True, timeout=60).stdout.strip()
        assert result.translations["es"].text == expected, (result.source_text, result.translations["es"].text)
    assert any(r.translations["es"].text != r.source_text for r in transcript.results)  # really another language
