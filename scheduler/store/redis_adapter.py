"""Redis adapter: synchronous redis-py, batched into pipelines, run in worker threads.

Why batched: one redis-py caller does ~11 k EVALSHA/s, a 64-call pipeline ~65 k/s, while one
``trio.to_thread.run_sync`` per call tops out near 4 k/s. So callers never touch redis-py:
:meth:`RedisAdapter.script` and :meth:`RedisAdapter.command` put a call on a bounded queue
and wait; ``pool_size`` batcher tasks each take whatever is queued (up to ``batch_max``
calls), send it as one non-transactional pipeline in a worker thread (at most
``pool_size`` threads, bounded by a ``CapacityLimiter``), and hand every caller its own
reply or exception. Calls are independent: one failing script does not fail its batch
neighbours.

Scripts are read from ``luascripts/`` once, registered with ``register_script`` and always
called by SHA; after a Redis restart (``NOSCRIPT``) they are loaded again and the affected
calls retried once.

Failure modes: a domain error reply of a script (``NO_AVAILABLE_NODE ...``) raises the
matching :class:`ScriptError` subclass; a connection problem raises
:class:`RedisUnavailable`. Cancelling a caller abandons its reply, not the command: a
call already sent still runs on the server.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import redis
import trio
from redis.commands.core import Script
from redis.commands.policies import BasePolicyResolver, CommandPolicies, RequestPolicy, ResponsePolicy, StaticPolicyResolver

from scheduler.ops import redis_client, redis_url
from scheduler.ops.logs import event
from scheduler.ops.redis_policy import memory_policies
from scheduler.ops.secrets import redacted
from scheduler.store.keys import KeySpace
from scheduler.store.outage import OutageClock

log = logging.getLogger("scheduler.redis")


# ---------------------------------------------------------------- typed errors


class RedisUnavailable(Exception):
    """Redis cannot do the call now: it could not be reached, the connection broke or timed
    out mid-call (the call may or may not have taken effect: an *ambiguous* outcome), fewer
    replicas than ``--redis-wait-replicas`` acknowledged a write in time (it took effect on
    the primary but may not survive a failover: ambiguous too), or it
    answered with a transient error reply (full, read-only replica, loading, busy script,
    cluster down). ``reply`` names which, from :data:`REPLIES` (a metric label)."""

    def __init__(self, message: str, reply: str = "connection"):
        super().__init__(message)
        self.reply = reply

    @property
    def ambiguous(self) -> bool:
        """The call may have run on the server (a timeout or a connection lost mid-call);
        an error reply or a refused connection means it did not."""
        return self.reply in ("timeout", "connection", "replicas")


class BadRequest(Exception):
    """A call whose arguments cannot be sent to Redis; refused alone, its batch runs on."""


class ScriptError(Exception):
    """A script refused the call with a domain error code (first word of the reply)."""

    code = "SCRIPT_ERROR"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _error(code: str) -> type[ScriptError]:
    return type("".join(part.title() for part in code.split("_")), (ScriptError,), {"code": code})


NoPoolForLangPair = _error("NO_POOL_FOR_LANG_PAIR")
EmptyPool = _error("EMPTY_POOL")
NoAvailableNode = _error("NO_AVAILABLE_NODE")
NodeMismatch = _error("NODE_MISMATCH")
StaleAttempt = _error("STALE_ATTEMPT")
UnknownJob = _error("UNKNOWN_JOB")
AlreadyCompleted = _error("ALREADY_COMPLETED")
StaleCandidates = _error("STALE_CANDIDATES")
JobIdTaken = _error("JOB_ID_TAKEN")
JobkeyMismatch = _error("JOBKEY_MISMATCH")
Fenced = _error("FENCED")

SCRIPT_ERRORS: dict[str, type[ScriptError]] = {
    cls.code: cls
    for cls in (NoPoolForLangPair, EmptyPool, NoAvailableNode, NodeMismatch, StaleAttempt, UnknownJob, AlreadyCompleted,
                StaleCandidates, JobIdTaken, JobkeyMismatch, Fenced)
}


TRANSIENT_REPLIES = ("OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MISCONF", "NOREPLICAS",
                     "NOSCRIPT")
"""Error replies that say "not now" (full, a replica, loading, a busy script, a cluster or a
primary down, a failed save, too few replicas, scripts lost): the call did not run and can
be repeated later. They take the Redis-unavailable path, never a connection's INTERNAL."""
REPLIES = (*TRANSIENT_REPLIES, "timeout", "connection", "replicas")

# redis-py turns some replies into classes and drops their first word from the message
_REPLY_CLASSES: tuple[tuple[type[BaseException], str], ...] = (
    (redis.exceptions.OutOfMemoryError, "OOM"), (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.BusyLoadingError, "LOADING"), (redis.exceptions.MasterDownError, "MASTERDOWN"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"), (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    (redis.exceptions.NoScriptError, "NOSCRIPT"), (redis.exceptions.TimeoutError, "timeout"),
)


def classify(exc: BaseException) -> str | None:
    """Which of :data:`REPLIES` ``exc`` is, or None for anything else (a script's domain
    error, a bug)."""
    for cls, reply in _REPLY_CLASSES:
        if isinstance(exc, cls):
            return reply
    if isinstance(exc, redis.exceptions.ResponseError):
        first = str(exc).split(" ", 1)[0].lstrip("-")
        return first if first in TRANSIENT_REPLIES else None
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.ClusterError | OSError):
        return "timeout" if isinstance(exc, TimeoutError | socket.timeout) else "connection"
    return None


def _map_error(exc: BaseException) -> BaseException:
    if isinstance(exc, RedisUnavailable | ScriptError | BadRequest):
        return exc
    reply = classify(exc)
    if reply is not None:
        return RedisUnavailable(str(exc) or type(exc).__name__, reply)
    if isinstance(exc, redis.exceptions.ResponseError):
        text = str(exc)
        cls = SCRIPT_ERRORS.get(text.split(" ", 1)[0])
        if cls is not None:
            return cls(text)
    return exc


# ---------------------------------------------------------------- scripts on disk


def scripts_dir() -> Path:
    """Where the Lua scripts are: inside the installed wheel, or ``luascripts/`` of a checkout."""
    packaged = Path(str(resources.files("scheduler"))) / "luascripts"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "luascripts"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("luascripts/ not found next to the scheduler package")


_INCLUDE = re.compile(r"^-- @include (\w+)$", re.MULTILINE)


def load_script_sources() -> dict[str, str]:
    """Every ``luascripts/*.lua`` by name, with ``-- @include NAME`` lines replaced by
    ``luascripts/lib/NAME.lua`` (shared Lua functions, such as node choice)."""
    root = scripts_dir()
    libs = {p.stem: p.read_text() for p in (root / "lib").glob("*.lua")}
    return {p.stem: _INCLUDE.sub(lambda m: libs[m.group(1)], p.read_text()) for p in sorted(root.glob("*.lua"))}


# ---------------------------------------------------------------- the adapter

_KEYLESS = {"PING", "INFO", "DBSIZE", "TIME"}
DURABLE_SCRIPTS = frozenset({"dispatch_task", "redispatch_task", "complete_task", "cancel_task", "session_journal",
                             "session_resume", "owner_claim", "session_claim", "shard_dispatch", "shard_redispatch", "job_burn",
                             "job_move_out", "claim_move", "job_move_in"})
"""Writes that must survive a failover (a job, its answer, its end, a session's journal and
owner): with ``--redis-wait-replicas`` a batch holding one ends with ``WAIT``, and so does
one holding an ``XADD`` (a job handed to another instance). Everything else is refreshed or
written again on its own (heartbeats, liveness, node state) and does not wait."""


def _durable(call: _Call) -> bool:
    return call.script in DURABLE_SCRIPTS or (call.script is None and str(call.args[0]).upper() == "XADD")


@attrs.define(eq=False)
class _Call:
    script: str | None  # script name, or None for a plain command
    args: tuple[Any, ...]
    nkeys: int = 0
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@attrs.define(eq=False)
class _Group:
    """Calls queued as one item: a batcher sends them together, in this order, in one pipeline."""

    calls: list[_Call]


def _calls(item: _Call | _Group) -> list[_Call]:
    return item.calls if isinstance(item, _Group) else [item]


class RedisAdapter:
    """Async context manager owning the batcher tasks; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        batch_max: int = 64,
        queue_size: int = 4096,
        socket_timeout: float = 5.0,
        on_error: Callable[[str], None] | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        space: KeySpace | None = None,
    ) -> None:
        self.url = url
        self.space = space or KeySpace()  # the key layout this Redis holds: which tag each key takes (keys.py)
        self.wait_replicas = wait_replicas  # >0: WAIT for this many replicas after each batch with a durable write
        self.wait_timeout_ms = wait_timeout_ms
        self.pool_size = pool_size
        self.batch_max = batch_max
        self._socket_timeout = socket_timeout
        self._sources = load_script_sources()
        self._client: Any = None  # redis.Redis or redis.RedisCluster, made on entry
        self._scripts: dict[str, Script] = {}
        self.cluster = False
        self._limiter = trio.CapacityLimiter(pool_size)
        # Close semantics: __aexit__ closes the send side; batchers drain what is queued,
        # then exit. Capacity bounds the calls waiting for a batch.
        self._send, self._receive = trio.open_memory_channel[_Call | _Group](queue_size)
        self.calls_total = 0
        self.batches_total = 0
        self.on_error = on_error  # called with the REPLIES label of each Redis-unavailable error (a metric)
        self.errors: collections.Counter[str] = collections.Counter()  # the same, counted here (the health check reads it)
        self.outage = OutageClock()  # how long Redis has been unavailable: deadlines that wait on it count it out

    def _connect_sync(self) -> None:
        """Make the client: a RedisCluster when the server says ``cluster_enabled:1``, else a
        plain Redis. A server that cannot be reached now is taken as a single server (calls
        raise RedisUnavailable until it is back)."""
        client = connect(self.url, decode_responses=True, socket_timeout=self._socket_timeout,
                         socket_connect_timeout=min(self._socket_timeout, 2.0), max_connections=self.pool_size + 4)
        self.cluster = isinstance(client, redis.RedisCluster)
        self._client = client
        self._scripts = {name: client.register_script(src) for name, src in self._sources.items()}
        event(log, "redis_connected", url=redacted(self.url), cluster=self.cluster)

    def shard_primaries(self) -> list[str]:
        """The primary (``host:port``) each scheduling shard's tag lives on, from the cluster
        client's slot map (no round trip); one server: its redacted URL for each."""
        tags = self.space.shard_tags
        if not self.cluster:
            return [redacted(self.url)] * len(tags)
        return [self._client.get_node_from_key(f"{tag}:probe").name for tag in tags]

    @property
    def script_names(self) -> list[str]:
        return sorted(self._sources)

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[RedisAdapter]:
        await trio.to_thread.run_sync(self._connect_sync, limiter=self._limiter)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.pool_size):
                    nursery.start_soon(self._batcher)
                try:
                    yield self
                finally:
                    self._send.close()  # batchers finish what is queued, then return
        finally:
            if self._client is not None:
                self._client.close()

    async def __aenter__(self) -> RedisAdapter:
        self._cm = self._running()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._cm.__aexit__(*exc_info)

    # ------------------------------------------------------------ public calls

    async def script(self, name: str, keys: list[str] | tuple[str, ...], args: list[Any] | tuple[Any, ...]) -> Any:
        """Run script ``name`` by SHA with ``keys`` and ``args``; raises ScriptError/RedisUnavailable."""
        if name not in self._sources:
            raise KeyError(f"no Lua script named {name!r}; have {self.script_names}")
        return await self._submit(_Call(script=name, args=(*keys, *args), nkeys=len(keys)))

    async def script_many(self, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run several scripts, in this order, in one pipeline (Redis runs them one after the
        other, nothing of this instance in between). Returns, per call, its reply or the
        exception it would have raised (ScriptError, RedisUnavailable): not raised."""
        for name, _, _ in calls:
            if name not in self._sources:
                raise KeyError(f"no Lua script named {name!r}; have {self.script_names}")
        return await self._run_group([_Call(script=name, args=(*keys, *args), nkeys=len(keys)) for name, keys, args in calls])

    async def commands_many(self, commands: list[tuple[Any, ...]], *, raise_errors: bool = False) -> list[Any]:
        """Plain commands, in this order, in one pipeline; each reply or its exception (not
        raised), or with ``raise_errors`` the replies, raising the first error among them."""
        replies = await self._run_group([_Call(script=None, args=tuple(args)) for args in commands])
        if raise_errors:
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
        return replies

    async def _run_group(self, calls: list[_Call]) -> list[Any]:
        group = _Group(calls)
        if not group.calls:
            return []
        try:
            await self._send.send(group)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return [RedisUnavailable("redis adapter is closed")] * len(group.calls)
        for call in group.calls:
            await call.done.wait()
        return [call.error if call.error is not None else call.result for call in group.calls]

    async def command(self, *args: Any) -> Any:
        """Run one plain Redis command (``"HGETALL", key``) through the batcher."""
        return await self._submit(_Call(script=None, args=args))

    async def ping(self) -> float:
        """Round trip through the batcher, in seconds; raises RedisUnavailable."""
        start = time.perf_counter()
        await self.command("PING")
        return time.perf_counter() - start

    async def memory_policies(self) -> dict[str, str]:
        """``maxmemory-policy`` of the server (of each primary of a cluster), from ``INFO memory``
        (``CONFIG GET`` is often renamed away on managed Redis); {} when the server refuses
        ``INFO`` (an ACL), after a warning. Raises :class:`RedisUnavailable`."""
        try:
            return memory_policies(await self.command("INFO", "memory"))
        except redis.exceptions.ResponseError as exc:
            event(log, "redis_policy_unknown", logging.WARNING, error=str(exc)[:200],
                  detail="INFO memory refused: cannot check that maxmemory-policy is noeviction")
            return {}

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script now (also done lazily on NOSCRIPT); raises
        :class:`RedisUnavailable` when Redis cannot be reached."""
        try:
            await trio.to_thread.run_sync(self._load_scripts_sync, limiter=self._limiter)
        except Exception as exc:
            mapped = _map_error(exc)
            if mapped is exc:
                raise
            raise mapped from None

    # ------------------------------------------------------------ internals

    async def _submit(self, call: _Call) -> Any:
        try:
            await self._send.send(call)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise RedisUnavailable("redis adapter is closed") from None
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    async def _batcher(self) -> None:
        """Shielded: a batcher outlives cancellation of the daemon, so that shielded cleanup
        (cancelling jobs, marking a node offline) still gets its replies. It returns when the
        adapter closes the queue on exit, after everything using the adapter has finished."""
        with trio.CancelScope(shield=True):
            async for first in self._receive:
                batch = _calls(first)
                while len(batch) < self.batch_max:
                    try:
                        batch = batch + _calls(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                token = object()
                self.outage.started(token, trio.current_time())
                try:
                    await trio.to_thread.run_sync(self._execute_sync, batch, limiter=self._limiter)
                except Exception as exc:  # the whole batch failed: tell every caller
                    error = self._mapped(exc)
                    for call in batch:
                        call.error = error
                finally:
                    done = not any(isinstance(call.error, RedisUnavailable) for call in batch)
                    self.outage.finished(token, trio.current_time(), done)
                    for call in batch:
                        call.done.set()
                self.batches_total += 1
                self.calls_total += len(batch)

    def _load_scripts_sync(self) -> None:
        for script in self._scripts.values():
            self._client.script_load(script.script)

    def _run_pipeline(self, calls: list[_Call]) -> list[Any]:
        if self.cluster:
            return self._run_cluster_pipeline(calls)
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            if call.script is None:
                pipe.execute_command(*call.args)
            else:
                pipe.evalsha(self._scripts[call.script].sha, call.nkeys, *call.args)
        waits = self.wait_replicas > 0 and any(map(_durable, calls))
        if waits:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        results = pipe.execute(raise_on_error=False)
        return self._replicated(calls, results[:-1], results[-1]) if waits else results

    def _replicated(self, calls: list[_Call], results: list[Any], acked: Any) -> list[Any]:
        """The batch's results once ``WAIT`` said how many replicas hold its writes: with fewer
        than ``wait_replicas``, each durable write's outcome is ambiguous (done on the primary, maybe
        lost by a failover), so its caller retries it as after a timeout."""
        if isinstance(acked, int) and acked >= self.wait_replicas:
            return results
        short = RedisUnavailable(f"{acked if isinstance(acked, int) else 0} of {self.wait_replicas} replicas acknowledged "
                                 f"the writes within {self.wait_timeout_ms} ms", reply="replicas")
        return [short if _durable(call) else result for call, result in zip(calls, results, strict=True)]

    def _run_cluster_pipeline(self, calls: list[_Call]) -> list[Any]:
        """A ClusterPipeline groups the calls by the node owning their slot (and follows
        MOVED/ASK). Commands without a key (PING) cannot be routed in it: they run alone."""
        pipe = self._client.pipeline()
        pipe._policy_resolver = _SCRIPTS_KEYED  # (RedisCluster.pipeline() does not pass its own on: see below)
        keyed: list[int] = []
        results: list[Any] = [None] * len(calls)
        for i, call in enumerate(calls):
            if call.script is not None:
                pipe.execute_command("EVALSHA", self._scripts[call.script].sha, call.nkeys, *call.args)
                keyed.append(i)
            elif call.args[0].upper() in _KEYLESS:
                try:
                    results[i] = self._client.execute_command(*call.args)
                except redis.exceptions.RedisError as exc:
                    results[i] = exc
            else:
                pipe.execute_command(*call.args)
                keyed.append(i)
        if keyed:
            for i, result in zip(keyed, pipe.execute(raise_on_error=False), strict=True):
                results[i] = result
        return results

    def _execute_sync(self, batch: list[_Call]) -> None:
        """Worker thread: one pipeline; NOSCRIPT -> load scripts and retry those calls once.
        A call that cannot be encoded is refused alone (:class:`BadRequest`), before the pipeline."""
        sendable = []
        for call in batch:
            problem = unencodable(call.args)
            if problem is None:
                sendable.append(call)
            else:
                call.error = BadRequest(problem)
        batch = sendable
        if not batch:
            return
        results = self._run_pipeline(batch)
        retry = [c for c, r in zip(batch, results, strict=True) if isinstance(r, redis.exceptions.NoScriptError)]
        if retry:
            event(log, "scripts_reloaded", reason="NOSCRIPT", calls=len(retry))
            self._load_scripts_sync()
            redo = dict(zip(map(id, retry), self._run_pipeline(retry), strict=True))
            results = [redo.get(id(c), r) for c, r in zip(batch, results, strict=True)]
        for call, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                call.error = self._mapped(result)
            else:
                call.result = result

    def _mapped(self, exc: BaseException) -> BaseException:
        """``exc`` as the adapter raises it; a Redis-unavailable one is counted (``on_error``)."""
        error = _map_error(exc)
        if isinstance(error, RedisUnavailable):
            self.errors[error.reply] += 1
            if self.on_error is not None:
                self.on_error(error.reply)
        return error


def unencodable(args: tuple[Any, ...]) -> str | None:
    """Why redis-py could not encode ``args`` (None when it can). An ASCII string is known
    to be fine without a look at its characters (``str.isascii`` is a flag): the ~100 KB
    base64 audio of a job costs nothing here."""
    for arg in args:
        if isinstance(arg, str):
            if not arg.isascii():
                try:
                    arg.encode("utf-8")
                except UnicodeEncodeError:
                    return "a string argument is not valid UTF-8 (a lone surrogate)"
        elif type(arg) is bool or not isinstance(arg, bytes | bytearray | memoryview | int | float):
            return f"an argument of type {type(arg).__name__} cannot be sent to Redis"
    return None


def connect(url: str, **options: Any) -> redis.Redis | redis.RedisCluster:
    """A synchronous redis-py client for ``url``: the primary a Sentinel URL names
    (:mod:`scheduler.ops.redis_url`), a RedisCluster when the server says
    ``cluster_enabled:1``, else a plain Redis. A server that cannot be reached now is taken
    as a single server (its calls fail until it is back), and so is one that refuses ``INFO``
    (an ACL on managed Redis; a cluster that refuses it is not detected)."""
    client = redis_client.client(url, **options)
    if redis_url.is_sentinel(url):
        return client  # Sentinel watches a primary and its replicas, never a cluster
    try:
        cluster = str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError, OSError):
        cluster = False
    if not cluster:
        return client
    client.close()
    return redis.RedisCluster.from_url(url, policy_resolver=_SCRIPTS_KEYED, **options)


# redis-py 8's cluster pipeline asks a server ``COMMAND GETKEYS`` for every command whose
# routing policy it does not know and whose keys move (EVALSHA among them), one round trip to
# one node before each call: measured, 500 a second on one primary at 200 sessions, a quarter
# of its commands. EVAL and EVALSHA name their keys (numkeys), so they are routed by key
# (tests/test_redis_adapter.py counts the GETKEYS a cluster pipeline of scripts costs: none).
class _ScriptsKeyed(BasePolicyResolver):
    def with_fallback(self, fallback: Any) -> Any:
        return self


_SCRIPTS_KEYED = StaticPolicyResolver(fallback=_ScriptsKeyed({"core": {
    name: CommandPolicies(request_policy=RequestPolicy.DEFAULT_KEYED, response_policy=ResponsePolicy.DEFAULT_KEYED)
    for name in ("eval", "evalsha")}}))


def now_ms() -> int:
    """Wall-clock epoch milliseconds, the time base of every timestamp stored in Redis."""
    return int(time.time() * 1000)
