"""The client library (:mod:`scheduler.client`) against real daemons: results as an async
iterator, a key in the handshake, a refusal, and a resume when the connection breaks."""

from __future__ import annotations

import pytest
import trio

from scheduler.client import SessionFailed, connect
from scheduler.protocol import Result, SessionClosed, SessionReady, UtteranceFinalized
from scheduler.session.audio import silence, tone

from .helpers import start_node

FRAME = 3200  # 100 ms at 16 kHz


def utterances(n: int) -> list[bytes]:
    """100 ms frames: ``n`` times 300 ms of tone, then 700 ms of silence."""
    pcm = b"".join(tone(300, freq=300 + 50 * k) + silence(700) for k in range(n))
    return [pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)]


async def feed(session, frames: list[bytes], pace: float = 0.0) -> None:
    for frame in frames:
        await session.send_audio(frame)
        await trio.sleep(pace)
    await session.finalize()
    await session.close()


async def test_results_in_order_with_a_key_in_the_subprotocol(start_daemon, nursery):
    daemon = await start_daemon(client_api_keys="k1")
    await start_node(nursery, daemon, node_id="n1", delay_ms=10, max_jobs=4)
    async with connect(daemon.ws_url, src_lang="zh", tgt_langs=["en"], api_key="k1") as session:
        assert session.ready.session_id == session.session_id
        nursery.start_soon(feed, session, utterances(3))
        results = [r async for r in session.results()]
    assert [r.utterance_index for r in results] == [0, 1, 2]
    assert all(r.status == "SUCCESS" for r in results)


async def test_a_refusal_raises_with_the_daemon_s_error(start_daemon):
    daemon = await start_daemon(client_api_keys="k1")
    with pytest.raises(SessionFailed) as info:
        async with connect(daemon.ws_url, src_lang="zh", tgt_langs=["en"], api_key="wrong"):
            raise AssertionError("not reached")
    assert info.value.error.code == "UNAUTHORIZED"
    with pytest.raises(SessionFailed):
        async with connect("ws://127.0.0.1:9", src_lang="zh", tgt_langs=["en"], reconnects=1, backoff_s=0.01):
            raise AssertionError("not reached")


async def test_a_broken_connection_resumes_on_the_next_url_with_each_result_once(start_daemon, nursery):
    a = await start_daemon(instance_id="a")
    b = await start_daemon(instance_id="b")
    await start_node(nursery, b, node_id="nb", delay_ms=10, max_jobs=4)
    seen: list[object] = []
    async with connect([a.ws_url, b.ws_url], src_lang="zh", tgt_langs=["en"], backoff_s=0.05) as session:
        nursery.start_soon(feed, session, utterances(4), 0.02)
        async for msg in session:
            seen.append(msg)
            if isinstance(msg, UtteranceFinalized) and msg.utterance_index == 1:
                a.shutdown()  # a drains: session_closed(shutdown), the library resumes on b
    results = [m for m in seen if isinstance(m, Result)]
    assert [r.utterance_index for r in results] == [0, 1, 2, 3]
    assert all(r.status == "SUCCESS" for r in results)
    assert session.resumes == 1 and any(isinstance(m, SessionReady) and m.resumed for m in seen)
    assert isinstance(seen[-1], SessionClosed) and seen[-1].reason == "client_close" and seen[-1].utterances == 4


async def test_a_draining_daemon_sends_the_client_to_the_next_url(start_daemon, nursery):
    """v1.6: SHUTTING_DOWN says when to try again; the library tries the next URL instead of
    giving the session up (a reload of a box: the next try may reach a live worker)."""
    a = await start_daemon(instance_id="a")
    b = await start_daemon(instance_id="b")
    await start_node(nursery, a, node_id="slow", delay_ms=3000, max_jobs=4)  # keeps a draining a while
    async with connect(a.ws_url, src_lang="zh", tgt_langs=["en"]) as held:
        await held.send_audio(tone(300))
        a.shutdown()  # a finalizes held's utterance and waits for its result: it drains for ~3 s
        with trio.fail_after(2):
            while not a.draining:
                await trio.sleep(0.01)
        async with connect([a.ws_url, b.ws_url], src_lang="zh", tgt_langs=["en"], backoff_s=0.05) as session:
            assert session.session_id in [actor.session_id for actor in b.sessions.actors()]
            assert a.draining  # (still: this was the SHUTTING_DOWN path, not a refused connection)
