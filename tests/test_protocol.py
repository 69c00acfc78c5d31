import json

import pytest

from scheduler import protocol as p


def test_session_init_defaults_and_round_trip():
    msg = p.parse_client('{"type":"session_init","src_lang":"zh","tgt_langs":["en","de"]}')
    assert msg == p.SessionInit(src_lang="zh", tgt_langs=["en", "de"])
    assert msg.sample_rate == 16000 and msg.session_id is None
    assert json.loads(p.encode(msg))["type"] == "session_init"


@pytest.mark.parametrize(
    "frame, fragment",
    [
        ("not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        ('{"kind":"x"}', "string field 'type'"),
        ('{"type":"hello"}', "unknown message type 'hello'"),
        ('{"type":"session_init","src_lang":"zh","tgt_langs":"en"}', "expected a list"),
        ('{"type":"session_init","src_lang":5,"tgt_langs":["en"]}', "expected a string"),
        ('{"type":"session_init","tgt_langs":["en"]}', "required field missing @ $.src_lang"),
        ('{"type":"session_init","src_lang":"zh","tgt_langs":[]}', "non-empty"),
        ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"sample_rate":"16000"}', "expected an integer"),
        ('{"type":"session_init","src_lang":"zh","tgt_langs":["en"],"sample_rate":true}', "boolean"),
        ('{"type":"audio_chunk","data":"AAA=","is_final":1}', "expected a boolean"),
    ],
)
def test_bad_client_frames_name_the_problem(frame, fragment):
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client(frame)
    assert info.value.code == p.BAD_MESSAGE
    assert not info.value.fatal
    assert fragment in info.value.message


def test_audio_chunk_base64_checked_when_decoded():
    assert p.parse_client('{"type":"audio_chunk","data":"AAEC"}').pcm == b"\x00\x01\x02"
    with pytest.raises(p.ProtocolError):
        p.parse_client('{"type":"audio_chunk","data":"***"}').pcm  # noqa: B018


def test_node_register_pools_default_to_one_per_pair():
    reg = p.parse_node('{"type":"register","node_id":"n1","lang_pairs":[["zh","en"],["zh","de"]],"max_jobs":2}')
    assert reg.pool_pairs() == [("zh-en", "zh", "en"), ("zh-de", "zh", "de")]
    reg = p.parse_node('{"type":"register","node_id":"n1","lang_pairs":[["zh","en"]],"max_jobs":2,"pools":["gpu"]}')
    assert reg.pool_pairs() == [("gpu", "zh", "en")]


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"register","node_id":"n","lang_pairs":["zh"],"max_jobs":2}',
        '{"type":"register","node_id":"n","lang_pairs":[["zh","en","x"]],"max_jobs":2}',
        '{"type":"register","node_id":"n","lang_pairs":[["zh","en"]],"max_jobs":0}',
        '{"type":"register","node_id":"","lang_pairs":[["zh","en"]],"max_jobs":1}',
        '{"type":"job_result","job_id":"1","attempt":1,"status":"maybe"}',
        '{"type":"heartbeat","load":[1]}',
        '{"type":"heartbeat","load_score":1.01}',
        '{"type":"heartbeat","load_score":-0.1}',
        '{"type":"heartbeat","load_score":"0.5"}',
        '{"type":"heartbeat","load_score":true}',
        '{"type":"heartbeat","load_score":1e999}',
    ],
)
def test_bad_node_frames(frame):
    with pytest.raises(p.ProtocolError):
        p.parse_node(frame)


def test_a_load_score_is_a_number_from_0_to_1_and_optional():
    assert p.parse_node('{"type":"heartbeat","load_score":0}').load_score == 0.0
    assert p.parse_node('{"type":"heartbeat","load_score":1}').load_score == 1.0
    assert p.parse_node('{"type":"heartbeat"}').load_score is None
    assert "load_score" not in json.loads(p.encode(p.Heartbeat()))
    assert json.loads(p.encode(p.Heartbeat(load_score=0.5)))["load_score"] == 0.5
    with pytest.raises(p.ProtocolError, match="load_score must be a number from 0 to 1"):
        p.parse_node('{"type":"heartbeat","load_score":2}')


def test_client_and_node_message_sets_are_separate():
    with pytest.raises(p.ProtocolError):
        p.parse_client('{"type":"heartbeat"}')
    with pytest.raises(p.ProtocolError):
        p.parse_node('{"type":"finalize"}')


def test_result_encoding_matches_protocol_fields():
    result = p.Result(utterance_index=3, status="FAILED", reason="pause", turn_id="t", source_text=None,
                      translations={"en": p.Translation(status="FAILED", error="NO_AVAILABLE_NODE")})
    wire = json.loads(p.encode(result))
    assert wire == {
        "type": "result", "utterance_index": 3, "status": "FAILED", "reason": "pause", "turn_id": "t",
        "source_text": None,
        "translations": {"en": {"status": "FAILED", "text": None, "node_id": None, "error": "NO_AVAILABLE_NODE"}},
    }
    assert p.parse_from_daemon(p.encode(result), "client") == result


def test_unknown_fields_are_ignored():
    assert p.parse_client('{"type":"finalize","extra":1}') == p.Finalize()


def test_job_assign_encoding_splices_the_audio_and_round_trips():
    from scheduler.protocol import JobAssign, encode, parse_from_daemon

    assign = JobAssign(job_id="7", attempt=2, job_key="s:0:translate:en", session_id="s", utterance_index=0,
                       job_type="translate:en", src_lang="zh", tgt_lang="en", turn_id="s:t1", sample_rate=16000,
                       audio="AAEC/+8=", deadline_ms=123)
    text = encode(assign)
    assert text.startswith('{"type":"job_assign",') and text.endswith(',"audio":"AAEC/+8="}')
    assert parse_from_daemon(text, "node") == assign
