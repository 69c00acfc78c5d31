"""Wire protocol v1: every message of ``docs/protocol.md`` as an attrs class.

Parsing happens once, at the edge, in one function: :func:`decode` takes every inbound
frame of both WebSocket paths and checks, in this order, its size (``FRAME_TOO_LARGE``),
then for a text frame the JSON (orjson: nesting deeper than 1024 levels, lone surrogate
escapes such as ``"\ud800"``, ``NaN`` and ``Infinity`` are refused), the nesting depth
(:data:`MAX_DEPTH`), the ``type``, and finally every field against its documented type,
range and pattern (cattrs structuring plus the validators below: ids, pools, language
codes, tokens; docs/protocol.md "Field rules"). Whatever fails raises
:class:`ProtocolError` ``BAD_MESSAGE`` naming the field, never another exception, so no
unchecked value reaches Redis, a log line, a metric label or another session
(tests/test_decode.py fuzzes this). Types are checked strictly: ``"5"`` is not an int,
``1`` is not a bool, a string is not a list. Unknown fields are ignored (forward
compatibility); unknown ``type`` values are errors. :func:`encode` turns any message
back into one compact JSON text frame.
"""

from __future__ import annotations

import base64
import binascii
import math
import random
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import attrs
import cattrs
import orjson
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.v import format_exception

SUBPROTOCOL = "scheduler.v1"
"""The WebSocket subprotocol of this protocol version (docs/protocol.md, "Handshake")."""
BEARER_PREFIX = "bearer."


def bearer_subprotocol(key: str) -> str:
    """The subprotocol that carries an API key, offered next to :data:`SUBPROTOCOL`
    (browsers cannot set an ``Authorization`` header): ``bearer.<base64url(key)>``, unpadded."""
    return BEARER_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")

# ---------------------------------------------------------------- error codes

BAD_MESSAGE = "BAD_MESSAGE"
NOT_INITIALIZED = "NOT_INITIALIZED"
UNSUPPORTED_LANG_PAIR = "UNSUPPORTED_LANG_PAIR"
UNKNOWN_SESSION = "UNKNOWN_SESSION"
FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
UNAUTHORIZED = "UNAUTHORIZED"
SHUTTING_DOWN = "SHUTTING_DOWN"
DUPLICATE_NODE_ID = "DUPLICATE_NODE_ID"
NOT_REGISTERED = "NOT_REGISTERED"
SLOW_CONSUMER = "SLOW_CONSUMER"
INIT_TIMEOUT = "INIT_TIMEOUT"
INTERNAL = "INTERNAL"
UNAVAILABLE = "UNAVAILABLE"
SERVER_FULL = "SERVER_FULL"

# WebSocket close codes (RFC 6455) used by the protocol.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN_LATER = 1013

class ProtocolError(Exception):
    """A frame that breaks the contract. ``fatal`` errors close the connection."""

    def __init__(self, code: str, message: str, *, fatal: bool = False, close_code: int = CLOSE_POLICY,
                 retry_after_ms: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal
        self.close_code = close_code
        self.retry_after_ms = retry_after_ms


RETRY_AFTER_MS = (1000, 3000)
"""``retry_after_ms`` of an ``UNAVAILABLE`` or ``SERVER_FULL`` refusal is drawn from this
range, so that the peers refused during one episode do not all come back in the same
millisecond."""


def redis_unavailable(exc: BaseException) -> ProtocolError:
    """The fatal ``UNAVAILABLE`` error (close 1013, try again later, with ``retry_after_ms``) a
    peer gets when Redis cannot take its connection's set-up now: unreachable, stalled, full
    (``OOM``), a replica (``READONLY``), loading. The reason word only, never the server's
    address or reply text."""
    reply = getattr(exc, "reply", "connection")
    return ProtocolError(UNAVAILABLE, f"state store unavailable ({reply}), try again later", fatal=True,
                         close_code=CLOSE_TRY_AGAIN_LATER, retry_after_ms=random.randint(*RETRY_AFTER_MS))


ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Node ids, session ids and pool names: they become Redis key parts, log fields and job ids,
so no braces (a Redis Cluster hash tag), colons (key separators), spaces or control characters."""
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
LANG_PATTERN = re.compile(r"[A-Za-z]{1,8}(?:[-_][A-Za-z0-9]{1,8}){0,3}")
"""A BCP 47-like language code (``en``, ``zh-Hans``, ``pt_BR``): letters first, at most 32 characters."""
RESUME_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{22,128}")
"""A session's resume secret as the daemon hands it out (``secrets.token_urlsafe``: 192 bits)."""
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]{0,512}")
"""Tokens and API keys: printable ASCII without spaces, at most 512 characters (an empty one is
let through, to be refused ``UNAUTHORIZED`` like any wrong one)."""
MAX_DEPTH = 16
"""Nesting of a message's JSON, objects and lists counted (``capabilities``, ``load``)."""
MAX_FREE_KEYS = 64
MAX_ATTEMPT = 1_000_000
MAX_ERROR_CHARS = 1000


def _matches(pattern: re.Pattern, what: str):
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and pattern.fullmatch(value) is None:
            raise ValueError(f"{attribute.name} must be {what}")

    return check


_id = _matches(ID_PATTERN, "1-128 characters of A-Z a-z 0-9 . _ - (a letter or digit first)")
_lang = _matches(LANG_PATTERN, "a language code such as en, zh-Hans or pt_BR (letters first, at most 32 characters)")
_token = _matches(TOKEN_PATTERN, "at most 512 printable ASCII characters without spaces")


def _free_object(_inst: Any, attribute: attrs.Attribute, value: dict[str, Any] | None) -> None:
    """``capabilities``, ``load``: any JSON object of at most 64 keys of at most 64 characters."""
    if value is not None and (len(value) > MAX_FREE_KEYS or any(len(k) > 64 for k in value)):
        raise ValueError(f"{attribute.name} must be an object of at most {MAX_FREE_KEYS} keys of at most 64 characters")


def _depth(obj: Any) -> int:
    """How deep ``obj`` nests (a scalar is 0), iteratively: never a RecursionError."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > deepest:
            deepest = level
            if deepest > MAX_DEPTH:
                return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


# ---------------------------------------------------------------- client -> daemon


@attrs.frozen
class SessionInit:
    TYPE: ClassVar[str] = "session_init"
    src_lang: str = attrs.field(validator=_lang)
    tgt_langs: list[str] = attrs.field()
    sample_rate: int = attrs.field(default=16000)
    session_id: str | None = attrs.field(default=None, validator=_id)
    resume_from: int | None = attrs.field(default=None)
    api_key: str | None = attrs.field(default=None, repr=False, validator=_token)  # when the daemon requires client API keys
    resume_token: str | None = attrs.field(  # with session_id: the secret the session's first session_ready carried
        default=None, repr=False, validator=_matches(RESUME_TOKEN_PATTERN, "the resume_token of the session's session_ready"))

    @tgt_langs.validator
    def _check_tgts(self, _attribute: attrs.Attribute, value: list[str]) -> None:
        if not value:
            raise ValueError("tgt_langs must be a non-empty list")
        if len(value) > 16:
            raise ValueError("tgt_langs may name at most 16 languages")
        if len(set(value)) != len(value):
            raise ValueError("tgt_langs must not repeat a language")
        for lang in value:
            _lang(None, _attribute, lang)

    @sample_rate.validator
    def _check_rate(self, _attribute: attrs.Attribute, value: int) -> None:
        if not 4000 <= value <= 192000:
            raise ValueError("sample_rate must be between 4000 and 192000")

    @resume_from.validator
    def _check_resume(self, _attribute: attrs.Attribute, value: int | None) -> None:
        if value is not None and not 0 <= value < 2**53:
            raise ValueError("resume_from must be between 0 and 2^53")


@attrs.frozen
class AudioChunk:
    """``audio_chunk``; ``pcm`` decodes ``data`` and raises ``ProtocolError`` on bad base64."""

    TYPE: ClassVar[str] = "audio_chunk"
    data: str
    is_final: bool = False

    @property
    def pcm(self) -> bytes:
        return _b64decode(self.data)


@attrs.frozen
class Finalize:
    TYPE: ClassVar[str] = "finalize"


@attrs.frozen
class CloseSession:
    TYPE: ClassVar[str] = "close_session"


# ---------------------------------------------------------------- daemon -> client


@attrs.frozen
class SessionReady:
    TYPE: ClassVar[str] = "session_ready"
    session_id: str
    resumed: bool
    next_utterance_index: int
    limits: dict[str, int]
    resume_token: str | None = attrs.field(default=None, repr=False)  # the session's resume secret: keep it, show it nowhere


@attrs.frozen
class UtteranceFinalized:
    TYPE: ClassVar[str] = "utterance_finalized"
    utterance_index: int
    reason: str
    turn_id: str
    audio_ms: int


@attrs.frozen
class Translation:
    status: str
    text: str | None = None
    node_id: str | None = None
    error: str | None = None


@attrs.frozen
class Result:
    TYPE: ClassVar[str] = "result"
    utterance_index: int
    status: str
    reason: str
    turn_id: str
    source_text: str | None
    translations: dict[str, Translation]


@attrs.frozen
class Busy:
    TYPE: ClassVar[str] = "busy"
    backlog: int
    action: str  # "merged" or "early_finalize"


@attrs.frozen
class Error:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False
    retry_after_ms: int | None = None  # UNAVAILABLE, SERVER_FULL: when to try again; left out of the frame when None


@attrs.frozen
class SessionClosed:
    TYPE: ClassVar[str] = "session_closed"
    reason: str  # client_close, idle_timeout, shutdown
    utterances: int


# ---------------------------------------------------------------- node -> daemon


@attrs.frozen
class Register:
    TYPE: ClassVar[str] = "register"
    node_id: str = attrs.field(validator=_id)
    lang_pairs: list[list[str]] = attrs.field()
    max_jobs: int = attrs.field()
    pools: list[str] | None = attrs.field(default=None)
    capabilities: dict[str, Any] | None = attrs.field(default=None, validator=_free_object)
    token: str | None = attrs.field(default=None, repr=False, validator=_token)

    @lang_pairs.validator
    def _check_pairs(self, attribute: attrs.Attribute, value: list[list[str]]) -> None:
        if not value:
            raise ValueError("lang_pairs must be a non-empty list of [src, tgt]")
        if len(value) > 256:
            raise ValueError("lang_pairs may name at most 256 pairs")
        for pair in value:
            if len(pair) != 2:
                raise ValueError("each lang pair must be [src, tgt]")
            for lang in pair:
                _lang(None, attribute, lang)

    @max_jobs.validator
    def _check_max_jobs(self, _attribute: attrs.Attribute, value: int) -> None:
        if not 1 <= value <= 10000:
            raise ValueError("max_jobs must be between 1 and 10000")

    @pools.validator
    def _check_pools(self, attribute: attrs.Attribute, value: list[str] | None) -> None:
        if value is not None:
            if not value or len(value) > 64:
                raise ValueError("pools, when given, must be a list of 1-64 pool names")
            for pool in value:
                _id(None, attribute, pool)

    def pool_pairs(self) -> list[tuple[str, str, str]]:
        """``(pool, src, tgt)`` for each pool and pair this node serves."""
        pairs = [(src, tgt) for src, tgt in self.lang_pairs]
        if self.pools is None:
            return [(f"{src}-{tgt}", src, tgt) for src, tgt in pairs]
        return [(pool, src, tgt) for pool in self.pools for src, tgt in pairs]


def _unit_interval(_inst: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{attribute.name} must be a number from 0 to 1")


@attrs.frozen
class Heartbeat:
    """``load``: free-form, shown as sent. ``load_score``: how busy the node's engine is, 0 (idle)
    to 1 (saturated); above the daemon's ``--node-load-threshold`` the node gets no new jobs.
    A heartbeat without one leaves the node judged by its free slots alone."""

    TYPE: ClassVar[str] = "heartbeat"
    load: dict[str, Any] | None = attrs.field(default=None, validator=_free_object)
    load_score: float | None = attrs.field(default=None, validator=_unit_interval)


@attrs.frozen
class JobResult:
    TYPE: ClassVar[str] = "job_result"
    job_id: str = attrs.field(validator=_matches(JOB_ID_PATTERN, "a job id of 1-64 characters of A-Z a-z 0-9 . _ : -"))
    attempt: int = attrs.field()
    status: Literal["ok", "error"] = attrs.field()
    source_text: str | None = None
    text: str | None = None
    error: str | None = attrs.field(default=None)

    @attempt.validator
    def _check_attempt(self, _attribute: attrs.Attribute, value: int) -> None:
        if not 0 <= value <= MAX_ATTEMPT:
            raise ValueError(f"attempt must be between 0 and {MAX_ATTEMPT}")

    @error.validator
    def _check_error(self, _attribute: attrs.Attribute, value: str | None) -> None:
        if value is not None and len(value) > MAX_ERROR_CHARS:
            raise ValueError(f"error must be at most {MAX_ERROR_CHARS} characters")


@attrs.frozen
class Drain:
    TYPE: ClassVar[str] = "drain"


# ---------------------------------------------------------------- daemon -> node


@attrs.frozen
class Registered:
    TYPE: ClassVar[str] = "registered"
    node_id: str
    heartbeat_interval_ms: int
    node_ttl_ms: int


@attrs.frozen
class JobAssign:
    TYPE: ClassVar[str] = "job_assign"
    job_id: str
    attempt: int
    job_key: str
    session_id: str
    utterance_index: int
    job_type: str
    src_lang: str
    tgt_lang: str
    turn_id: str
    sample_rate: int
    audio: str
    deadline_ms: int


@attrs.frozen
class JobCancel:
    TYPE: ClassVar[str] = "job_cancel"
    job_id: str
    attempt: int


CLIENT_MESSAGES: dict[str, type] = {c.TYPE: c for c in (SessionInit, AudioChunk, Finalize, CloseSession)}
NODE_MESSAGES: dict[str, type] = {c.TYPE: c for c in (Register, Heartbeat, JobResult, Drain)}
DAEMON_TO_CLIENT: dict[str, type] = {
    c.TYPE: c for c in (SessionReady, UtteranceFinalized, Result, Busy, Error, SessionClosed)
}
DAEMON_TO_NODE: dict[str, type] = {c.TYPE: c for c in (Registered, JobAssign, JobCancel, Error)}


# ---------------------------------------------------------------- strict converter


def _strict(kind: type, name: str):
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {name}, got a boolean")
        if not isinstance(value, kind):
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value

    return hook


def _float_hook(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))
    conv.register_structure_hook(float, _float_hook)
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _strict(dict, "an object"))
    # A JSON string is iterable; never let it pass for a list.
    list_hook = conv.get_structure_hook(list[str])
    pairs_hook = conv.get_structure_hook(list[list[str]])

    def strict_list(inner):
        def hook(value: Any, type_: Any) -> Any:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            if type_ == list[list[str]]:
                for item in value:
                    if not isinstance(item, list):
                        raise TypeError(f"expected a list of lists, got an item of type {type(item).__name__}")
            return inner(value, type_)

        return hook

    conv.register_structure_hook_func(lambda t: t == list[str], strict_list(list_hook))
    conv.register_structure_hook_func(lambda t: t == list[list[str]], strict_list(pairs_hook))
    return conv


converter = _make_converter()


MAX_ERROR_TEXT = 300
"""An error text never echoes a peer's value at length (it is sent back and logged)."""


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if getattr(type_, "__origin__", None) is Literal:
        return "must be one of " + ", ".join(map(str, type_.__args__))
    if isinstance(exc, ValueError | TypeError) and str(exc):
        return str(exc)
    return format_exception(exc, type_)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClassValidationError):
        text = "; ".join(cattrs.transform_error(exc, format_exception=_format_exception))
    elif isinstance(exc, ForbiddenExtraKeysError):
        text = f"unexpected fields {sorted(exc.extra_fields)}"
    else:
        text = str(exc)
    return ascii(text)[1:-1][:MAX_ERROR_TEXT]


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(BAD_MESSAGE, "audio_chunk.data is not valid base64") from None


def _parse(text: str | bytes, table: dict[str, type], side: str) -> Any:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(BAD_MESSAGE, f"text frame is not valid JSON ({str(exc).split(':', 1)[0][:60]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_MESSAGE, "a message must be a JSON object")
    if _depth(obj) > MAX_DEPTH:
        raise ProtocolError(BAD_MESSAGE, f"a message may nest at most {MAX_DEPTH} levels")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_MESSAGE, "a message needs a string field 'type'")
    cls = table.get(kind)
    if cls is None:
        raise ProtocolError(BAD_MESSAGE, f"unknown message type {ascii(kind[:40])} for {side}; expected one of {sorted(table)}")
    body = {k: v for k, v in obj.items() if k != "type"}
    try:
        msg = converter.structure(body, cls)
    except Exception as exc:  # cattrs raises several exception types; all mean bad input
        raise ProtocolError(BAD_MESSAGE, f"bad {kind}: {_describe(exc)}") from None
    return msg


def decode(message: str | bytes, *, limit: int, parse: Callable[[str], Any]) -> Any:
    """The one decode path of every inbound frame: its size first (``FRAME_TOO_LARGE``,
    fatal, close 1009), then a binary frame is returned as it is (audio) and a text frame
    goes through ``parse`` (:func:`parse_client` or :func:`parse_node`)."""
    if len(message) > limit:
        raise ProtocolError(FRAME_TOO_LARGE, f"frame of {len(message)} bytes exceeds max_frame_bytes={limit}",
                            fatal=True, close_code=CLOSE_TOO_BIG)
    if isinstance(message, bytes):
        return message
    return parse(message)


def parse_client(text: str | bytes) -> Any:
    """Parse one client text frame; raises :class:`ProtocolError` ``BAD_MESSAGE``."""
    return _parse(text, CLIENT_MESSAGES, "/v1/session")


def parse_node(text: str | bytes) -> Any:
    """Parse one node text frame; raises :class:`ProtocolError` ``BAD_MESSAGE``."""
    return _parse(text, NODE_MESSAGES, "/v1/node")


def parse_from_daemon(text: str | bytes, side: Literal["client", "node"]) -> Any:
    """Parse a message the daemon sent (used by the reference node and client)."""
    table = DAEMON_TO_CLIENT if side == "client" else DAEMON_TO_NODE
    return _parse(text, table, f"daemon->{side}")


@attrs.frozen
class Encoded:
    """A message that is already a text frame (a job_assign relayed from another instance):
    :func:`encode` passes it through instead of decoding and encoding ~100 KB again."""

    TYPE: str
    text: str
    job_id: str = ""  # of a job_assign / job_cancel (the node connection keeps its assigned jobs)


def encode(msg: Any) -> str:
    """One message as a compact JSON text frame with its ``type`` first."""
    if isinstance(msg, Encoded):
        return msg.text
    body = converter.unstructure(msg)
    if isinstance(msg, Error) and msg.retry_after_ms is None:
        del body["retry_after_ms"]
    if isinstance(msg, Heartbeat) and msg.load_score is None:
        del body["load_score"]
    if isinstance(msg, JobAssign):
        # the base64 audio is JSON-safe ASCII: splice it in instead of having json scan and
        # copy ~100 KB per job (a visible share of the daemon's CPU in bench/load.py)
        audio = body.pop("audio")
        head = orjson.dumps({"type": msg.TYPE, **body}).decode()
        return f'{head[:-1]},"audio":"{audio}"}}'
    return orjson.dumps({"type": msg.TYPE, **body}).decode()  # (compact, UTF-8 as is: what json.dumps gave, ~10x faster)

