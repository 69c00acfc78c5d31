"""The one decode path (protocol.decode), fuzzed: any bytes, any text, any JSON value in any
field of any message gives a typed message (or audio bytes) whose every field is within its
documented rules, or a ProtocolError with a documented code; never another exception.

A few hundred examples per property in ``just test``; ``just stress`` runs many more
(HYPOTHESIS_PROFILE=stress)."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler import protocol as p

LIMIT = 8192
PARSERS = {"client": (p.parse_client, p.CLIENT_MESSAGES), "node": (p.parse_node, p.NODE_MESSAGES)}
DOCUMENTED = {p.BAD_MESSAGE, p.FRAME_TOO_LARGE}

# strings a hostile peer can put in JSON: any code point, lone surrogates (as \\u escapes) included
hostile_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40) | \
    st.sampled_from(["", "\ud800", "a\udfff", "{scheduler}", "x:y", "a b", "\n", "\x00", "é" * 200, "9" * 400])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
    max_leaves=12,
)


def _fields(cls: type) -> list[str]:
    return [a.name for a in attrs.fields(cls)]


def _check_typed(msg: object) -> None:
    """What a typed message guarantees to everything behind the edge."""
    # it encodes back to JSON and to UTF-8 (Redis, logs, other sessions' sockets): no lone surrogate survives
    text = p.encode(msg)
    text.encode("utf-8")
    for name in ("session_id", "node_id"):
        value = getattr(msg, name, None)
        assert value is None or p.ID_PATTERN.fullmatch(value), (name, value)
    for lang in [getattr(msg, "src_lang", None), *getattr(msg, "tgt_langs", []),
                 *(lang for pair in getattr(msg, "lang_pairs", []) for lang in pair)]:
        assert lang is None or p.LANG_PATTERN.fullmatch(lang), lang
    for pool in getattr(msg, "pools", None) or []:
        assert p.ID_PATTERN.fullmatch(pool), pool
    if isinstance(msg, p.JobResult):
        assert p.JOB_ID_PATTERN.fullmatch(msg.job_id) and 0 <= msg.attempt <= p.MAX_ATTEMPT and msg.status in ("ok", "error")
    for free in (getattr(msg, "capabilities", None), getattr(msg, "load", None)):
        if free is not None:
            json.dumps(free)  # no RecursionError: nesting is bounded


def _decode(side: str, frame: str | bytes) -> object:
    parse, _ = PARSERS[side]
    try:
        msg = p.decode(frame, limit=LIMIT, parse=parse)
    except p.ProtocolError as err:
        assert err.code in DOCUMENTED, err.code
        assert err.fatal == (err.code == p.FRAME_TOO_LARGE)
        err.message.encode("utf-8")  # the error text is sendable and loggable,
        assert len(err.message) <= 2 * p.MAX_ERROR_TEXT  # and echoes no peer value at length
        return err
    if isinstance(frame, bytes):
        assert msg is frame
    else:
        _check_typed(msg)
    return msg


@pytest.mark.parametrize("side", sorted(PARSERS))
@given(frame=st.binary(max_size=LIMIT + 16) | st.text(max_size=200))
def test_any_bytes_or_text(side, frame):
    _decode(side, frame)


@pytest.mark.parametrize("side", sorted(PARSERS))
@given(data=st.data())
def test_any_json_value_in_any_field(side, data):
    _, table = PARSERS[side]
    kind = data.draw(st.sampled_from(sorted(table)))
    names = _fields(table[kind])
    body = {name: data.draw(json_values) for name in data.draw(st.lists(st.sampled_from(names), unique=True))} if names else {}
    frame = json.dumps({"type": kind, **body}, ensure_ascii=data.draw(st.booleans()))
    try:
        frame.encode("utf-8")
    except UnicodeEncodeError:
        frame = json.dumps({"type": kind, **body})  # a WebSocket text frame is UTF-8: surrogates only as escapes
    _decode(side, frame)


@pytest.mark.parametrize("side", sorted(PARSERS))
@given(depth=st.integers(min_value=p.MAX_DEPTH - 2, max_value=3000), field=st.sampled_from(["capabilities", "load", "x"]))
def test_deep_nesting_is_bad_message(side, depth, field):
    kind = "register" if side == "node" and field == "capabilities" else "heartbeat" if side == "node" else "finalize"
    frame = '{{"type":"{}","{}":{}1{}}}'.format(kind, field, "[" * depth, "]" * depth)
    got = _decode(side, frame)
    if depth + 1 > p.MAX_DEPTH:
        assert isinstance(got, p.ProtocolError) and got.code == p.BAD_MESSAGE


@pytest.mark.parametrize(("frame", "field"), [
    ('{"type":"session_init","src_lang":"\\ud800","tgt_langs":["en"]}', "not valid JSON"),
    ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"sample_rate":NaN}', "not valid JSON"),
    ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"sample_rate":1e999}', "not valid JSON"),
    ('{"type":"session_init","src_lang":"zh{x}","tgt_langs":["en"]}', "src_lang"),
    ('{"type":"session_init","src_lang":"zh","tgt_langs":["e n"]}', "tgt_langs"),
    ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"session_id":"a:b"}', "session_id"),
    ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"session_id":"{scheduler}"}', "session_id"),
    ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"api_key":"a b"}', "api_key"),
    ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"resume_from":1e300}', "resume_from"),
])
def test_client_field_rules_name_the_field(frame, field):
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client(frame)
    assert info.value.code == p.BAD_MESSAGE and field in info.value.message


@pytest.mark.parametrize(("frame", "field"), [
    ('{"type":"register","node_id":"n 1","lang_pairs":[["zh","en"]],"max_jobs":1}', "node_id"),
    ('{"type":"register","node_id":"n1","lang_pairs":[["zh","en"]],"max_jobs":1,"pools":["{p}"]}', "pools"),
    ('{"type":"register","node_id":"n1","lang_pairs":[["zh","en"]],"max_jobs":1,"token":"\\u00e9"}', "token"),
    ('{"type":"job_result","job_id":"1","attempt":-1,"status":"ok"}', "attempt"),
    ('{"type":"job_result","job_id":"1 2","attempt":1,"status":"ok"}', "job_id"),
    ('{"type":"job_result","job_id":"1","attempt":1,"status":"\\udfff"}', "not valid JSON"),
    ('{"type":"job_result","job_id":"1","attempt":1,"status":"maybe"}', "status"),
    ('{"type":"job_result","job_id":"1","attempt":1,"status":"%s"}' % ("x" * 5000), "must be one of ok, error @ $.status"),
    ('{"type":"heartbeat","load":{"%s":1}}' % ("k" * 65), "load"),
])
def test_node_field_rules_name_the_field(frame, field):
    with pytest.raises(p.ProtocolError) as info:
        p.parse_node(frame)
    assert info.value.code == p.BAD_MESSAGE and field in info.value.message


def test_valid_messages_still_pass():
    assert p.parse_client('{"type":"session_init","src_lang":"zh-Hans","tgt_langs":["pt_BR","en"],'
                          '"session_id":"0f3a.b_c-d","resume_from":3,"api_key":"k3y/with+odd=chars"}').src_lang == "zh-Hans"
    reg = p.parse_node('{"type":"register","node_id":"gpu-01.eu","lang_pairs":[["zh","en"]],"max_jobs":4,'
                       '"pools":["gpu","zh-en"],"capabilities":{"engine":{"name":"x","v":[1,2]}},"token":"t0k!"}')
    assert reg.node_id == "gpu-01.eu"
    assert p.decode(b"\x00\x01", limit=2, parse=p.parse_client) == b"\x00\x01"
    with pytest.raises(p.ProtocolError) as info:
        p.decode(b"\x00\x01\x02", limit=2, parse=p.parse_client)
    assert info.value.code == p.FRAME_TOO_LARGE and info.value.fatal
