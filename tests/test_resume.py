"""Session resume (issue 6, item 4; protocol.md "Resume"): a client reconnects to any instance
with ``session_id`` + ``resume_from`` and gets every result from that index on, once, in
order; numbering continues; the old owner is fenced. Real daemons on a real Valkey."""

from __future__ import annotations

import contextlib
import json

import pytest
import trio
from trio_websocket import ConnectionClosed

from scheduler.cluster import journal
from scheduler.protocol import Busy, SessionClosed, UtteranceFinalized
from scheduler.store import keys, lua
from scheduler.store.redis_adapter import Fenced, RedisAdapter

from .helpers import RESUME_TOKENS, SPEECH_100MS, peer, session, start_node


@pytest.fixture(params=["single", "cluster"])
def redis_url(request):
    return request.getfixturevalue("flushed_cluster_url" if request.param == "cluster" else "flushed_single_url")


async def utter(p, ms: int = 300) -> dict:
    """Speak one utterance, finalize it, return its utterance_finalized."""
    for _ in range(ms // 100):
        await p.send_raw(SPEECH_100MS)
    await p.send(type="finalize")
    fin, _ = await p.recv_until("utterance_finalized")
    return fin


async def results(p, count: int, timeout: float = 10) -> list[dict]:
    got = []
    with trio.fail_after(timeout):
        while len(got) < count:
            msg = await p.recv(timeout)
            if msg["type"] == "result":
                got.append(msg)
    return got


@contextlib.asynccontextmanager
async def registered(running, node_id: str):
    async with peer(running.ws_url + "/v1/node") as node:
        await node.register(node_id)
        yield node


async def resume(running, session_id: str, resume_from: int | None = None):
    p = peer(running.ws_url + "/v1/session")
    client = await p.__aenter__()
    extra = {} if resume_from is None else {"resume_from": resume_from}
    await client.send(type="session_init", src_lang="zh", tgt_langs=["en"], session_id=session_id,
                      resume_token=RESUME_TOKENS.get(session_id, "x" * 32), **extra)
    client.ready = await client.recv()
    client.cm = p
    return client


async def test_resume_on_the_same_instance_resends_and_continues(start_daemon, nursery):
    daemon = await start_daemon()
    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    async with session(daemon) as s:
        sid = s.ready["session_id"]
        for i in range(3):
            assert (await utter(s))["utterance_index"] == i
        first = await results(s, 3)
    # the socket is gone (client side): resume from index 1
    c = await resume(daemon, sid, resume_from=1)
    try:
        assert c.ready["type"] == "session_ready", c.ready
        assert (c.ready["session_id"], c.ready["resumed"], c.ready["next_utterance_index"]) == (sid, True, 3)
        assert await results(c, 2) == first[1:]  # the same results, as they were sent
        fin = await utter(c)
        assert fin["utterance_index"] == 3 and not fin["turn_id"].startswith(f"{sid}:t")  # a new turn, new id
        (live,) = await results(c, 1)
        assert live["utterance_index"] == 3 and live["status"] == "SUCCESS"
        await c.send(type="close_session")
        closed, between = await c.recv_until("session_closed")
        assert closed["utterances"] == 4 and not [m for m in between if m["type"] == "result"]
    finally:
        await c.cm.__aexit__(None, None, None)


async def test_resume_past_the_end_resends_nothing_and_closed_sessions_are_unknown(start_daemon, nursery):
    daemon = await start_daemon()
    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    async with session(daemon) as s:
        sid = s.ready["session_id"]
        await utter(s)
        await results(s, 1)
    c = await resume(daemon, sid, resume_from=7)
    try:
        assert c.ready["next_utterance_index"] == 1
        await c.send(type="close_session")
        closed, between = await c.recv_until("session_closed")
        assert closed["reason"] == "client_close" and between == []
    finally:
        await c.cm.__aexit__(None, None, None)
    for session_id in (sid, "never-existed"):  # ended for good, and unknown
        c = await resume(daemon, session_id)
        try:
            assert (c.ready["type"], c.ready["code"], c.ready["fatal"]) == ("error", "UNKNOWN_SESSION", True)
            with pytest.raises(ConnectionClosed) as closed:
                await c.recv()
            assert closed.value.reason.code == 1008
        finally:
            await c.cm.__aexit__(None, None, None)


async def test_resume_elsewhere_takes_over_fences_and_gets_the_owed_answer(start_daemon, redis_url, nursery):
    """A session on A has an utterance in flight on node "far" (on B); the client resumes on
    B while A still holds the old socket. A's connection is closed (taken over) without
    cancelling the job; the answer reaches the client on B; A's writes are fenced."""
    a = await start_daemon(redis_url=redis_url, instance_id="a")
    b = await start_daemon(redis_url=redis_url, instance_id="b")
    async with registered(b, "far") as node, session(a) as old:
        sid = old.ready["session_id"]
        await utter(old)
        with trio.fail_after(5):
            job = await node.recv()
        c = await resume(b, sid, resume_from=0)
        try:
            assert (c.ready["resumed"], c.ready["next_utterance_index"]) == (True, 1)
            with pytest.raises(ConnectionClosed) as gone, trio.fail_after(5):
                while True:
                    await old.recv()
            assert gone.value.reason.code == 1001 and "TAKEN_OVER" in gone.value.reason.reason
            await node.send(type="job_result", job_id=job["job_id"], attempt=1, status="ok", source_text="s", text="late")
            (result,) = await results(c, 1)
            assert (result["utterance_index"], result["translations"]["en"]["text"]) == (0, "late")
            assert (await utter(c))["utterance_index"] == 1
        finally:
            await c.cm.__aexit__(None, None, None)
    assert "scheduler_sessions_taken_over_total 1.0" in a.metrics.render().decode()
    assert "scheduler_sessions_resumed_total 1.0" in b.metrics.render().decode()
    async with RedisAdapter(redis_url) as redis:  # A's epoch (1) is fenced: journal and job creation
        stale = journal.Journal(redis, sid, 1, journal.Meta("zh", ("en",), 16000), keep=8, result_deadline_ms=1000)
        assert await stale.write([Busy(backlog=1, action="merged")])  # nothing to journal: no call
        with pytest.raises(journal.Fenced):
            await stale.write([SessionClosed(reason="client_close", utterances=1)])
        call = lua.dispatch(f"{sid}:5:translate:en", "999999", sid, 5, "zh", "en", "t", "none", 0, 1000, 1000, 0,
                            lua.Candidates(), epoch=1)
        with pytest.raises(Fenced):
            await redis.script(*call)


async def test_owed_utterance_without_answer_is_skipped_at_its_deadline(start_daemon, redis_url, redis_client):
    """Resumed with an utterance whose job nobody will answer: it is resolved SKIPPED at the
    deadline the first owner gave it, and later ones are not held back longer than that."""
    a = await start_daemon(redis_url=redis_url, instance_id="a", result_deadline_ms=1500)
    b = await start_daemon(redis_url=redis_url, instance_id="b", result_deadline_ms=1500)
    async with registered(a, "silent"), session(a) as old:
        sid = old.ready["session_id"]
        await utter(old)
        c = await resume(b, sid, resume_from=0)
        try:
            start = trio.current_time()
            (result,) = await results(c, 1)
            assert result["utterance_index"] == 0 and result["status"] == "SKIPPED"
            assert trio.current_time() - start < 1.6
        finally:
            await c.cm.__aexit__(None, None, None)
    assert redis_client.hget(keys.session(sid), "epoch") == "2"


async def test_owed_utterances_below_resume_from_are_not_sent_again(start_daemon, redis_url):
    """The client says it has results up to resume_from - 1, though the journal still owes one
    of them: the new owner does not resolve it again."""
    a = await start_daemon(redis_url=redis_url, instance_id="a", result_deadline_ms=1500)
    b = await start_daemon(redis_url=redis_url, instance_id="b", result_deadline_ms=1500)
    async with registered(a, "silent"), session(a) as old:
        sid = old.ready["session_id"]
        await utter(old)  # owed in the journal: never answered
        c = await resume(b, sid, resume_from=1)  # as if the client had result 0
        try:
            assert c.ready["next_utterance_index"] == 1
            assert (await utter(c))["utterance_index"] == 1
            (result,) = await results(c, 1)
            assert result["utterance_index"] == 1  # 0 was not sent again
        finally:
            await c.cm.__aexit__(None, None, None)


async def test_shutdown_is_resumable(start_daemon, redis_url, nursery):
    """SIGTERM-like drain of A: its session gets session_closed reason shutdown (close 1001)
    and the client resumes it on B, numbering on."""
    a = await start_daemon(redis_url=redis_url, instance_id="a")
    b = await start_daemon(redis_url=redis_url, instance_id="b")
    await start_node(nursery, b, node_id="n1", delay_ms=10)
    async with session(a) as s:
        sid = s.ready["session_id"]
        await utter(s)
        a.shutdown()
        closed, seen = await s.recv_until("session_closed")
        assert closed["reason"] == "shutdown" and [m["utterance_index"] for m in seen if m["type"] == "result"] == [0]
    c = await resume(b, sid, resume_from=1)
    try:
        assert c.ready["next_utterance_index"] == 1
        assert (await utter(c))["utterance_index"] == 1
        assert (await results(c, 1))[0]["utterance_index"] == 1
    finally:
        await c.cm.__aexit__(None, None, None)


async def test_journal_off_sessions_work_and_cannot_be_resumed(start_daemon, nursery, redis_client):
    daemon = await start_daemon(resume_keep_results=0)
    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    async with session(daemon) as s:
        sid = s.ready["session_id"]
        await utter(s)
        assert (await results(s, 1))[0]["status"] == "SUCCESS"
        assert not redis_client.hexists(keys.session(sid), "epoch")
    c = await resume(daemon, sid)
    try:
        assert (c.ready["type"], c.ready["code"]) == ("error", "UNKNOWN_SESSION")
    finally:
        await c.cm.__aexit__(None, None, None)


async def test_journal_script_keeps_the_last_results_and_fences_a_stale_epoch(redis_url, redis_client):
    meta = journal.Meta("zh", ("en",), 16000)
    async with RedisAdapter(redis_url) as redis:
        for sid in ("s1", "s2"):
            await journal.open_session(redis, sid, "i1", meta)
        redis_client.hset(keys.session("s2"), "epoch", 2)  # s2 was resumed elsewhere
        u = json.dumps({"reason": "pause", "turn_id": "t", "deadline_ms": 0})
        assert await redis.script(*lua.session_journal("s1", 1, meta.to_json(), 2, [
            ("u", 0, u), ("r", 0, "R0"), ("u", 1, u), ("r", 1, "R1"), ("u", 2, u), ("r", 2, "R2")])) == ["OK"]
        assert await redis.script(*lua.session_journal("s2", 1, meta.to_json(), 2, [("u", 0, u)])) == ["FENCED", "2"]
        s1 = redis_client.hgetall(keys.session("s1"))
        assert (s1["finalized"], s1.get("r:0"), s1["r:1"], s1["r:2"]) == ("3", None, "R1", "R2")  # last 2 kept
        assert not [f for f in s1 if f.startswith("u:")]
        assert "u:0" not in redis_client.hgetall(keys.session("s2"))


async def test_journal_script_renews_the_ttl_except_for_results_alone(redis_url, redis_client):
    """A batch of results alone leaves the session's TTL as its utterances' journaling (or
    their jobs' creation) renewed it; anything else renews it, and a hash the call makes
    (Redis lost the journal) always gets one."""
    meta = journal.Meta("zh", ("en",), 16000)
    u = json.dumps({"reason": "pause", "turn_id": "t", "deadline_ms": 0})
    call = lambda entries: lua.session_journal("s1", 1, meta.to_json(), 2, entries)  # noqa: E731
    async with RedisAdapter(redis_url) as redis:
        await journal.open_session(redis, "s1", "i1", meta)
        assert redis_client.ttl(keys.session("s1")) > keys.KEY_TTL_S - 10
        redis_client.expire(keys.session("s1"), 100)
        await redis.script(*call([("r", 0, "R0")]))
        assert redis_client.ttl(keys.session("s1")) <= 100
        for renewing in ([("u", 1, u)], [("r", 1, "R1"), ("c", 2, "client_close")], []):
            redis_client.expire(keys.session("s1"), 100)
            await redis.script(*call(renewing))
            assert redis_client.ttl(keys.session("s1")) > keys.KEY_TTL_S - 10, renewing
        redis_client.delete(keys.session("s1"))  # Redis lost it
        assert await redis.script(*call([("r", 3, "R3")])) == ["OK", "NEW"]
        assert redis_client.ttl(keys.session("s1")) > keys.KEY_TTL_S - 10


async def test_the_writer_journals_an_utterance_only_when_its_job_did_not(redis_url, redis_client):
    """An utterance's first job writes its journal entry when it is created (dispatch_task /
    session_claim); the dispatcher's word tells the writer, which then makes no call of its
    own. Without that word (the job was refused, or the word did not come in time) the
    writer journals the utterance itself before the client gets it."""
    meta, counts = journal.Meta("zh", ("en",), 16000), []
    async with RedisAdapter(redis_url) as redis:
        await journal.open_session(redis, "s1", "i1", meta)
        writer = journal.Journal(redis, "s1", 1, meta, keep=2, result_deadline_ms=1000, jobs_write_ahead=True,
                                 observe=lambda by, waited: counts.append((by, waited >= journal.AHEAD_WAIT_S)))

        def finalized(index):
            return UtteranceFinalized(utterance_index=index, reason="pause", turn_id="t", audio_ms=300)

        writer.ahead(0, True)  # (the job wrote u:0; here nobody did, so the writer's silence shows)
        writer.ahead(1, False)  # refused: the writer writes u:1
        await writer.write([finalized(0)])
        await writer.write([finalized(1)])
        started = trio.current_time()
        await writer.write([finalized(2)])  # no word: after AHEAD_WAIT_S, the writer writes u:2
        assert trio.current_time() - started >= journal.AHEAD_WAIT_S
        writer.ahead(2, True)  # (a late word changes nothing)
        stored = redis_client.hgetall(keys.session("s1"))
        assert ("u:0" in stored, "u:1" in stored, "u:2" in stored, stored["finalized"]) == (False, True, True, "3")
        assert counts == [("job", False), ("writer", False), ("writer", True)]  # (who, waited the whole bound)
