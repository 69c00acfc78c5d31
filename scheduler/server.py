"""``serve()``: the daemon. Reading this function tells you every task the daemon runs.

Start-up: Redis (the configured URL, or an embedded valkey-server child) -> batching Redis
adapter with the Lua scripts loaded -> dispatcher lanes -> WebSocket listener
(``/v1/session``, ``/v1/node``, anything else 404) -> admin HTTP listener -> Redis health
check -> systemd watchdog -> signal watcher; then ``READY=1`` to systemd (``systemd.py``).

Shutdown (first SIGTERM/SIGINT, or :meth:`Running.shutdown`): ``STOPPING=1`` to systemd,
``/readyz`` turns 503, newcomers get ``SHUTTING_DOWN``, every session finalizes what it
buffered (reason ``close``) and delivers its results, bounded by ``drain_timeout_ms``;
then everything is cancelled and the embedded Valkey stopped. A second signal skips the
drain.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio

from scheduler.cluster.location import locate
from scheduler.cluster.overview import overview
from scheduler.cluster.ownership import Ownership
from scheduler.cluster.routing import Router
from scheduler.edge import handshake, wsutil
from scheduler.edge.client_gateway import ClientGateway
from scheduler.edge.listen import open_listeners
from scheduler.edge.node_gateway import NodeGateway
from scheduler.edge.ws_listener import Connection, Limits, WebSocketListener
from scheduler.edge.wsconn import ServerRequest
from scheduler.ops import tls
from scheduler.ops.admin import AdminServer, bad_session_id, no_such_path
from scheduler.ops.boundary import Boundary
from scheduler.ops.config import Settings
from scheduler.ops.embedded_redis import EmbeddedValkey
from scheduler.ops.gcwatch import GcWatch
from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.ops.redis_policy import MemoryState, UnsafeRedis, check_policy, describe, embedded_args, evicting, memory_state
from scheduler.ops.secrets import redacted
from scheduler.ops.systemd import Notifier
from scheduler.placement.dispatcher import Dispatcher
from scheduler.placement.nodes import NodeRegistry
from scheduler.protocol import CLOSE_GOING_AWAY, CLOSE_INTERNAL, ID_PATTERN, INTERNAL, SHUTTING_DOWN, ProtocolError
from scheduler.session.admission import AdmissionControl, watch_loop_lag
from scheduler.session.lag import watch_session_lag
from scheduler.session.registry import SessionRegistry
from scheduler.store import layout
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import RedisAdapter, RedisUnavailable
from scheduler.store.scheduling import SchedulingClient

log = logging.getLogger("scheduler.server")

HANDSHAKE_TIMEOUT_S = 10.0
"""A connection that has not completed its (TLS and) WebSocket handshake by then is dropped."""

HEALTH_INTERVAL = 1.0
FULL = "full: used_memory at maxmemory, writes refused (OOM)"
REPLICAS_SHORT = "replicas short: fewer than redis_wait_replicas acknowledged the writes in time"
REFUSALS = ("OOM", "READONLY", "MISCONF", "replicas")
"""Error replies that make Redis unfit for new work until a health check passes without one."""
REDIS_START_WAIT_S = 30.0  # at start-up, how long to wait for an unreachable Redis before giving up


@attrs.define(eq=False)
class Running:
    """What :func:`serve` hands to ``nursery.start``: bound ports and handles for tests and tools."""

    settings: Settings
    ws_port: int
    admin_port: int
    redis_url: str
    metrics: Metrics
    sessions: SessionRegistry
    nodes: NodeRegistry
    redis: RedisAdapter
    scheduling: SchedulingClient
    dispatcher: Dispatcher
    ownership: Ownership | None = None
    admission: AdmissionControl | None = None
    draining: bool = False
    redis_ok: bool = True
    redis_problem: str | None = None  # why Redis is not ready (the health check), None while it is
    drain_within_s: float | None = None  # a drain shorter than drain_timeout_ms (the supervisor is gone)
    _stop: trio.Event = attrs.field(factory=trio.Event)
    _now: trio.Event = attrs.field(factory=trio.Event)

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.settings.tls_cert else "ws"
        return f"{scheme}://{self.settings.ws_host}:{self.ws_port}"

    def shutdown(self, *, immediate: bool = False, within_s: float | None = None) -> None:
        """Begin the graceful drain (or, with ``immediate``, skip it); ``within_s``: drain for at
        most that long, however long ``drain_timeout_ms`` is."""
        if within_s is not None:
            self.drain_within_s = within_s
        self._stop.set()
        if immediate:
            self._now.set()

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.redis_ok:
            return False, f"redis {(self.redis_problem or 'unreachable').split(':')[0]}"
        refusing = self.admission.refusing() if self.admission is not None else None
        if refusing:
            return False, refusing
        return True, "ready"


async def serve(
    settings: Settings,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    _warn_if_open(settings)
    embedded: EmbeddedValkey | None = None
    if settings.redis_url:
        url = settings.redis_url
    else:
        embedded = EmbeddedValkey(settings.data_dir, extra_args=embedded_args(settings.embedded_maxmemory_mb))
        url = embedded.start()
    try:
        async with RedisAdapter(url, pool_size=settings.redis_pool_size, wait_replicas=settings.redis_wait_replicas,
                                wait_timeout_ms=settings.redis_wait_timeout_ms, space=KeySpace(settings.redis_shards)) as redis:
            if redis.cluster and settings.redis_wait_replicas:
                raise UnsafeRedis("--redis-wait-replicas needs one primary (with Sentinel or plain replicas): on a Redis "
                                  "Cluster WAIT would cover one shard's writes only. Unset it, or use a Sentinel URL")
            await _wait_for_redis(redis, url)
            check_policy(await redis.memory_policies(), url, settings.allow_evicting_redis)
            await layout.check(redis, url)
            event(log, "key_layout", **layout.describe(redis))
            await _serve(settings, redis, url, embedded, handle_signals, task_status)
    finally:
        if embedded is not None:
            embedded.stop()


FD_HEADROOM = 256
"""File descriptors kept for everything but WebSocket connections (Redis, Valkey, admin, logs)."""


def connection_limit(configured: int) -> int:
    """``max_connections``, or when 0 what the open-file limit allows less :data:`FD_HEADROOM`
    (the soft limit is first raised to the hard one, as far as the system lets it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return configured or max(16, soft - FD_HEADROOM)


def _warn_if_open(settings: Settings) -> None:
    """Protected mode let an open listener start only because the operator said so: say it again."""
    if not settings.node_tokens and settings.insecure_open_nodes:
        event(log, "insecure_open_nodes", logging.WARNING, ws_host=settings.ws_host,
              detail="no node_token: anyone who can reach the port may register as a node and receive users' audio")
    if not settings.admin_tokens and settings.insecure_open_admin:
        event(log, "insecure_open_admin", logging.WARNING, admin_host=settings.admin_host,
              detail="no admin_token: anyone who can reach the admin port may read every session and node")


async def _wait_for_redis(redis: RedisAdapter, url: str) -> None:
    """Load the scripts, retrying while Redis cannot be reached (it may be restarting) for up
    to ``REDIS_START_WAIT_S``; then give up with a clear message (exit status 1)."""
    deadline = trio.current_time() + REDIS_START_WAIT_S
    while True:
        try:
            await redis.load_scripts()
            return
        except RedisUnavailable as exc:
            if trio.current_time() >= deadline:
                raise SystemExit(f"cannot reach Redis at {redacted(url)} (tried for {REDIS_START_WAIT_S:.0f} s): {exc}") from None
            event(log, "redis_waiting", logging.WARNING, redis=redacted(url), error=str(exc))
            await trio.sleep(0.5)


@attrs.define(eq=False)
class _Parts:
    """What :func:`_build` wires together before any task starts."""

    metrics: Metrics
    sessions: SessionRegistry
    nodes: NodeRegistry
    scheduling: SchedulingClient
    dispatcher: Dispatcher
    ownership: Ownership
    router: Router
    clients: ClientGateway
    node_gw: NodeGateway
    admission: AdmissionControl


def _build(settings: Settings, redis: RedisAdapter, url: str) -> _Parts:
    """Every part, each given what it needs when it is made (nothing is set afterwards)."""
    metrics = Metrics()
    redis.on_error = lambda reply: metrics.redis_errors_total.labels(reply).inc()
    sessions = SessionRegistry(metrics)
    redis.outage.on_end.append(lambda seconds: _outage_ended(seconds, sessions, metrics))
    nodes = NodeRegistry(metrics)
    scheduling = SchedulingClient(redis)
    scheduling.on_placement_event(lambda what: metrics.placement_shard_events_total.labels(what).inc())
    ownership = Ownership(redis, settings.instance_id, settings.owner_ttl_ms,  # (its counts: GET /cluster)
                          stats=lambda: {"sessions": len(sessions), "nodes": len(nodes),
                                         "jobs_in_flight": len(dispatcher.placed), "jobs_waiting": dispatcher.waiting},
                          held=lambda: ([a.session_id for a in sessions.actors()],
                                        [(c.node_id, c.draining, c.conn_id) for c in nodes.all()]),
                          on_lapse=metrics.liveness_lapses_total.inc)
    # The router hands the dispatcher's jobs to nodes, and tells the dispatcher when an answer
    # for one of its jobs arrived over the relay: the dispatcher is made just below, so that
    # one call is looked up when it happens.
    router = Router(instance_id=settings.instance_id, url=url, redis=redis, metrics=metrics, nodes=nodes,
                    sessions=sessions, ownership=ownership, answered=lambda job_key: dispatcher.answered(job_key),
                    waiting_sessions=lambda: _long_waiting(sessions, settings))
    dispatcher = Dispatcher(redis=redis, nodes=nodes, sessions=sessions, router=router, metrics=metrics,
                            node_ttl_ms=settings.node_ttl_ms, orphan_grace_ms=settings.owner_ttl_ms,
                            instance_id=settings.instance_id, job_lease_ms=settings.job_lease_ms, scheduling=scheduling,
                            locality_slack=settings.locality_slack, outage_hold=settings.result_deadline_ms / 1000)
    deps = dict(settings=settings, redis=redis, scheduling=scheduling, dispatcher=dispatcher, router=router,
                sessions=sessions, metrics=metrics, ownership=ownership)
    admission = AdmissionControl(settings.max_sessions, metrics, lag_limit_s=settings.overload_lag_ms / 1000)
    metrics.watch_pairs(jobs=dispatcher.by_pair, slots=nodes.slots_by_pair)
    return _Parts(metrics, sessions, nodes, scheduling, dispatcher, ownership, router,
                  ClientGateway(admission=admission, **deps), NodeGateway(nodes=nodes, **deps), admission)


OUTAGE_WARN_S = 1.0


def _outage_ended(seconds: float, sessions: SessionRegistry, metrics: Metrics) -> None:
    """Redis is back after an outage the calls saw: the sessions' result deadlines and the
    dispatcher's leases count it out; every session looks at its deadlines again now. Logged
    at warning from one second on (a full Redis refusing writes between reads that go through
    makes many short ones: those are at debug, and all are in the metric)."""
    metrics.redis_outage_seconds_total.inc(seconds)
    level = logging.WARNING if seconds >= OUTAGE_WARN_S else logging.DEBUG
    event(log, "redis_outage_counted_out", level, seconds=round(seconds, 3), sessions=len(sessions))
    for actor in sessions.actors():
        actor.wake_nowait()


def _router(parts: _Parts, settings: Settings,
            running: Callable[[], Running | None]) -> Callable[[ServerRequest, Connection], Awaitable[None]]:
    """The WebSocket handler: the handshake policy first (edge/handshake.py: path, browser
    Origin, subprotocols; a refusal is an HTTP status and a log line), then ``/v1/session``
    to the client gateway and ``/v1/node`` to the node gateway; ``SHUTTING_DOWN`` while not
    running or draining. One connection's bug is logged and answered ``INTERNAL``: it never
    takes the listener down (and a library's exception is contained one level up, by the
    listener's per-connection boundary: edge/ws_listener.py)."""
    policy = handshake.Policy.from_settings(settings.allowed_origins, settings.node_allowed_origins)

    async def route(request: ServerRequest, conn: Connection) -> None:
        decision = handshake.negotiate(request.path, request.headers, request.proposed_subprotocols, policy)
        if isinstance(decision, handshake.Refuse):
            parts.metrics.handshakes_refused_total.labels(decision.reason).inc()
            event(log, "handshake_refused", logging.WARNING, reason=decision.reason, status=decision.status,
                  path=request.path.split("?", 1)[0][:100], origin=(handshake.header(request.headers, b"origin") or "")[:100],
                  offered=handshake.shown(request.proposed_subprotocols), peer=conn.peer)
            await request.reject(decision.status, body=decision.body.encode())
            return
        path = decision.path
        conn.listener = "session" if path == handshake.SESSION_PATH else "node"
        ws = await conn.accept(request, decision.subprotocol)
        try:
            now = running()
            if now is None or now.draining:
                await wsutil.send_error(ws, ProtocolError(SHUTTING_DOWN, "the daemon is shutting down", fatal=True,
                                                          close_code=CLOSE_GOING_AWAY,
                                                          retry_after_ms=random.randint(*SHUTDOWN_RETRY_AFTER_MS)))
            elif path == handshake.SESSION_PATH:
                await parts.clients.handle(ws, decision.api_key)
            else:
                await parts.node_gw.handle(ws)
        except Exception as exc:
            event(log, "connection_crashed", logging.ERROR, exc_info=True, path=path)
            await wsutil.send_error(ws, ProtocolError(INTERNAL, f"internal error: {type(exc).__name__}",
                                                      fatal=True, close_code=CLOSE_INTERNAL))

    return route


async def _serve(
    settings: Settings,
    redis: RedisAdapter,
    url: str,
    embedded: EmbeddedValkey | None,
    handle_signals: bool,
    task_status: trio.TaskStatus[Running],
) -> None:
    parts = _build(settings, redis, url)
    running: Running | None = None
    async with parts.router, trio.open_nursery() as nursery:
        await nursery.start(parts.dispatcher.run)
        await nursery.start(parts.ownership.run)
        await nursery.start(parts.node_gw.heartbeats.run)
        await nursery.start(GcWatch(parts.metrics).run)
        context = tls.server_context(settings.tls_cert, settings.tls_key)
        boundary = Boundary(parts.metrics.connections_failed_total)
        ws_server = WebSocketListener(
            _router(parts, settings, lambda: running),
            tls.wrap(await open_listeners(settings.ws_host, settings.ws_port, reuse_port=settings.reuse_port), context),
            boundary=boundary,
            limits=Limits(connection_limit(settings.max_connections), settings.max_connections_per_ip,
                          parts.metrics.connections_refused_total),
            max_message_size=2 * settings.max_frame_bytes,
            handshake_timeout=HANDSHAKE_TIMEOUT_S,
            protocol_errors=parts.metrics.websocket_protocol_errors_total,
        )
        await nursery.start(ws_server.run)
        admin = AdminServer(parts.metrics, lambda: running.readiness() if running else (False, "starting"),
                            lambda: _status(running, parts.dispatcher), cors_origins=settings.admin_cors_origins,
                            ssl_context=context, boundary=boundary, tokens=settings.admin_tokens,
                            lookups={"/sessions/": partial(_session_location, redis, parts.ownership),
                                     "/cluster": partial(_cluster, redis, parts.ownership, parts.scheduling)})
        admin_port = await nursery.start(admin.serve, settings.admin_host, settings.admin_port)
        running = Running(settings=settings, ws_port=ws_server.port, admin_port=admin_port, redis_url=url,
                          metrics=parts.metrics, sessions=parts.sessions, nodes=parts.nodes, redis=redis,
                          scheduling=parts.scheduling,
                          dispatcher=parts.dispatcher, ownership=parts.ownership, admission=parts.admission)
        parts.ownership.ws_url = running.ws_url
        with contextlib.suppress(RedisUnavailable):  # its liveness record names the URL now (the location API)
            await parts.ownership.refresh()
        notifier = await _start_watchers(nursery, running, parts, handle_signals)
        event(log, "listening", ws=running.ws_url, sessions_path="/v1/session", nodes_path="/v1/node",
              admin=f"{'https' if context else 'http'}://{settings.admin_host}:{admin_port}",
              redis=("embedded " if embedded else "") + redacted(url), instance_id=settings.instance_id)
        task_status.started(running)
        notifier.notify("READY=1", f"STATUS=listening on {running.ws_url}")

        await running._stop.wait()
        running.draining = True
        notifier.notify("STOPPING=1", f"STATUS=draining {len(parts.sessions)} sessions")
        await _drain(running)
        nursery.cancel_scope.cancel()
    event(log, "stopped", instance_id=settings.instance_id)


async def _start_watchers(nursery: trio.Nursery, running: Running, parts: _Parts, handle_signals: bool) -> Notifier:
    """The running instance's periodic tasks: Redis health, the overload guard's loop lag,
    sessions' real-time lag, the systemd watchdog, signals, and (a --workers worker) its
    supervisor's life. Returns the systemd notifier."""
    nursery.start_soon(_health_check, running, nursery)
    nursery.start_soon(watch_loop_lag, parts.admission.lag)  # the overload guard's measure (session/admission.py)
    nursery.start_soon(watch_session_lag, parts.sessions, parts.metrics)  # session/lag.py
    notifier = Notifier()
    nursery.start_soon(notifier.watchdog)
    if handle_signals:  # (started: its handlers are in place before "listening" is logged)
        await nursery.start(_watch_signals, running)
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if supervisor.isdigit():  # a --workers worker: it must never outlive its supervisor
        nursery.start_soon(_watch_supervisor, running, int(supervisor))
    return notifier


def _long_waiting(sessions: SessionRegistry, settings: Settings, older_than_s: float = 2.0) -> dict[str, list[tuple[int, str]]]:
    """Sessions with an utterance finalized more than ``older_than_s`` ago and still missing
    answers, each with the (index, target language) it misses: the ones worth looking up in
    Redis for an answer whose Pub/Sub message was lost (looking up every waiting session each
    second cost p99 latency, bench/load.py). Also sessions resumed in the last
    ``older_than_s`` that are owed results: an answer sent while the session changed owner
    may have been kept in Redis just after the resume looked."""
    now = trio.current_time()
    horizon = now + settings.result_deadline_ms / 1000 - older_than_s
    return {a.session_id: a.missing_answers() for a in sessions.actors()
            if a.results.next_deadline() < horizon
            or ((a.epoch or 0) > 1 and a.results.outstanding and now - a.started_at < older_than_s)}


async def _drain(running: Running) -> None:
    """Ask every session to finish and wait until they are gone; then mark every node held
    here draining (no new jobs from any instance) and wait until they have answered the jobs
    they hold (other instances' jobs included). Both bounded by ``drain_timeout_ms``. Jobs
    still held when the node sockets close are moved by the instances that placed them.
    (The nodes stay eligible while the sessions here drain, and :data:`NODES_DRAIN_AFTER_S`
    more: their last utterances, and those of instances stopping at the same time, need them.)"""
    deadline = trio.current_time() + min(running.settings.drain_timeout_ms / 1000, running.drain_within_s or math.inf)
    event(log, "draining", sessions=len(running.sessions), nodes=len(running.nodes),
          drain_timeout_ms=running.settings.drain_timeout_ms)
    for actor in running.sessions.actors():
        actor.shutdown_nowait()
    with trio.move_on_at(deadline) as scope:
        async with trio.open_nursery() as waiters:
            waiters.start_soon(_wait_drained, running)
            await running._now.wait()
            waiters.cancel_scope.cancel()
    if scope.cancelled_caught and len(running.sessions):
        event(log, "drain_timeout", logging.WARNING, sessions_left=len(running.sessions))


SHUTDOWN_RETRY_AFTER_MS = (100, 500)
"""``retry_after_ms`` of ``SHUTTING_DOWN``: short, since another instance, or another worker
of the box on the same port, can take the connection at once (docs/protocol.md, v1.6)."""

NODES_DRAIN_AFTER_S = 1.0
"""After this instance's sessions are done, how long its nodes stay eligible before they are
marked draining: other instances stopping at the same moment (the workers of a box on
``systemctl stop``) still place their sessions' last utterances on them."""


async def _wait_drained(running: Running, poll_s: float = 0.1) -> None:
    await running.sessions.count.wait_value(0)
    if running.nodes.all():
        await trio.sleep(NODES_DRAIN_AFTER_S)
    nodes = running.nodes.all()
    if nodes:
        node_ids = [conn.node_id for conn in nodes]
        try:
            await running.scheduling.node_state(node_ids, running.settings.instance_id, online=True, draining=True)
            while await running.scheduling.jobs_held(node_ids):
                await trio.sleep(poll_s)
        except RedisUnavailable:
            pass  # nothing to learn: the placing instances move what is left
    running._now.set()


async def _status(running: Running | None, dispatcher: Dispatcher) -> dict:
    """The ``/status`` snapshot: this instance's sessions, every registered node, jobs, Redis."""
    if running is None:
        return {"state": "starting"}
    nodes: list[dict] | None
    try:
        nodes = [{**node, "local": node["node_id"] in running.nodes} for node in await running.scheduling.nodes_status()]
    except RedisUnavailable:
        nodes = None
    instances: dict[str, float] | None = None
    if running.ownership is not None:
        try:
            instances = await running.ownership.alive_instances()
        except RedisUnavailable:
            pass
    return {
        "instance_id": running.settings.instance_id,
        "ws_url": running.ws_url,
        "instances": instances,
        "state": "draining" if running.draining else "redis_unreachable" if not running.redis_ok else
                 (running.admission.refusing() if running.admission is not None else None) or "ready",
        "redis": {"ok": running.redis_ok, "latency_ms": round(running.metrics.redis_latency_seconds._value.get() * 1000, 3)},
        "admission": _admission_status(running.admission),
        "sessions": [
            {"session_id": a.session_id, "src_lang": a.src_lang, "tgt_langs": list(a.tgt_langs),
             "utterances": a.next_index, "results_owed": a.results.outstanding, "backlog": len(a.backlog),
             "lag_ms": round(lag_ms), "oldest_frame_age_ms": round(age * 1000), "closing": a.closing}
            for a in running.sessions.actors() for lag_ms, age in [a.lag(trio.current_time())]
        ],
        "nodes": nodes,
        "jobs": {"in_flight": len(dispatcher.placed), "waiting": dispatcher.waiting},
        "recent_results": list(reversed(running.sessions.recent_results)),
    }


async def _session_location(redis: RedisAdapter, ownership: Ownership, session_id: str) -> tuple[int, dict]:
    """``GET /sessions/<id>``: where the session is (cluster/location.py), from Redis; 400 for
    an id that cannot be one, 404 for one Redis does not know, 503 while Redis cannot answer."""
    if not ID_PATTERN.fullmatch(session_id):
        return bad_session_id()
    try:
        found = await locate(redis, ownership, session_id)
    except RedisUnavailable as exc:
        return 503, {"error": "UNAVAILABLE", "message": f"state store unavailable ({exc.reply})"}
    if found is None:
        return 404, {"error": "UNKNOWN_SESSION", "message": "no such session (never opened, expired, or not journaled)"}
    return 200, found


async def _cluster(redis: RedisAdapter, ownership: Ownership, scheduling: SchedulingClient, rest: str) -> tuple[int, dict]:
    """``GET /cluster``: every instance, node and language pair, from Redis (cluster/overview.py)."""
    if rest not in ("", "/"):
        return no_such_path()
    try:
        return 200, await overview(redis, ownership, scheduling)
    except RedisUnavailable as exc:
        return 503, {"error": "UNAVAILABLE", "message": f"state store unavailable ({exc.reply})"}


def _admission_status(admission: AdmissionControl | None) -> dict | None:
    """Sessions held against ``max_sessions`` (0: no limit), the resume reserve, and whether
    new sessions are refused now."""
    if admission is None:
        return None
    return {"held": admission.held, "max_sessions": admission.limit, "reserve": admission.reserve, "full": admission.full(),
            "overloaded": admission.overloaded, "loop_lag_ms": round(admission.lag_s * 1000, 1),
            "overload_lag_ms": round(admission.lag_limit_s * 1000)}


async def _health_check(running: Running, nursery: trio.Nursery) -> None:
    """Ping Redis every second; drives ``/readyz`` and the redis_up / latency / memory metrics.
    Also reads the data marker (``SchedulingClient.data_marker``): when it changed, Redis
    restarted without its data, and every session journal held here is written again in the
    background. Redis is not ready while it cannot be reached, while it is full (an ``OOM``
    reply since the last check, or used memory at ``maxmemory``) or a replica (``READONLY``:
    a failover under way), and while it evicts (a policy changed, or a failover to a server
    set up otherwise: ``--allow-evicting-redis`` lets that be)."""
    marker: str | None = None
    seen_errors = dict(running.redis.errors)
    while True:
        try:
            with trio.fail_after(5):
                latency = await running.redis.ping()
                memory = await _memory(running)
                replicas = await _replicas(running)
                seen = await running.scheduling.data_marker(str(uuid.uuid4()))
            running.metrics.redis_latency_seconds.set(latency)
            if marker is not None and seen != marker:
                event(log, "redis_data_lost", logging.WARNING, sessions=len(running.sessions))
                nursery.start_soon(_after_data_loss, running)
            marker = seen
            refused = {r for r, n in running.redis.errors.items() if r in REFUSALS and n > seen_errors.get(r, 0)}
            if replicas is not None and replicas < running.settings.redis_wait_replicas:
                refused.add("replicas")
            _set_redis_state(running, _redis_problem(running, memory, refused))
        except Exception as exc:  # unreachable, too slow, or an error reply (e.g. still loading): not ready
            _set_redis_state(running, _refusal({getattr(exc, "reply", "")}) or f"unreachable: {str(exc) or type(exc).__name__}")
        seen_errors = dict(running.redis.errors)
        running.metrics.redis_up.set(1 if running.redis_ok else 0)
        await trio.sleep(HEALTH_INTERVAL)


async def _info(running: Running, section: str) -> Any:
    """``INFO <section>`` (None when an ACL refuses ``INFO``: NOPERM, told once at start-up as
    redis_policy_unknown); RedisUnavailable goes up to the health check."""
    try:
        return await running.redis.command("INFO", section)
    except RedisUnavailable:
        raise
    except Exception:
        return None


async def _memory(running: Running) -> MemoryState | None:
    """Redis memory now (None when an ACL refuses ``INFO``: then memory is not watched)."""
    info = await _info(running, "memory")
    if info is None:
        return None
    memory = memory_state(info)
    running.metrics.redis_memory_used_bytes.set(memory.used)
    running.metrics.redis_memory_max_bytes.set(memory.limit)
    return memory


async def _replicas(running: Running) -> int | None:
    """The replicas following the primary now (``INFO replication``), with
    ``--redis-wait-replicas`` only (None without it, or when an ACL refuses ``INFO``)."""
    if not running.settings.redis_wait_replicas:
        return None
    info = await _info(running, "replication")
    if info is None:
        return None
    connected = int(info.get("connected_slaves", 0)) if isinstance(info, dict) else 0
    running.metrics.redis_replicas.set(connected)
    return connected


def _refusal(replies: set[str]) -> str | None:
    """Why Redis refuses writes, from the error replies it gave (None: it did not)."""
    if "OOM" in replies:
        return FULL
    if "replicas" in replies:
        return REPLICAS_SHORT
    writes = sorted(replies & {"READONLY", "MISCONF"})
    return "refusing writes: " + ", ".join(writes) if writes else None


def _redis_problem(running: Running, memory: MemoryState | None, refused: set[str]) -> str | None:
    """Why Redis answers but is not fit for new work (None: it is)."""
    if memory is not None and memory.limit and memory.used >= memory.limit:
        return FULL
    if refused:
        return _refusal(refused)
    unsafe = evicting(memory.policies) if memory is not None else {}
    if unsafe and not running.settings.allow_evicting_redis:
        return f"evicting maxmemory-policy {describe(unsafe)}: set noeviction (or --allow-evicting-redis)"
    return None


def _set_redis_state(running: Running, problem: str | None) -> None:
    """Keep ``redis_ok`` / ``redis_problem``; a change is logged once (redis_unreachable,
    redis_unfit with the reason, redis_recovered)."""
    if problem == running.redis_problem:
        return
    if problem is None:
        event(log, "redis_recovered", was=running.redis_problem)
    elif problem.startswith("unreachable"):
        event(log, "redis_unreachable", logging.ERROR, error=problem.split(": ", 1)[-1])
    else:
        event(log, "redis_unfit", logging.ERROR, problem=problem)
    running.redis_problem = problem
    running.redis_ok = problem is None


async def _after_data_loss(running: Running) -> None:
    """Redis lost its data: the owner records of the sessions and nodes held here are written
    again (first: jobs and answers that cross instances need them), every job placed here that
    it forgot is placed again, and every local session's journal is written again (so each
    stays resumable)."""
    try:
        with trio.move_on_after(10):
            if running.ownership is not None:
                await running.ownership.reassert([a.session_id for a in running.sessions.actors()],
                                                 [conn.node_id for conn in running.nodes.all()])
            await running.dispatcher.recovery.redis_data_lost()
    except Exception as exc:  # Redis away again, or a bug: the lease expiry moves what is left
        event(log, "jobs_recheck_failed", logging.WARNING, error=str(exc))
    await _reassert_journals(running)


async def _reassert_journals(running: Running) -> None:
    """Write every local session's journal again."""
    for session_id, journal in list(running.sessions.journals.items()):
        with trio.move_on_after(5):
            try:
                await journal.reassert()
            except Exception as exc:  # Fenced (resumed elsewhere meanwhile) or a bug: the next session
                event(log, "journal_reassert_failed", logging.WARNING, session_id=session_id, error=str(exc))


SUPERVISOR_PID_ENV = "SCHEDULER_SUPERVISOR_PID"  # set by ops/supervisor.py for its workers
SUPERVISOR_POLL_S = 0.2
ORPHAN_DRAIN_S = 1.5  # a worker whose supervisor died drains this long at most, then exits


async def _watch_supervisor(running: Running, supervisor_pid: int) -> None:
    """A worker whose supervisor is gone (``kill -9``: nobody else would stop it, and it
    would keep serving on the shared port) drains for at most :data:`ORPHAN_DRAIN_S` and
    exits: its clients resume elsewhere. The parent pid is polled: ``PR_SET_PDEATHSIG`` fires
    when the forking *thread* exits, which Trio's process spawning does not make safe."""
    while os.getppid() == supervisor_pid:
        await trio.sleep(SUPERVISOR_POLL_S)
    event(log, "supervisor_gone", logging.WARNING, supervisor_pid=supervisor_pid, action="drain")
    running.shutdown(within_s=ORPHAN_DRAIN_S)


async def _watch_signals(running: Running, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM / SIGINT drain (a second one exits at once). SIGHUP is logged and ignored: one
    process cannot replace itself without cutting its sessions; a --workers supervisor
    replaces its workers one at a time (ops/supervisor.py). Once this watcher ends (the
    daemon has drained and is closing down), later signals are ignored: a SIGINT arriving
    then would be a KeyboardInterrupt in the middle of the clean-up."""
    try:
        await _signal_loop(running, task_status)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)


async def _signal_loop(running: Running, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        count = 0
        async for signum in signals:
            if signum == signal.SIGHUP:
                event(log, "reload_unsupported", logging.WARNING,
                      detail="one process cannot reload without cutting its sessions: run it with --workers")
                continue
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                event(log, "signal", signal=name, action="drain")
                running.shutdown()
            else:
                event(log, "signal", signal=name, action="exit_now")
                running.shutdown(immediate=True)
