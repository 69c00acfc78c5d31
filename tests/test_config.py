import subprocess
import sys

import attrs
import pytest

from scheduler import config
from scheduler.cli import build_parser


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


@pytest.mark.parametrize("command", [[], ["serve"], ["node"], ["client"]])
def test_help_runs(command):
    proc = subprocess.run([sys.executable, "-m", "scheduler", *command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "usage: scheduler" in proc.stdout
