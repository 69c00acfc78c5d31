"""A resume needs the session's secret (docs/security.md, "Resume secret"): a session id alone,
or a token with another API key, gets UNKNOWN_SESSION exactly like an id nobody holds, and
takes nothing over. Real daemon, real Valkey."""

from __future__ import annotations

import json

import trio

from scheduler.cluster import journal
from scheduler.store import keys, lua
from scheduler.store.redis_adapter import RedisAdapter

from .helpers import init_answer, session, speak, start_node


async def _attempt(running, session_id: str, **extra) -> tuple[dict, int | None]:
    """A resume attempt: the daemon's first answer and the close code that followed (if any)."""
    return await init_answer(running, session_id=session_id, resume_from=0, **extra)


async def _utter(s) -> dict:
    await speak(s)
    await s.send(type="finalize")
    result, _ = await s.recv_until("result", timeout=10)
    return result


def _refused(running, why: str) -> float:
    return running.metrics.resume_refused_total.labels(why)._value.get()


async def test_a_session_id_alone_takes_nothing_over(daemon, nursery):
    await start_node(nursery, daemon, node_id="n1", delay_ms=10)
    async with session(daemon) as owner:
        sid, token = owner.ready["session_id"], owner.ready["resume_token"]
        assert len(token) >= 22 and token not in json.dumps(owner.ready["limits"])  # >= 128 bits, urlsafe
        assert (await _utter(owner))["utterance_index"] == 0
        unknown, unknown_code = await _attempt(daemon, "0" * 32, resume_token=token)
        for extra in ({}, {"resume_token": "A" * 32}, {"resume_token": token[:-1] + ("A" if token[-1] != "A" else "B")}):
            answer, code = await _attempt(daemon, sid, **extra)
            # the same answer as for an id nobody holds (its text names the id it was given)
            assert (answer["code"], answer["fatal"], code) == ("UNKNOWN_SESSION", True, 1008) == (unknown["code"], unknown["fatal"], unknown_code)
            assert answer["message"].replace(sid, "ID") == unknown["message"].replace("0" * 32, "ID")
        # the rightful client was neither cut off nor fenced
        assert (await _utter(owner))["utterance_index"] == 1
        assert _refused(daemon, "denied") == 3 and _refused(daemon, "unknown") == 1
        answer, _ = await _attempt(daemon, sid, resume_token=token)  # the holder of the token may
        assert answer["type"] == "session_ready" and answer["resumed"] and answer["next_utterance_index"] == 2


async def test_the_token_is_kept_only_as_a_digest(daemon, redis_client, nursery):
    await start_node(nursery, daemon, node_id="n1")
    async with session(daemon) as s:
        sid, token = s.ready["session_id"], s.ready["resume_token"]
        stored = redis_client.hgetall(keys.session(sid))
        assert token not in json.dumps(stored)
        assert json.loads(stored["meta"])["auth"] == journal.resume_digest(token, None)


async def test_a_resume_must_present_the_key_that_opened_the_session(start_daemon, nursery):
    running = await start_daemon(client_api_keys="key-one,key-two")
    await start_node(nursery, running, node_id="n1", delay_ms=10)
    async with session(running, api_key="key-one") as s:
        sid, token = s.ready["session_id"], s.ready["resume_token"]
    answer, code = await _attempt(running, sid, resume_token=token, api_key="key-two")  # a valid key, not its own
    assert (answer["code"], code) == ("UNKNOWN_SESSION", 1008)
    answer, code = await _attempt(running, sid, resume_token=token)  # no key at all
    assert (answer["code"], code) == ("UNAUTHORIZED", 1008)
    answer, _ = await _attempt(running, sid, resume_token=token, api_key="key-one")
    assert answer["type"] == "session_ready" and answer["resumed"]


async def test_a_refused_resume_does_not_fence_the_owner(redis_url):
    """session_resume.lua compares the digest before it changes anything: the epoch stays."""
    async with RedisAdapter(redis_url) as redis:
        auth = journal.resume_digest("t" * 32, None)
        await journal.open_session(redis, "s1", "i1", journal.Meta("zh", ("en",), 16000, auth))
        for presented in ("", journal.resume_digest("u" * 32, None), auth[:-1] + "0", auth.upper()):
            assert await redis.script(*lua.session_resume("s1", "i2", presented)) == ["DENIED"]
        assert await redis.command("HGET", keys.session("s1"), "epoch") == "1"
        assert await redis.command("HGET", keys.session("s1"), "owner") == "i1"
        reply = await redis.script(*lua.session_resume("s1", "i2", auth))
        assert reply[:2] == ["OK", 2]
        await redis.command("HSET", keys.session("s2"), "epoch", 1, "meta", json.dumps({"src_lang": "zh"}))  # no auth
        assert await redis.script(*lua.session_resume("s2", "i2", auth)) == ["DENIED"]
        with trio.fail_after(1):
            assert await redis.script(*lua.session_resume("nope", "i2", auth)) == ["UNKNOWN"]
