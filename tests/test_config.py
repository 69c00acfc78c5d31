import subprocess
import sys

import attrs
import pytest

from scheduler.cli import build_parser
from scheduler.ops import config


def test_defaults_match_protocol():
    s = config.from_sources({}, {})
    assert (s.ws_host, s.ws_port, s.admin_port) == ("127.0.0.1", 8765, 8766)
    assert s.limits == {
        "max_pending_events": 128, "pause_ms": 800, "utterance_timeout_ms": 15000, "max_utterance_ms": 20000,
        "result_deadline_ms": 30000, "idle_timeout_ms": 60000,
    }
    assert (s.heartbeat_interval_ms, s.node_ttl_ms, s.max_frame_bytes, s.drain_timeout_ms) == (2000, 6000, 1048576, 10000)
    assert s.redis_url is None and s.silence_dbfs == -40.0


def test_flag_beats_env_beats_default():
    env = {"SCHEDULER_PAUSE_MS": "500", "SCHEDULER_WS_PORT": "9000"}
    s = config.from_sources({"pause_ms": 300}, env)
    assert s.pause_ms == 300 and s.ws_port == 9000 and s.idle_timeout_ms == 60000


def test_bad_env_value_names_the_variable():
    with pytest.raises(config.ConfigError, match="SCHEDULER_PAUSE_MS"):
        config.from_sources({}, {"SCHEDULER_PAUSE_MS": "soon"})


def test_invalid_values_name_the_key():
    with pytest.raises(config.ConfigError, match="pause_ms must be > 0"):
        config.from_sources({"pause_ms": 0}, {})
    with pytest.raises(config.ConfigError, match="node_ttl_ms"):
        config.from_sources({"node_ttl_ms": 1000, "heartbeat_interval_ms": 2000}, {})


def test_every_setting_has_a_flag_with_default_and_env_in_help():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    for field in attrs.fields(config.Settings):
        assert "--" + field.name.replace("_", "-") in text
        assert config.env_name(field.name) in " ".join(text.split())


def test_cli_bad_config_exits_2():
    proc = subprocess.run([sys.executable, "-m", "scheduler", "serve", "--pause-ms", "-5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pause_ms must be > 0" in proc.stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["node"], ["client"], ["config", "check"]])
def test_help_runs(command):
    proc = subprocess.run([sys.executable, "-m", "scheduler", *command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "usage: scheduler" in proc.stdout


def write(tmp_path, text):
    path = tmp_path / "scheduler.toml"
    path.write_text(text)
    return str(path)


def test_config_file_sits_between_env_and_defaults(tmp_path):
    path = write(tmp_path, "pause_ms = 700\nws_port = 9100\n[session]\nsilence_dbfs = -35\n")
    sources = {}
    s = config.from_sources({"config": path, "ws_port": 9200}, {"SCHEDULER_PAUSE_MS": "600"}, sources=sources)
    assert (s.ws_port, s.pause_ms, s.silence_dbfs, s.idle_timeout_ms) == (9200, 600, -35.0, 60000)
    assert (sources["ws_port"], sources["pause_ms"], sources["silence_dbfs"], sources["idle_timeout_ms"]) == (
        "flag", "env", f"file {path}", "default")


def test_config_file_from_env_variable(tmp_path):
    path = write(tmp_path, "pause_ms = 650\n")
    assert config.from_sources({}, {"SCHEDULER_CONFIG": path}).pause_ms == 650


@pytest.mark.parametrize("text, fragment", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("ws_port = \"x\"\n", "ws_port must be an integer"),
    ("ws_port = true\n", "ws_port must be an integer"),
    ("pause_ms = -1\n", "pause_ms must be > 0"),
    ("pause_ms = \n", "not valid TOML"),
])
def test_bad_config_file_names_the_key(tmp_path, text, fragment):
    with pytest.raises(config.ConfigError, match=fragment):
        config.from_sources({"config": write(tmp_path, text)}, {})


def test_config_check_prints_effective_settings_and_exits_2_on_errors(tmp_path):
    path = write(tmp_path, "pause_ms = 700\nnode_token = \"s3cret\"\n")
    ok = subprocess.run([sys.executable, "-m", "scheduler", "config", "check", "--config", path, "--ws-port", "9300"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"pause_ms = 700  # file {path}" in ok.stdout and "ws_port = 9300  # flag" in ok.stdout
    assert "s3cret" not in ok.stdout and 'node_token = "***"' in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "scheduler", "config", "check", "--config", write(tmp_path, "oops = 1\n")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown key 'oops'" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "scheduler", "serve", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr


def test_logs_are_json_lines_off_a_terminal_and_key_value_on_one():
    import json as _json
    import logging as _logging

    from scheduler.ops.logs import JsonFormatter, KeyValueFormatter, event

    records = []

    class Keep(_logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = _logging.getLogger("test.logs")
    logger.addHandler(Keep())
    logger.setLevel(_logging.INFO)
    event(logger, "session_started", session_id="abc", peer="1.2.3.4:5", note="two words")
    (record,) = records
    line = _json.loads(JsonFormatter().format(record))
    assert line["event"] == "session_started" and line["session_id"] == "abc" and line["level"] == "info"
    text = KeyValueFormatter().format(record)
    assert 'event=session_started session_id=abc peer=1.2.3.4:5 note="two words"' in text


def test_a_switch_is_a_flag_and_an_env_boolean():
    assert config.from_sources({}, {}).reuse_port is False
    assert config.from_sources({}, {"SCHEDULER_REUSE_PORT": "true"}).reuse_port is True
    assert config.from_sources({}, {"SCHEDULER_REUSE_PORT": "0"}).reuse_port is False
    args = build_parser().parse_args(["serve", "--reuse-port"])
    assert config.from_sources(vars(args), {"SCHEDULER_REUSE_PORT": "0"}).reuse_port is True
    with pytest.raises(config.ConfigError, match="SCHEDULER_REUSE_PORT"):
        config.from_sources({}, {"SCHEDULER_REUSE_PORT": "maybe"})
