"""Prometheus metrics of the daemon (names as in docs/operations.md, "Metrics": base units, ``scheduler_`` prefix).

One :class:`Metrics` per daemon, on its own ``CollectorRegistry`` (several daemons can run in
one test process without clashing). Process metrics (CPU, RSS, fds) are included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# (src, tgt) -> the numbers of one language pair, read when /metrics is scraped
PairView = Callable[[], Mapping[tuple[str, str], Mapping[str, int]]]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        p = "scheduler_"
        self._edge_and_sessions(p, r)
        self._nodes_and_jobs(p, r)
        self._sessions(r, p)
        self._redis(r, p)

    def _edge_and_sessions(self, p: str, r: CollectorRegistry) -> None:
        """The edge (handshakes, connections, bad frames) and what sessions do with their audio."""
        self.session_actor_backlog_size = Histogram(
            p + "session_actor_backlog_size", "Unprocessed client events in a session's inbox when it takes one",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.duplicate_finalize_suppressed_total = Counter(
            p + "duplicate_finalize_suppressed_total",
            "Finalize causes ignored because their utterance was already cut (its pause and timeout due at one tick)", registry=r)
        self.handshakes_refused_total = Counter(
            p + "handshakes_refused_total", "WebSocket handshakes refused, by reason (origin, subprotocol, bad_bearer, unknown_path)",
            ["reason"], registry=r)
        self.connections_failed_total = Counter(
            p + "connections_failed_total", "Connections ended by an exception inside their own error boundary (ops/boundary.py), "
            "by listener (session, node, websocket before the path is known, admin) and reason (websocket_library, "
            "http_library, tls, transport, bad_encoding, internal)", ["listener", "reason"], registry=r)
        self.admin_unauthorized_total = Counter(
            p + "admin_unauthorized_total", "Admin requests refused 401 for a missing or wrong admin token", registry=r)
        self.connections_refused_total = Counter(
            p + "connections_refused_total", "WebSocket handshakes refused with 503 before anything was read, by reason "
            "(max_connections, max_connections_per_ip)", ["reason"], registry=r)
        self.duplicate_job_blocked_total = Counter(
            p + "duplicate_job_blocked_total", "Job creations blocked because the job_key already existed", registry=r)
        self.result_gap_timeout_total = Counter(
            p + "result_gap_timeout_total", "Translations marked SKIPPED at their result deadline", registry=r)
        self.finalize_latency_seconds = Histogram(
            p + "finalize_latency_seconds", "From the event that triggered a finalize to its jobs being queued for dispatch",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.result_overhead_seconds = Histogram(
            p + "result_overhead_seconds", "Per translation answered by a node: from its utterance's finalize to the "
            "answer reaching the session, less the time the job spent at its node (the daemon's own queueing, Redis and "
            "relay work; waits for a free slot count, waits for an earlier result do not)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r)
        self.finalize_total = Counter(p + "finalize_total", "Utterances finalized, by reason", ["reason"], registry=r)
        self.session_lag_seconds = Histogram(
            p + "session_lag_seconds", "Per live session, sampled every second: the age of the oldest audio frame its "
            "client sent that the session has not processed yet (0 when it is caught up): how far behind real time it is",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0), registry=r)
        self.audio_paced_seconds_total = Counter(
            p + "audio_paced_seconds_total", "Time session readers waited because their client sent audio faster than "
            "--max-realtime-factor times real time", registry=r)
        self.sessions_paced_total = Counter(
            p + "sessions_paced_total", "Sessions whose client sent audio faster than --max-realtime-factor (counted once)",
            registry=r)
        self.session_input_held_total = Counter(
            p + "session_input_held_total", "Times a session stopped taking input because it held --max-jobs-per-session "
            "unanswered translations of a language", registry=r)
        self.journal_finalize_entries_total = Counter(
            p + "journal_finalize_entries_total", "Resume-journal entries of finalized utterances, by who wrote them: "
            "job (the creation of the utterance's first job, no call of its own) or writer (the session's writer, "
            "when the job was not created in time: a full pool, Redis out)", ["written_by"], registry=r)
        self.journal_ahead_wait_seconds = Histogram(
            p + "journal_ahead_wait_seconds", "How long a session's writer held an utterance_finalized back, waiting for "
            "the word that the utterance's first job was created (and wrote its journal entry); at most 0.25 s",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25), registry=r)

    def _nodes_and_jobs(self, p: str, r: CollectorRegistry) -> None:
        """Nodes, jobs, the relay and results."""
        self.nodes_online = Gauge(p + "nodes_online", "Worker nodes connected to this instance", registry=r)
        self.node_load_score = Gauge(
            p + "node_load_score", "Each node's last reported load score (0-1) for the nodes connected to this instance "
            "that report one; above --node-load-threshold a node gets no new jobs", ["node_id"], registry=r)
        self.nodes_saturated = Gauge(
            p + "nodes_saturated", "Nodes connected to this instance whose load score is above --node-load-threshold", registry=r)
        self.jobs_total = Counter(p + "jobs_total", "Jobs by final status", ["status"], registry=r)
        self.jobs_in_flight = Gauge(p + "jobs_in_flight", "Jobs placed on a node and not yet answered", registry=r)
        self.jobs_waiting = Gauge(p + "jobs_waiting", "Jobs waiting for a free node slot", registry=r)
        self.dispatch_errors_total = Counter(p + "dispatch_errors_total", "dispatch_task errors by code", ["code"], registry=r)
        self.redispatch_total = Counter(p + "redispatch_total", "Jobs dispatched again with attempt + 1", registry=r)
        self.stale_answers_dropped_total = Counter(
            p + "stale_answers_dropped_total", "Node answers dropped (wrong node, old attempt, unknown or finished job)", ["code"], registry=r)
        self.node_heartbeats_written_total = Counter(
            p + "node_heartbeats_written_total", "Node heartbeats written to Redis (in batches: one call per node shard "
            "per batch, edge/heartbeats.py)", registry=r)
        self.node_heartbeat_batches_total = Counter(
            p + "node_heartbeat_batches_total", "Batches of node heartbeats written to Redis", registry=r)
        self.node_heartbeats_stale_total = Counter(
            p + "node_heartbeats_stale_total", "Node heartbeats Redis refused because they came on a connection that is not "
            "the node's current one (it reconnected, or that connection was closed); nothing was written", registry=r)
        self.answers_undeliverable_total = Counter(
            p + "answers_undeliverable_total", "Accepted answers whose session was gone or whose inbox was full", registry=r)
        self.relay_messages_total = Counter(
            p + "relay_messages_total", "Jobs, job cancels and answers relayed between instances (job_sent, job_received, "
            "job_node_gone, cancel_sent, cancel_received, cancel_node_gone, outcome_sent, outcome_received, outcome_polled, "
            "outcome_session_gone, outcome_stored)", ["kind"], registry=r)
        self.bad_messages_total = Counter(p + "bad_messages_total", "Frames rejected with an error code", ["side", "code"], registry=r)
        self.websocket_protocol_errors_total = Counter(
            p + "websocket_protocol_errors_total", "WebSocket connections failed by the frame codec, by listener (session, "
            "node) and close code (1002 protocol error, 1007 invalid UTF-8, 1009 message too large)", ["listener", "code"],
            registry=r)
        self.results_total = Counter(p + "results_total", "Results sent to clients, by status", ["status"], registry=r)

    def _sessions(self, r: CollectorRegistry, p: str) -> None:
        """Client sessions: held, started, resumed, refused, taken over; and what stops the event loop they share."""
        self.sessions_active = Gauge(p + "sessions_active", "Live client sessions on this instance", registry=r)
        self.sessions_total = Counter(p + "sessions_total", "Client sessions started", registry=r)
        self.sessions_refused_total = Counter(
            p + "sessions_refused_total", "session_init refused SERVER_FULL, by reason: full (a new session, past "
            "max_sessions less the resume reserve), full_resume (a resume, past max_sessions), overload (a new session "
            "while the event loop lags past overload_lag_ms)", ["reason"], registry=r)
        self.event_loop_lag_seconds = Gauge(
            p + "event_loop_lag_seconds", "How late a periodic task wakes, smoothed over about a second: the time the "
            "event loop is too busy to run a ready task (the overload guard's measure)", registry=r)
        self.gc_pause_seconds = Histogram(
            p + "gc_pause_seconds", "How long each cyclic garbage collection stopped the event loop, by generation "
            "(0 young, 1 middle, 2 full; ops/gcwatch.py)", ["generation"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25), registry=r)
        self.sessions_resumed_total = Counter(p + "sessions_resumed_total",
                                              "Client sessions resumed here (session_init with session_id)", registry=r)
        self.resume_refused_total = Counter(
            p + "resume_refused_total", "Resumes refused UNKNOWN_SESSION, by why: unknown (no such session), denied (the "
            "resume_token, or the API key, does not match), closed (it ended for good); the client gets one answer for all",
            ["why"], registry=r)
        self.sessions_taken_over_total = Counter(p + "sessions_taken_over_total",
                                                 "Sessions held here that were resumed on another connection", registry=r)

    def _redis(self, r: CollectorRegistry, p: str) -> None:
        """What the daemon sees of Redis."""
        self.redis_up = Gauge(p + "redis_up", "1 while the last Redis health check succeeded", registry=r)
        self.redis_latency_seconds = Gauge(p + "redis_latency_seconds", "Round trip of the last Redis health check", registry=r)
        self.redis_errors_total = Counter(
            p + "redis_errors_total", "Redis calls that could not be done now, by reply: an error reply (OOM, READONLY, LOADING, "
            "MASTERDOWN, BUSY, TRYAGAIN, CLUSTERDOWN, MISCONF, NOREPLICAS, NOSCRIPT), timeout, connection, or replicas (a short "
            "WAIT)", ["reply"], registry=r)
        self.redis_memory_used_bytes = Gauge(
            p + "redis_memory_used_bytes", "used_memory of Redis (the fullest primary of a cluster), health check", registry=r)
        self.redis_memory_max_bytes = Gauge(
            p + "redis_memory_max_bytes", "maxmemory of that Redis (0: no limit), health check", registry=r)
        self.redis_replicas = Gauge(
            p + "redis_replicas", "replicas following the primary (connected_slaves), health check; with "
            "--redis-wait-replicas only", registry=r)
        self.redis_outage_seconds_total = Counter(
            p + "redis_outage_seconds", "Time Redis was out as the calls saw it (failing, or a batch in flight over 1 s); "
            "leases and result deadlines count it out", registry=r)
        self.liveness_lapses_total = Counter(
            p + "liveness_lapses_total", "Times this instance found its liveness record gone at a refresh (a stall or "
            "failed refreshes longer than owner_ttl_ms, or Redis lost its data) and took its records back", registry=r)
        self.placement_shard_events_total = Counter(
            p + "placement_shard_events_total", "Key layout 2 (--redis-shards): claims moved to another shard after a "
            "shard had no free node (moved), claims of jobs that never came, burned and claimed again (burned), and jobs "
            "that moved across shards because theirs had no free node when they had to move (relocated)",
            ["event"], registry=r)
        self.redis_retries_total = Counter(
            p + "redis_retries_total", "Writes repeated after an ambiguous or refused outcome (node answers, slot releases), "
            "by what", ["what"], registry=r)

    def watch_pairs(self, jobs: PairView, slots: PairView) -> None:
        """Per language pair gauges, computed at scrape time from the dispatcher (``jobs``:
        waiting, in_flight) and the nodes connected here (``slots``: slots, free). The pairs are
        those that authenticated nodes registered (a session's pairs are checked against them
        at session_init), so a client cannot add a label value."""
        self.registry.register(_PairCollector(jobs, slots))

    def render(self) -> bytes:
        return generate_latest(self.registry)


_PAIR_GAUGES = (
    ("pair_jobs_waiting", "jobs", "waiting", "Jobs of the pair queued in its lane on this instance (new, waiting for a "
     "free slot, or moving)"),
    ("pair_jobs_in_flight", "jobs", "in_flight", "Jobs of the pair this instance placed on a node, not yet answered"),
    ("pair_slots", "slots", "slots", "max_jobs of the nodes connected to this instance that serve the pair"),
    ("pair_slots_free", "slots", "free", "Of those, the slots with no job assigned through this instance's "
     "connection (jobs relayed from other instances included)"),
)


class _PairCollector(Collector):
    def __init__(self, jobs: PairView, slots: PairView) -> None:
        self._views = {"jobs": jobs, "slots": slots}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        views = {name: view() for name, view in self._views.items()}
        for name, view, field, doc in _PAIR_GAUGES:
            family = GaugeMetricFamily("scheduler_" + name, doc, labels=["pair"])
            for (src, tgt), numbers in sorted(views[view].items()):
                family.add_metric([f"{src}-{tgt}"], numbers.get(field, 0))
            yield family
