"""Daemon settings: one attrs class, one source of truth for flags, env vars and defaults.

Every field of :class:`Settings` is a daemon option. Its command-line flag is the field
name with dashes (``pause_ms`` -> ``--pause-ms``) and its environment variable is the
upper-cased name with a ``SCHEDULER_`` prefix (``SCHEDULER_PAUSE_MS``). Precedence:
flag, then environment, then the default written here. ``--help`` is generated from
the ``help`` metadata below, so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

ENV_PREFIX = "SCHEDULER_"


def _opt(default: Any, help: str, *, group: str = "daemon") -> Any:
    return attrs.field(default=default, metadata={"help": help, "group": group})


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@attrs.frozen(kw_only=True)
class Settings:
    # Listeners
    ws_host: str = _opt("127.0.0.1", "address of the WebSocket listener (clients and nodes)", group="listeners")
    ws_port: int = _opt(8765, "port of the WebSocket listener; 0 picks a free port", group="listeners")
    admin_host: str = _opt("127.0.0.1", "address of the admin HTTP listener (/metrics, /healthz, /readyz)", group="listeners")
    admin_port: int = _opt(8766, "port of the admin HTTP listener; 0 picks a free port", group="listeners")

    # Redis
    redis_url: str | None = _opt(
        None,
        "Redis/Valkey URL (redis://host:port/db or unix:///path.sock); when unset an embedded "
        "valkey-server is started as a child process and stopped on exit",
        group="redis",
    )
    data_dir: str | None = _opt(
        None, "directory for the embedded Valkey's socket and data; default: a fresh temp dir removed on exit", group="redis"
    )
    redis_pool_size: int = _opt(4, "Redis connections used by the batching adapter (one pipeline in flight per connection)", group="redis")

    # Session timing (protocol.md limits)
    pause_ms: int = _opt(800, "finalize (reason pause) after this much time without audio or of trailing silence", group="session")
    utterance_timeout_ms: int = _opt(15000, "finalize (reason timeout) an utterance older than this (wall clock)", group="session")
    max_utterance_ms: int = _opt(20000, "finalize (reason max_duration) when buffered audio reaches this length", group="session")
    result_deadline_ms: int = _opt(30000, "after finalize, wait this long for answers before SKIPPED", group="session")
    idle_timeout_ms: int = _opt(60000, "close a session with no client message for this long", group="session")
    max_pending_events: int = _opt(128, "unprocessed client events per session before backpressure", group="session")
    max_frame_bytes: int = _opt(1048576, "largest accepted WebSocket frame; larger ones get FRAME_TOO_LARGE", group="session")
    silence_dbfs: float = _opt(-40.0, "a frame whose RMS is below this level (dBFS) is silence", group="session")
    drain_timeout_ms: int = _opt(10000, "on SIGTERM, how long to wait for outstanding results before closing", group="session")

    # Nodes
    heartbeat_interval_ms: int = _opt(2000, "interval nodes are told to heartbeat at", group="nodes")
    node_ttl_ms: int = _opt(6000, "a node without heartbeat for this long is offline", group="nodes")
    job_lease_ms: int = _opt(15000, "a job not answered within this is dispatched again (attempt + 1) on another node", group="nodes")
    node_token: str | None = _opt(None, "shared secret nodes must send in register; unset: no check", group="nodes")

    # Process
    instance_id: str = _opt(attrs.Factory(_default_instance_id), "id of this daemon instance (default: host-pid-random)", group="process")
    log_level: str = _opt("info", "log level: debug, info, warning, error", group="process")

    def __attrs_post_init__(self) -> None:
        errors = validate(self)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def limits(self) -> dict[str, int]:
        """The limits object of ``session_ready`` (protocol.md)."""
        return {
            "max_pending_events": self.max_pending_events,
            "pause_ms": self.pause_ms,
            "utterance_timeout_ms": self.utterance_timeout_ms,
            "max_utterance_ms": self.max_utterance_ms,
            "result_deadline_ms": self.result_deadline_ms,
            "idle_timeout_ms": self.idle_timeout_ms,
        }


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the key."""


_POSITIVE = (
    "pause_ms", "utterance_timeout_ms", "max_utterance_ms", "result_deadline_ms", "idle_timeout_ms",
    "max_pending_events", "max_frame_bytes", "heartbeat_interval_ms", "node_ttl_ms", "redis_pool_size", "job_lease_ms",
)


def validate(s: Settings) -> list[str]:
    errors = [f"{name} must be > 0 (got {getattr(s, name)})" for name in _POSITIVE if getattr(s, name) <= 0]
    for name in ("ws_port", "admin_port"):
        if not 0 <= getattr(s, name) <= 65535:
            errors.append(f"{name} must be a port number 0-65535 (got {getattr(s, name)})")
    if s.drain_timeout_ms < 0:
        errors.append(f"drain_timeout_ms must be >= 0 (got {s.drain_timeout_ms})")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        errors.append(f"log_level must be debug, info, warning or error (got {s.log_level!r})")
    if s.node_ttl_ms <= s.heartbeat_interval_ms:
        errors.append("node_ttl_ms must be larger than heartbeat_interval_ms")
    return errors


def _field_type(field: attrs.Attribute) -> type:
    t = field.type
    if isinstance(t, str):  # postponed annotations
        t = t.replace(" | None", "")
        return {"str": str, "int": int, "float": float, "bool": bool}[t]
    return t


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting, grouped, with its default and env var in the help."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in attrs.fields(Settings):
        group_name = field.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(f"{group_name} options"))
        default = field.default
        shown = "generated" if isinstance(default, attrs.Factory) else ("unset" if default is None else default)
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_field_type(field),
            default=None,
            metavar=field.name.split("_")[-1].upper() if _field_type(field) is not str else "VALUE",
            help=f"{field.metadata['help']} (default: {shown}; env {env_name(field.name)})",
        )


def from_sources(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from flags (winning), then environment variables, then defaults.

    Raises :class:`ConfigError` naming the key when a value does not parse or validate.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in attrs.fields(Settings):
        if flags.get(field.name) is not None:
            values[field.name] = flags[field.name]
            continue
        raw = environ.get(env_name(field.name))
        if raw is None or raw == "":
            continue
        kind = _field_type(field)
        try:
            values[field.name] = kind(raw)
        except ValueError:
            raise ConfigError(f"{env_name(field.name)}={raw!r} is not a valid {kind.__name__}") from None
    return Settings(**values)
