"""The black-box fuzzer's cases: each one hostile interaction with a running daemon and what
it must get back (docs/security.md, "What each kind of bad input gets").

A case is ``async def case(target, rng) -> None``; it raises :class:`Violation` when the
daemon's answer is not a documented one (or not there within :data:`ANSWER_WITHIN_S`).
Everything random in a case comes from ``rng``, so ``NAME:SEED`` replays it exactly
(``just fuzz --replay NAME:SEED``).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Awaitable, Callable

import attrs
import trio

from tests.rawws import RawPeer, close, frame, request

ANSWER_WITHIN_S = 10.0
DOCUMENTED_CODES = {"BAD_MESSAGE", "NOT_INITIALIZED", "UNSUPPORTED_LANG_PAIR", "UNKNOWN_SESSION", "FRAME_TOO_LARGE",
                    "UNAUTHORIZED", "SHUTTING_DOWN", "DUPLICATE_NODE_ID", "NOT_REGISTERED"}
HOSTILE_STRINGS = ["\\ud800", "\\udfff", "a\\ud800b", "{scheduler}", "x:y", "", " ", "\\u0000", "\\n", "é" * 40, "9" * 300,
                   "../../etc/passwd", "%s%n", "${jndi:x}", "<script>", "\\\\", "zh\\u0000"]


class Violation(Exception):
    """The daemon answered something undocumented (or nothing, or too late)."""


@attrs.define
class Target:
    ws_port: int
    admin_port: int
    node_token: str
    max_frame_bytes: int
    session_ids: list[str] = attrs.field(factory=list)  # the witnesses': a hijack must never take one over


def _json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, rng.randrange(-1000, 100000)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-320, 3.0])
    if kind in (4, 5):
        return rng.choice(["zh", "en", "n1", "ok", "error", "1", "zh-en"]) if kind == 4 else _RawString(rng.choice(HOSTILE_STRINGS))
    if kind in (6, 7):
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "cpu", "b", "\\ud800"]): _json_value(rng, depth + 1) for _ in range(rng.randrange(3))}


class _RawString(str):
    """A string written into the JSON text as it is (escapes such as ``\\ud800`` stay escapes)."""


def _dump(value) -> str:
    if isinstance(value, _RawString):
        return '"' + value + '"'
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_dump(_RawString(k)) + ":" + _dump(v) for k, v in value.items()) + "}"
    return json.dumps(value)


CLIENT_FIELDS = {"session_init": ["src_lang", "tgt_langs", "sample_rate", "session_id", "resume_from", "api_key"],
                 "audio_chunk": ["data", "is_final"], "finalize": [], "close_session": []}
NODE_FIELDS = {"register": ["node_id", "lang_pairs", "max_jobs", "pools", "capabilities", "token"], "heartbeat": ["load"],
               "job_result": ["job_id", "attempt", "status", "source_text", "text", "error"], "drain": []}
VALID = {"src_lang": "zh", "tgt_langs": ["en"], "node_id": "fz", "lang_pairs": [["fz", "yy"]], "max_jobs": 1,
         "job_id": "1", "attempt": 1, "status": "ok", "data": "AAAA"}


def hostile_message(rng: random.Random, fields: dict[str, list[str]]) -> str:
    """A message of a real type whose fields are valid, absent or hostile, at random."""
    kind = rng.choice(sorted(fields) + ["nope", "\\ud800"])
    body = {}
    for name in fields.get(kind, ["x"]):
        roll = rng.random()
        if roll < 0.4 and name in VALID:
            body[name] = VALID[name]
        elif roll < 0.8:
            body[name] = _json_value(rng)
    if rng.random() < 0.1:
        body["deep"] = json.loads("[" * 40 + "]" * 40)
    text = "{" + ",".join([f'"type":{_dump(_RawString(kind))}'] + [f'"{k}":{_dump(v)}' for k, v in body.items()]) + "}"
    if rng.random() < 0.05:
        text = "[" * 3000 + "]" * 3000
    return text


async def _answer(peer: RawPeer) -> tuple[int | None, list[dict]]:
    with trio.move_on_after(ANSWER_WITHIN_S) as scope:
        code, texts = await peer.close_code()
    if scope.cancelled_caught:
        raise Violation(f"no close within {ANSWER_WITHIN_S} s")
    return code, [json.loads(t) for t in texts]


def _check_errors(messages: list[dict]) -> None:
    for msg in messages:
        if msg.get("type") == "error" and msg.get("code") not in DOCUMENTED_CODES:
            raise Violation(f"undocumented error {msg.get('code')}: {str(msg.get('message'))[:200]}")


async def _next_text(peer: RawPeer) -> dict:
    """The next text frame (an answer that does not close the connection)."""
    with trio.move_on_after(ANSWER_WITHIN_S):
        while (got := await peer.next_frame()) is not None:
            opcode, payload = got
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
                raise Violation(f"closed ({code}) where an answer was due")
        raise Violation("closed without a close frame where an answer was due")
    raise Violation(f"no answer within {ANSWER_WITHIN_S} s")


async def _upgraded(target: Target, path: str) -> RawPeer:
    peer = await RawPeer.connect(target.ws_port)
    await peer.upgrade(path)
    return peer


async def _expect_close(target: Target, path: str, data: bytes, codes: set[int]) -> None:
    peer = await _upgraded(target, path)
    try:
        await peer.send(data)
        code, messages = await _answer(peer)
        _check_errors(messages)
        if code not in codes:
            raise Violation(f"close code {code}, expected one of {sorted(codes)}")
    finally:
        await peer.aclose()


def _path(rng: random.Random) -> str:
    return rng.choice(["/v1/session", "/v1/node"])


# ---------------------------------------------------------------- the cases


async def oversized_pair(target: Target, rng: random.Random) -> None:
    """The issue-29 sequence: a frame over max_frame_bytes, then at once one over twice it."""
    first = rng.randrange(target.max_frame_bytes + 1, 2 * target.max_frame_bytes)
    second = 2 * target.max_frame_bytes + rng.randrange(1, target.max_frame_bytes)
    await _expect_close(target, _path(rng), frame(0x1, b"a" * first) + frame(rng.choice([0x1, 0x2]), b"b" * second), {1009})


async def huge_header(target: Target, rng: random.Random) -> None:
    length = rng.choice([2 * target.max_frame_bytes + 1, 3_000_000, 2**40, 2**63 - 1])
    await _expect_close(target, _path(rng), frame(rng.choice([0x1, 0x2]), b"", length=length), {1009})


async def frame_protocol_error(target: Target, rng: random.Random) -> None:
    data, code = rng.choice([
        (frame(0x1, b"{}", rsv=rng.randrange(1, 8)), 1002), (frame(0x1, b"{}", mask=None), 1002),
        (frame(0x9, b"x", fin=False), 1002), (frame(0xA, b"x" * 126), 1002), (close(rng.choice([0, 999, 1004, 1005, 1006, 2999])), 1002),
        (frame(rng.choice([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xF]), b"x"), 1002), (frame(0x0, b"x"), 1002),
        (frame(0x1, rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b'{"a":"\xf5"}'])), 1007),
    ])
    await _expect_close(target, _path(rng), data, {code})


PROBE = b'{"type":"fuzz_probe"}'


async def _answers_until_probe(peer: RawPeer) -> list[dict]:
    """Everything the daemon sends until its answer to :data:`PROBE` (``BAD_MESSAGE``, unknown
    type): the hostile message sent before it was read and dealt with by then. Raises
    :class:`Violation` naming the close code when the daemon closed instead."""
    seen = []
    while True:
        msg = await _next_text(peer)
        if msg.get("type") == "error" and "fuzz_probe" in str(msg.get("message")):
            return seen
        seen.append(msg)
        if msg.get("type") == "error" and msg.get("fatal"):
            return seen


async def _garbage(target: Target, rng: random.Random, path: str, fields: dict[str, list[str]], first: bytes | None,
                   answer_to_first: str, fatal_closes: set[str]) -> None:
    """Half of the time a valid first message, then hostile ones, each followed by a probe:
    every answer must be documented, and a fatal error ends the case."""
    peer = await _upgraded(target, path)
    try:
        if first is not None and rng.random() < 0.5:
            await peer.send(frame(0x1, first))
            reply = await _next_text(peer)
            if reply.get("type") != answer_to_first:
                raise Violation(f"a valid first message was answered {str(reply)[:200]}")
        for _ in range(rng.randrange(1, 6)):
            message = hostile_message(rng, fields)
            await peer.send(frame(0x1, message.encode()) + frame(0x1, PROBE))
            try:
                answers = await _answers_until_probe(peer)
            except Violation as exc:
                if any(f"closed ({code})" in str(exc) for code in fatal_closes):
                    return  # close_session (1000), a drain (1001), a fatal refusal (1008) that came before
                raise
            _check_errors(answers)
            if any(a.get("type") == "error" and a.get("fatal") for a in answers):
                return
    finally:
        await peer.aclose()


async def client_garbage(target: Target, rng: random.Random) -> None:
    """Hostile messages on /v1/session before and after a valid session_init."""
    await _garbage(target, rng, "/v1/session", CLIENT_FIELDS, b'{"type":"session_init","src_lang":"zh","tgt_langs":["en"]}',
                   "session_ready", {"1000", "1008"})


async def node_garbage(target: Target, rng: random.Random) -> None:
    """Hostile messages on /v1/node; half of the time after registering (with the token) a node
    for a pair no witness uses, so that it never holds a witness's job."""
    register = json.dumps({"type": "register", "node_id": f"fz-{rng.randrange(10**9)}", "lang_pairs": [["fz", "yy"]],
                           "max_jobs": 1, "token": target.node_token}).encode()
    await _garbage(target, rng, "/v1/node", NODE_FIELDS, register, "registered", {"1001", "1008"})


async def _expect_fatal(target: Target, path: str, message: dict, code: str) -> None:
    """Send one message; the daemon must answer exactly ``code`` (fatal) and close with 1008."""
    peer = await _upgraded(target, path)
    try:
        await peer.send(frame(0x1, json.dumps(message).encode()))
        close_code, messages = await _answer(peer)
        if close_code != 1008 or [m.get("code") for m in messages] != [code]:
            raise Violation(f"expected {code} and 1008, got {messages} and close {close_code}")
    finally:
        await peer.aclose()


async def wrong_token(target: Target, rng: random.Random) -> None:
    token = rng.choice([None, "", "wrong", target.node_token + "x", target.node_token[:-1]])
    await _expect_fatal(target, "/v1/node", {"type": "register", "node_id": "fz-t", "lang_pairs": [["fz", "yy"]], "max_jobs": 1,
                                             **({} if token is None else {"token": token})}, "UNAUTHORIZED")


async def resume_unknown(target: Target, rng: random.Random) -> None:
    await _expect_fatal(target, "/v1/session", {"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"],
                                                "session_id": f"{rng.getrandbits(128):032x}", "resume_from": 0}, "UNKNOWN_SESSION")


async def hijack(target: Target, rng: random.Random) -> None:
    """Resume a witness's session by its id, without its token, with a made-up one or a malformed
    one: UNKNOWN_SESSION (1008), and the witness goes on (the run checks its results)."""
    if not target.session_ids:
        await trio.sleep(0.1)  # the witnesses have not started yet
        return
    init = {"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"], "session_id": rng.choice(target.session_ids),
            "resume_from": 0}
    token = rng.choice([None, "", f"{rng.getrandbits(128):032x}", "A" * 43, "x"])
    if token is not None:
        init["resume_token"] = token
    peer = await _upgraded(target, "/v1/session")
    try:
        await peer.send(frame(0x1, json.dumps(init).encode()))
        first = await _next_text(peer)
        if first.get("code") == "BAD_MESSAGE" and token in ("", "x"):
            return  # a malformed token is refused as such, not fatal
        code, _ = await _answer(peer)
        if first.get("code") != "UNKNOWN_SESSION" or code != 1008:
            raise Violation(f"a hijack without the token got {str(first)[:200]} and close {code}")
    finally:
        await peer.aclose()


async def bad_handshake(target: Target, rng: random.Random) -> None:
    data, statuses = rng.choice([
        (request(key="c2hvcnQ="), {400}), (request(key=None), {400}), (request(version="8"), {426}),
        (request(host="xn--a"), {400}), (request(path="/v2/x"), {404}), (request(path="/" + "a" * 3000), {404}),
        (request("/v1/node", extra="Origin: https://evil.example\r\n"), {403}),
        (b"GET / HTTP/1.1\r\n\r\n", {400}), (b"POST /v1/session HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n", {400}),
        (request(extra="X-Long: " + "a" * 20000 + "\r\n"), {400, 431, None}),
        (b"".join(rng.randbytes(rng.randrange(1, 200)) for _ in range(3)) + b"\r\n\r\n", {400, None}),
    ])
    peer = await RawPeer.connect(target.ws_port)
    try:
        await peer.send(data)
        with trio.move_on_after(ANSWER_WITHIN_S) as scope:
            status = await peer.http_status()
        if scope.cancelled_caught:
            raise Violation(f"no answer to a malformed handshake within {ANSWER_WITHIN_S} s")
        if status not in statuses:
            raise Violation(f"a malformed handshake got {status}, expected one of {sorted(statuses, key=str)}")
    finally:
        await peer.aclose()


async def random_bytes(target: Target, rng: random.Random) -> None:
    """Random bytes after the upgrade: whatever they parse as, the daemon survives (no answer
    is owed to a frame that never completes)."""
    peer = await _upgraded(target, _path(rng))
    try:
        await peer.send(rng.randbytes(rng.randrange(1, 4096)))
        with trio.move_on_after(0.5):
            await peer.close_code()
    finally:
        await peer.aclose()


async def admin_garbage(target: Target, rng: random.Random) -> None:
    data = rng.choice([
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + rng.randbytes(50).replace(b"\r", b"").replace(b"\n", b"") + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", rng.randbytes(rng.randrange(1, 500)),
        b"GET /status HTTP/1.1\r\nHost: x\r\nOrigin: \xff\xfe\r\n\r\n", b"GET /healthz HTTP/9.9\r\n\r\n",
    ])
    peer = await RawPeer.connect(target.admin_port)
    try:
        await peer.send(data)
        with trio.move_on_after(ANSWER_WITHIN_S) as scope:
            while await peer._more():  # until the daemon closes (it answers one request per connection)
                pass
        if scope.cancelled_caught:
            raise Violation("the admin port held a connection past 10 s")
        if peer.buffer and not peer.buffer.startswith(b"HTTP/1.1 "):
            raise Violation(f"the admin port answered {peer.buffer[:40]!r}")
    finally:
        await peer.aclose()


Case = Callable[[Target, random.Random], Awaitable[None]]
CASES: dict[str, Case] = {f.__name__: f for f in (
    oversized_pair, huge_header, frame_protocol_error, client_garbage, node_garbage, wrong_token, resume_unknown,
    hijack, bad_handshake, random_bytes, admin_garbage)}
