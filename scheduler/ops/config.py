"""Daemon settings: one attrs class, one source of truth for flags, env vars and defaults.

Every field of :class:`Settings` is a daemon option. Its command-line flag is the field
name with dashes (``pause_ms`` -> ``--pause-ms``), its environment variable is the
upper-cased name with a ``SCHEDULER_`` prefix (``SCHEDULER_PAUSE_MS``), and its key in the
TOML config file is the name itself (``pause_ms = 800``). Precedence: flag, then
environment, then config file, then the default written here. The config file is
``--config PATH`` (or ``SCHEDULER_CONFIG``), else :data:`DEFAULT_CONFIG_FILE` when it
exists. ``--help`` is generated from the ``help`` metadata below, so it cannot drift from
the code.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tomllib
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from scheduler.ops import redis_url, secrets

ENV_PREFIX = "SCHEDULER_"
DEFAULT_CONFIG_FILE = "/etc/scheduler/scheduler.toml"
OVERLOAD_LAG_MS = 5  # the overload guard's default, by measurement (docs/performance.md, "Overload")


def _opt(default: Any, help: str, *, group: str = "daemon") -> Any:
    return attrs.field(default=default, metadata={"help": help, "group": group})


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@attrs.frozen(kw_only=True)
class Settings:
    # Listeners
    ws_host: str = _opt("127.0.0.1", "address of the WebSocket listener (clients and nodes)", group="listeners")
    ws_port: int = _opt(8765, "port of the WebSocket listener; 0 picks a free port", group="listeners")
    reuse_port: bool = _opt(False, "bind the WebSocket port with SO_REUSEPORT, so that several daemon processes on "
                                   "this box share it (each must have its own instance_id and admin_port)", group="listeners")
    admin_host: str = _opt("127.0.0.1", "address of the admin HTTP listener (/metrics, /healthz, /readyz)", group="listeners")
    admin_port: int = _opt(8766, "port of the admin HTTP listener; 0 picks a free port", group="listeners")
    tls_cert: str | None = _opt(None, "PEM certificate chain: with tls_key, serve wss:// and https:// (the admin "
                                      "listener too) instead of ws:// and http://", group="listeners")
    tls_key: str | None = _opt(None, "PEM private key of tls_cert", group="listeners")
    init_timeout_ms: int = _opt(10000, "a connection that has not sent a valid session_init or register this long after "
                                       "its handshake gets INIT_TIMEOUT and a 1008 close", group="listeners")
    max_connections: int = _opt(0, "WebSocket connections this process holds at once; past it a handshake is refused "
                                   "with HTTP 503 and Retry-After; 0: what the open-file limit allows, less headroom",
                                group="listeners")
    max_connections_per_ip: int = _opt(0, "WebSocket connections one peer address holds at once (503 past it); 0: no "
                                          "limit. Only for a daemon that peers reach directly: behind a proxy every "
                                          "peer has the proxy's address", group="listeners")

    # Security (docs/security.md): tokens accept several comma-separated values, for rotation
    admin_token: str | None = _opt(None, "token required as 'Authorization: Bearer' on every admin path but /healthz and "
                                         "/readyz; required when admin_host is not loopback (or insecure_open_admin)",
                                   group="security")
    admin_token_file: str | None = _opt(None, "read admin_token from this file (or the systemd credential admin_token)",
                                        group="security")
    node_token_file: str | None = _opt(None, "read node_token from this file (or the systemd credential node_token)",
                                       group="security")
    client_api_keys_file: str | None = _opt(None, "read client_api_keys from this file (or the systemd credential "
                                                  "client_api_keys)", group="security")
    redis_url_file: str | None = _opt(None, "read redis_url (it may hold a password) from this file (or the systemd "
                                            "credential redis_url)", group="security")
    insecure_open_nodes: bool = _opt(False, "let ws_host be off loopback without node_token: anyone who can reach the "
                                            "port may register as a node and receive users' audio (a warning at every "
                                            "start)", group="security")
    insecure_open_admin: bool = _opt(False, "let admin_host be off loopback without admin_token (a warning at every "
                                            "start)", group="security")

    # Browsers (docs/web-apps.md)
    allowed_origins: str = _opt("*", "browser origins (scheme://host[:port], comma-separated; '*': any) allowed to open "
                                     "/v1/session; a handshake without Origin (not a browser) is not affected", group="browsers")
    node_allowed_origins: str | None = _opt(None, "browser origins allowed to open /v1/node; unset: a handshake that "
                                                  "carries an Origin is refused (a web page never registers as a node)",
                                            group="browsers")
    admin_cors_origins: str | None = _opt(None, "origins ('*': any) allowed to read the admin JSON (/status, /healthz, "
                                                "/readyz) from another site (CORS); unset: none", group="browsers")

    # Redis
    redis_url: str | None = _opt(
        None,
        "Redis/Valkey URL (redis://host:port/db, rediss:// for TLS, unix:///path.sock; a Redis Cluster node's URL is "
        "detected and used as a cluster; redis+sentinel://h1:26379,h2:26379/NAME follows the primary Sentinel "
        "names NAME across failovers); when unset an embedded "
        "valkey-server is started as a child process and stopped on exit",
        group="redis",
    )
    data_dir: str | None = _opt(
        None, "directory for the embedded Valkey's socket and data; default: a fresh temp dir removed on exit", group="redis"
    )
    redis_pool_size: int = _opt(4, "Redis connections used by the batching adapter (one pipeline in flight per connection)", group="redis")
    embedded_maxmemory_mb: int = _opt(1024, "memory the embedded Valkey may use (maxmemory, MiB); it never evicts "
                                            "(noeviction): full, it refuses writes instead of deleting keys", group="redis")
    redis_wait_replicas: int = _opt(0, "after each batch of writes, WAIT until this many replicas hold them (a Sentinel or "
                                       "replicated primary; not on a Cluster): a failover then loses no acknowledged write. "
                                       "While fewer replicas acknowledge within redis_wait_timeout_ms, writes count as not "
                                       "done: /readyz is 503, new sessions are refused, answers are held and retried. "
                                       "0: no WAIT (asynchronous replication)", group="redis")
    redis_wait_timeout_ms: int = _opt(1000, "how long one WAIT may take before the writes count as not replicated",
                                      group="redis")
    redis_shards: int = _opt(1, "scheduling shards (key layout 2, for a Redis Cluster): sessions get their own hash tag "
                                "and nodes, jobs and leases are split over this many shards, so that every primary "
                                "carries its share: the primary count, or a multiple of it (a job whose shard has no "
                                "free node when it must move goes to another shard). 1: one hash tag for "
                                "all scheduling state (layout 1). Every daemon sharing a Redis must use the same value "
                                "(checked at start-up)", group="redis")
    allow_evicting_redis: bool = _opt(False, "start even when Redis has an evicting maxmemory-policy (it then deletes "
                                             "session, job and answer keys silently when it fills; a warning at every "
                                             "start); without it such a Redis makes serve exit 2", group="redis")

    # Session timing (protocol.md limits)
    pause_ms: int = _opt(800, "finalize (reason pause) after this much time without audio or of trailing silence", group="session")
    utterance_timeout_ms: int = _opt(15000, "finalize (reason timeout) an utterance older than this (wall clock)", group="session")
    max_utterance_ms: int = _opt(20000, "finalize (reason max_duration) when buffered audio reaches this length", group="session")
    result_deadline_ms: int = _opt(30000, "after finalize, wait this long for answers before SKIPPED", group="session")
    idle_timeout_ms: int = _opt(60000, "close a session with no client message for this long", group="session")
    max_pending_events: int = _opt(128, "unprocessed client events per session before backpressure", group="session")
    max_realtime_factor: float = _opt(
        4.0, "a session may send audio up to this many times faster than real time (after a 10 s burst); a faster "
             "client is read more slowly (TCP pushes back on it alone). 0: no limit", group="session")
    max_jobs_per_session: int = _opt(
        16, "translations one session may have unanswered (waiting or running) per target language; at it, the session "
           "takes no more input until one is answered (its client is read more slowly: TCP pushes back on it alone). "
           "0: no bound", group="session")
    max_sessions: int = _opt(
        0, "sessions this instance holds at most (per worker under --workers); past it session_init gets SERVER_FULL "
           "with retry_after_ms (close 1013) and /readyz is 503; the last twentieth (at least 1, unless the limit is 1) is kept for resumes. "
           "0: no limit (docs/operations.md: sizing)", group="session")
    overload_lag_ms: int = _opt(
        OVERLOAD_LAG_MS, "overload guard: refuse new sessions (SERVER_FULL, /readyz 503) once the event loop has run "
                         "this late (smoothed over about a second) for two seconds; admitted sessions keep their service "
                         "and resumes are admitted; released below half of it. 0: off", group="session")
    max_frame_bytes: int = _opt(1048576, "largest accepted WebSocket frame; larger ones get FRAME_TOO_LARGE", group="session")
    max_messages_per_s: int = _opt(
        500, "per connection (client or node): frames read per second at most; faster peers are read more slowly", group="session")
    client_api_keys: str | None = _opt(
        None, "comma-separated API keys; when set, clients must send one (Authorization: Bearer KEY header or "
              "api_key in session_init) or get UNAUTHORIZED", group="session")
    silence_dbfs: float = _opt(-40.0, "a frame whose RMS is below this level (dBFS) is silence", group="session")
    drain_timeout_ms: int = _opt(10000, "on SIGTERM, how long to wait for outstanding results before closing", group="session")
    resume_keep_results: int = _opt(
        256, "results kept in Redis per session for a resume (session_init with session_id + resume_from): "
             "the last this many; 0 turns the resume journal off (no resume, one Redis call less per "
             "result: an utterance's entry is written by its first job's creation)", group="session")

    # Nodes
    heartbeat_interval_ms: int = _opt(2000, "interval nodes are told to heartbeat at", group="nodes")
    node_ttl_ms: int = _opt(6000, "a node without heartbeat for this long is offline", group="nodes")
    job_lease_ms: int = _opt(15000, "a job not answered within this is dispatched again (attempt + 1) on another node", group="nodes")
    node_token: str | None = _opt(None, "shared secret nodes must send in register (several: comma-separated, for "
                                        "rotation); unset: no check, allowed only on loopback or with "
                                        "insecure_open_nodes", group="nodes")
    locality_slack: float = _opt(
        0.25, "several instances: a node attached to this instance is chosen over a less loaded one elsewhere "
              "while its load (busy slots / max_jobs) is at most this much higher; 0: only on a tie, 1: always "
              "when one is free (jobs that cross instances cost the relay)", group="nodes")
    node_load_threshold: float = _opt(
        0.75, "a node whose heartbeat's load_score is above this gets no new jobs (its turns' next jobs go to "
              "another node); when every node of a language pair is above it, jobs wait as for a full pool. "
              "1: never", group="nodes")

    # Process
    instance_id: str = _opt(attrs.Factory(_default_instance_id), "id of this daemon instance (default: host-pid-random)", group="process")
    owner_ttl_ms: int = _opt(3000, "this instance's liveness and its session / node owner keys in Redis lapse this long "
                             "after its last refresh (refreshed every third of it)", group="process")
    log_level: str = _opt("info", "log level: debug, info, warning, error", group="process")
    workers: str = _opt("1", "daemon processes on this box sharing ws_port (SO_REUSEPORT) under one supervisor with one "
                             "admin port; 'auto': one per CPU core. Each worker is instance <instance_id>-w<i>", group="process")

    def __attrs_post_init__(self) -> None:
        errors = validate(self)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def api_keys(self) -> list[str]:
        return secrets.tokens(self.client_api_keys)

    @property
    def node_tokens(self) -> list[str]:
        return secrets.tokens(self.node_token)

    @property
    def admin_tokens(self) -> list[str]:
        return secrets.tokens(self.admin_token)

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
    "max_pending_events", "max_frame_bytes", "heartbeat_interval_ms", "node_ttl_ms", "owner_ttl_ms", "redis_pool_size", "job_lease_ms",
    "max_messages_per_s", "init_timeout_ms", "embedded_maxmemory_mb", "redis_wait_timeout_ms",
)


def is_loopback(host: str) -> bool:
    """Whether a listener on ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def validate(s: Settings) -> list[str]:
    errors = [f"{name} must be > 0 (got {getattr(s, name)})" for name in _POSITIVE if getattr(s, name) <= 0]
    for name in ("ws_port", "admin_port"):
        if not 0 <= getattr(s, name) <= 65535:
            errors.append(f"{name} must be a port number 0-65535 (got {getattr(s, name)})")
    for name in ("resume_keep_results", "max_sessions", "overload_lag_ms", "max_jobs_per_session"):
        if getattr(s, name) < 0:
            errors.append(f"{name} must be >= 0 (got {getattr(s, name)})")
    if not 1 <= s.redis_shards <= 1024:
        errors.append(f"redis_shards must be between 1 and 1024 (got {s.redis_shards})")
    if s.redis_wait_replicas < 0:
        errors.append(f"redis_wait_replicas must be >= 0 (got {s.redis_wait_replicas})")
    elif s.redis_wait_replicas and not s.redis_url:
        errors.append("redis_wait_replicas needs redis_url: the embedded Valkey has no replicas")
    if s.drain_timeout_ms < 0:
        errors.append(f"drain_timeout_ms must be >= 0 (got {s.drain_timeout_ms})")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        errors.append(f"log_level must be debug, info, warning or error (got {s.log_level!r})")
    if s.workers != "auto" and not (s.workers.isdigit() and int(s.workers) >= 1):
        errors.append(f"workers must be 'auto' or a number >= 1 (got {s.workers!r})")
    if not 0 <= s.locality_slack <= 1:
        errors.append(f"locality_slack must be between 0 and 1 (got {s.locality_slack})")
    if s.max_realtime_factor < 0 or 0 < s.max_realtime_factor < 1:
        errors.append(f"max_realtime_factor must be 0 (off) or at least 1 (got {s.max_realtime_factor})")
    if not 0 < s.node_load_threshold <= 1:
        errors.append(f"node_load_threshold must be above 0 and at most 1 (got {s.node_load_threshold})")
    if s.owner_ttl_ms < 300:
        errors.append(f"owner_ttl_ms must be >= 300 (got {s.owner_ttl_ms})")
    if s.node_ttl_ms <= s.heartbeat_interval_ms:
        errors.append("node_ttl_ms must be larger than heartbeat_interval_ms")
    if (s.tls_cert is None) != (s.tls_key is None):
        errors.append("tls_cert and tls_key go together: set both or neither")
    for name in ("tls_cert", "tls_key"):
        path = getattr(s, name)
        if path is not None and not os.path.isfile(path):
            errors.append(f"{name}: no such file {path!r}")
    if s.redis_url and redis_url.is_sentinel(s.redis_url):
        try:
            redis_url.parse_sentinel(s.redis_url)
        except redis_url.RedisURLError as exc:
            errors.append(f"redis_url: {exc}")
    for name in ("max_connections", "max_connections_per_ip"):
        if getattr(s, name) < 0:
            errors.append(f"{name} must be >= 0 (got {getattr(s, name)})")
    return errors + protected_mode(s)


def protected_mode(s: Settings) -> list[str]:
    """A listener off loopback needs its token, unless the operator says it may be open."""
    errors = []
    if not is_loopback(s.ws_host) and not s.node_tokens and not s.insecure_open_nodes:
        errors.append(f"ws_host {s.ws_host} is not loopback and no node_token is set: anyone who can reach the port could "
                      "register as a node and receive users' audio. Set --node-token (or --node-token-file), or "
                      "--insecure-open-nodes to run open anyway")
    if not is_loopback(s.admin_host) and not s.admin_tokens and not s.insecure_open_admin:
        errors.append(f"admin_host {s.admin_host} is not loopback and no admin_token is set: anyone who can reach it could "
                      "read every session and node. Set --admin-token (or --admin-token-file), or --insecure-open-admin "
                      "to run open anyway")
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
    """Add ``--config`` and one flag per setting, grouped, with its default and env var in the help."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML config file (keys are the setting names; default: {DEFAULT_CONFIG_FILE} if it "
                             f"exists; env {ENV_PREFIX}CONFIG)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in attrs.fields(Settings):
        group_name = field.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(f"{group_name} options"))
        default = field.default
        shown = "generated" if isinstance(default, attrs.Factory) else ("unset" if default is None else default)
        if _field_type(field) is bool:  # a switch: --reuse-port turns it on
            group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, action="store_const", const=True,
                               default=None, help=f"{field.metadata['help']} (default: off; env {env_name(field.name)}=1)")
            continue
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_field_type(field),
            default=None,
            metavar=_metavar(field),
            help=f"{field.metadata['help']} (default: {shown}; env {env_name(field.name)})",
        )


def _metavar(field: attrs.Attribute) -> str:
    """``--pause-ms MS``, ``--ws-port PORT``, ``--max-connections N``, ``--node-token VALUE``."""
    if _field_type(field) is str:
        return "VALUE"
    last = field.name.split("_")[-1].upper()
    return "N" if last in ("CONNECTIONS", "IP") else last


def _coerce(field: attrs.Attribute, value: Any, where: str) -> Any:
    """A config-file value of the field's type (an int is fine for a float, a bool is no int)."""
    kind = _field_type(field)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
        raise ConfigError(f"{where}: {field.name} must be {what}, got {value!r}")
    return value


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def load_file(path: str) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys named like the settings; [tables] are
    allowed for grouping and flattened. An unknown key or a wrong type is a ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, v in items:
            flat[name] = v
    fields = {f.name: f for f in attrs.fields(Settings)}
    values = {}
    for name, value in flat.items():
        if name not in fields:
            raise ConfigError(f"{path}: unknown key {name!r} (see 'scheduler serve --help' for the settings)")
        values[name] = _coerce(fields[name], value, path)
    return values


def config_path(flags: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """The config file in force: --config, then SCHEDULER_CONFIG, then the default if it exists."""
    path = flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        return path
    return DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None


def from_sources(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                 *, sources: dict[str, str] | None = None) -> Settings:
    """Build settings from flags (winning), environment variables, the config file, defaults.

    Raises :class:`ConfigError` naming the key when a value does not parse or validate.
    ``sources``, when given, is filled with where each setting came from.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    path = config_path(flags, environ)
    from_file = load_file(path) if path else {}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for field in attrs.fields(Settings):
        raw = environ.get(env_name(field.name))
        if flags.get(field.name) is not None:
            values[field.name], origin[field.name] = flags[field.name], "flag"
        elif raw not in (None, ""):
            kind = _field_type(field)
            try:
                values[field.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ConfigError(f"{env_name(field.name)}={raw!r} is not a valid {kind.__name__}") from None
            origin[field.name] = "env"
        elif field.name in from_file:
            values[field.name], origin[field.name] = from_file[field.name], f"file {path}"
        else:
            origin[field.name] = "default"
    _resolve_secrets(values, origin, environ)
    settings = Settings(**values)
    if sources is not None:
        sources.update(origin)
    return settings


def _resolve_secrets(values: dict[str, Any], origin: dict[str, str], environ: Mapping[str, str]) -> None:
    """Fill each secret from its ``<name>_file``, else from the systemd credential of its name,
    when it was not given itself (both given: an error)."""
    for name in secrets.SECRETS:
        path = values.get(f"{name}_file")
        try:
            if path is not None:
                if values.get(name) is not None:
                    raise ConfigError(f"{name} and {name}_file are both set: set one")
                values[name], origin[name] = secrets.read_file(name, path), f"file {path}"
            elif values.get(name) is None and (found := secrets.credential(name, environ)) is not None:
                values[name], origin[name] = found, "systemd credential"
        except secrets.SecretError as exc:
            raise ConfigError(str(exc)) from None


def render(settings: Settings, sources: Mapping[str, str]) -> str:
    """The effective configuration as TOML, each line commented with where it came from."""
    lines = []
    for field in attrs.fields(Settings):
        value = getattr(settings, field.name)
        if field.name == "redis_url" and value is not None:
            shown = _toml(secrets.redacted(value))
        elif field.name in secrets.SECRETS and value is not None:
            shown = f'"{secrets.HIDDEN}"'
        elif value is None:
            lines.append(f"# {field.name} = (unset)  # {sources.get(field.name, 'default')}")
            continue
        else:
            shown = _toml(value)
        lines.append(f"{field.name} = {shown}  # {sources.get(field.name, 'default')}")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
