"""The reference client (``scheduler client``, :func:`stream_session`) resumes by itself."""

from __future__ import annotations

import pytest
import trio

from scheduler.reference.client import stream_session
from scheduler.session.audio import silence, tone

from .helpers import start_node


def speech_with_pauses(n: int) -> bytes:
    """``n`` utterances of 300 ms of tone, each followed by 700 ms of silence."""
    return b"".join(tone(300, freq=300 + 50 * k) + silence(700) for k in range(n))


async def test_the_client_resumes_on_the_next_url_when_its_daemon_drains(start_daemon, nursery):
    a = await start_daemon(instance_id="a")
    b = await start_daemon(instance_id="b")
    await start_node(nursery, b, node_id="nb", delay_ms=20, max_jobs=4)
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        if line.startswith("finalized #1 "):
            a.shutdown()  # SIGTERM: a finishes what it holds, closes with reason shutdown

    transcript = await stream_session([a.ws_url, b.ws_url], speech_with_pauses(5), src_lang="zh", tgt_langs=["en"],
                                      out=out, backoff_s=0.05)
    assert transcript.complete, lines
    assert transcript.closed.reason == "client_close" and transcript.closed.utterances == 5, lines
    assert [r.utterance_index for r in transcript.results] == list(range(transcript.closed.utterances))
    assert all(r.status == "SUCCESS" for r in transcript.results), lines
    assert any("resumed" in line and '"resumed":true' in line.replace(" ", "") for line in lines), lines


async def test_a_client_that_reaches_no_daemon_says_so(nursery):
    try:
        with trio.fail_after(10):
            await stream_session(["ws://127.0.0.1:9"], bytes(3200), src_lang="zh", tgt_langs=["en"], reconnects=1,
                                 backoff_s=0.01)
    except OSError:
        return
    raise AssertionError("no OSError")


def test_a_result_prints_the_transcript_and_each_translation_side_by_side():
    from scheduler.protocol import Result, Translation
    from scheduler.reference.client import human_result

    result = Result(utterance_index=3, status="PARTIAL", reason="pause", turn_id="t", source_text="good morning",
                    translations={"es": Translation(status="SUCCESS", text="buenos días", node_id="n1"),
                                  "de": Translation(status="FAILED", error="NO_AVAILABLE_NODE")})
    assert human_result(result, 812.4, "en") == (
        "#3 PARTIAL  en: good morning  |  es: buenos días  |  de: FAILED NO_AVAILABLE_NODE  (812 ms, pause)")
    assert human_result(result, None, "en").endswith("(pause)")


@pytest.mark.parametrize("as_json", [False, True])
async def test_the_client_never_prints_the_resume_token(daemon, nursery, as_json):
    from scheduler.reference.client import HIDDEN, stream_session

    from .helpers import SPEECH_100MS, start_node

    await start_node(nursery, daemon, node_id="n1", delay_ms=0)
    lines: list[str] = []
    transcript = await stream_session(daemon.ws_url, SPEECH_100MS * 3, src_lang="zh", tgt_langs=["en"], fast=True,
                                      out=lines.append, as_json=as_json)
    assert transcript.complete
    ready = [line for line in lines if "session_ready" in line]
    assert len(ready) == 1 and HIDDEN in ready[0], lines
