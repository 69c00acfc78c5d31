"""Admission through the whole session lifecycle, under Hypothesis, against a real daemon.

What runs, per example: a real daemon (in-process, Trio's real clock, on its own thread:
tests/trio_thread.py) with ``--max-sessions`` 3 on the shared real Valkey, a reference node,
and clients over real WebSockets on loopback. Rules open new sessions, resume sessions whose
socket was lost, close sessions and drop sockets, in any order. A model says what must be
admitted: a new session while fewer than ``max_sessions - reserve`` are held, a resume while
fewer than ``max_sessions`` (the reserve: resumes come before new sessions).

Checked after every step: what was admitted or refused (``SERVER_FULL``, close 1013, an
integer ``retry_after_ms``) is what the model says; a refused session leaves no state behind
(no session hash, owner record or registry entry for a new one; a refused resume leaves its
journal's epoch and its owner record as they were); the daemon holds exactly the live
sessions (registry and admission count); ``/readyz`` says ``full`` exactly while new
sessions are refused.
"""

from __future__ import annotations

import collections
import functools
import json

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from trio_websocket import ConnectionClosed, connect_websocket_url

from scheduler.ops.config import Settings
from scheduler.reference.node import NodeOptions, ReferenceNode
from scheduler.server import serve
from scheduler.session.admission import reserve_for
from scheduler.store import keys
from scheduler.store.redis_adapter import connect

from .conftest import FAST
from .trio_thread import TrioThread

LIMIT = 3
STEP_S = 10  # a rule's own bound (a stall fails the example instead of hanging the suite)


class LifecycleMachine(RuleBasedStateMachine):
    url = ""
    seen: collections.Counter = collections.Counter()  # what the examples reached, over the run

    @initialize(prefill=st.integers(0, LIMIT), drop=st.booleans())
    def start(self, prefill, drop):
        """``prefill`` new sessions first (then, if ``drop``, one socket dropped and a new
        session in its place): examples start near the limit as often as far from it."""
        self.r = connect(self.url, decode_responses=True)
        self.r.flushall()
        self.trio = TrioThread(real_time=True)
        self.running = self.trio.call(self._start_daemon)
        self.live: dict[str, object] = {}  # session id -> its open WebSocket
        self.resumable: dict[str, str] = {}  # session id -> resume token (its socket dropped)
        self.tokens: dict[str, str] = {}
        for _ in range(prefill):
            self.new_session()
        if drop and self.live:  # one socket lost, its place taken by a new session: a resume next goes into the reserve
            self._drop(sorted(self.live)[0])
            self.new_session()

    async def _start_daemon(self):
        values = {"ws_port": 0, "admin_port": 0, "redis_url": self.url, **FAST, "max_sessions": LIMIT,
                  "instance_id": "adm-1"}
        running = await self.trio.nursery.start(functools.partial(serve, Settings(**values), handle_signals=False))
        node = ReferenceNode(NodeOptions(url=running.ws_url, node_id="n1", reconnect=False))
        await self.trio.nursery.start(node.run)
        return running

    def teardown(self):
        if hasattr(self, "trio"):
            try:
                self.trio.call_sync(lambda: self.running.shutdown(immediate=True))
            finally:
                self.trio.close()
                self.r.close()

    # ------------------------------------------------------------ client side

    async def _init(self, **fields) -> tuple[object, dict, int | None]:
        """Open a socket and send session_init: (socket, first answer, close code after an error)."""
        with trio.fail_after(STEP_S):
            ws = await connect_websocket_url(self.trio.nursery, self.running.ws_url + "/v1/session")
            await ws.send_message(json.dumps({"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"], **fields}))
            answer = json.loads(await ws.get_message())
            if answer["type"] != "error":
                return ws, answer, None
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                return ws, answer, closed.reason.code
            raise AssertionError(f"{answer} was not followed by a close")

    def _refused(self, answer: dict, code: int | None) -> None:
        assert answer["code"] == "SERVER_FULL" and answer["fatal"] and code == 1013, (answer, code)
        assert isinstance(answer["retry_after_ms"], int) and answer["retry_after_ms"] > 0, answer

    async def _until_held(self, n: int) -> None:
        """The daemon sees a dropped or closed socket a moment later: wait for it to let go."""
        with trio.fail_after(STEP_S):
            while len(self.running.sessions) != n or self.running.admission.held != n:
                await trio.sleep(0.01)

    def _session_keys(self) -> set[str]:
        return set(self.r.scan_iter(keys.session("*"))) | set(self.r.scan_iter(keys.session_owner("*")))

    # ------------------------------------------------------------ rules

    @rule()
    def new_session(self):
        admit = len(self.live) < LIMIT - reserve_for(LIMIT)
        before = self._session_keys()
        ws, answer, code = self.trio.call(self._init)
        if admit:
            assert answer["type"] == "session_ready", answer
            self.live[answer["session_id"]] = ws
            self.tokens[answer["session_id"]] = answer["resume_token"]
        else:
            self._refused(answer, code)
            assert self._session_keys() == before, "a refused session left state in Redis"
            self.seen["new refused"] += 1
        self.trio.call(self._until_held, len(self.live))

    @precondition(lambda self: self.resumable)
    @rule(data=st.data())
    def resume(self, data):
        session_id = data.draw(st.sampled_from(sorted(self.resumable)))
        admit = len(self.live) < LIMIT
        epoch = self.r.hget(keys.session(session_id), "epoch")
        ws, answer, code = self.trio.call(functools.partial(
            self._init, session_id=session_id, resume_token=self.resumable[session_id], resume_from=0))
        if admit:
            assert answer["type"] == "session_ready" and answer["resumed"], answer
            assert self.r.hget(keys.session(session_id), "epoch") == str(int(epoch) + 1)
            del self.resumable[session_id]
            self.live[session_id] = ws
        else:
            self._refused(answer, code)
            assert self.r.hget(keys.session(session_id), "epoch") == epoch, "a refused resume moved the epoch"
            assert self.r.get(keys.session_owner(session_id)) is None, "a refused resume took the session"
            self.seen["resume refused"] += 1
        if admit and len(self.live) > LIMIT - reserve_for(LIMIT):
            self.seen["resume into the reserve"] += 1
        self.trio.call(self._until_held, len(self.live))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def close_session(self, data):
        session_id = data.draw(st.sampled_from(sorted(self.live)))
        ws = self.live.pop(session_id)

        async def close():
            with trio.fail_after(STEP_S):
                await ws.send_message(json.dumps({"type": "close_session"}))
                while json.loads(await ws.get_message())["type"] != "session_closed":
                    pass
                await ws.aclose()
            await self._until_held(len(self.live))

        self.trio.call(close)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def drop_socket(self, data):
        """The client's connection is lost: the session stays resumable (with its token)."""
        self._drop(data.draw(st.sampled_from(sorted(self.live))))

    def _drop(self, session_id: str) -> None:
        ws = self.live.pop(session_id)

        async def drop():
            await ws.aclose()
            await self._until_held(len(self.live))

        self.trio.call(drop)
        self.resumable[session_id] = self.tokens[session_id]

    # ------------------------------------------------------------ invariants

    @invariant()
    def books(self):
        if not hasattr(self, "running"):
            return
        held = len(self.live)
        assert self.running.admission.held == held and len(self.running.sessions) == held
        assert {a.session_id for a in self.running.sessions.actors()} == set(self.live)
        full = held >= LIMIT - reserve_for(LIMIT)
        assert self.running.readiness() == ((False, "full") if full else (True, "ready")), (held, self.running.readiness())


@pytest.mark.slow
def test_admission_through_the_lifecycle(valkey_url):
    LifecycleMachine.url = valkey_url
    LifecycleMachine.seen.clear()
    run_state_machine_as_test(LifecycleMachine, settings=settings(settings(), max_examples=min(settings().max_examples, 15),
                                                                  stateful_step_count=12, deadline=None,
                                                                  derandomize=True))  # (the same examples each run:
    # the coverage asserted below is then a fact about them, not a matter of luck)
    reached = LifecycleMachine.seen
    assert reached["new refused"] and reached["resume into the reserve"], reached  # (the run reached the reserve)
