"""A node's own counters (:class:`Stats`), and with ``metrics_port`` the same as Prometheus
metrics on a small HTTP listener of the node (``/metrics``, ``/healthz``, ``/readyz``: 200
while registered), served by the daemon's admin server code (ops/admin.py).

Names start with ``speech_node_`` (the daemon's own are ``scheduler_*``, and its per-node
gauges ``scheduler_node_*`` describe nodes as the daemon sees them)."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

P = "speech_node_"
OUTCOMES = ("ok", "failed", "expired", "cancelled")
"""``ok``/``failed``: answered ok or error; ``expired``: cut at its deadline (answered
``DEADLINE_EXCEEDED``, counted in ``failed`` too); ``cancelled``: by ``job_cancel``, not answered."""


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.jobs_total = Counter(P + "jobs_total", "Jobs ended, by outcome: ok, failed (answered error), expired "
                                  "(cut at the deadline, also counted failed), cancelled (job_cancel, not answered)",
                                  ["outcome"], registry=r)
        self.jobs_in_flight = Gauge(P + "jobs_in_flight", "Jobs held now", registry=r)
        self.job_seconds = Histogram(P + "job_seconds", "Time from job_assign to the answer sent",
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=r)
        self.connected = Gauge(P + "connected", "1 while registered with a daemon", registry=r)
        self.registrations_total = Counter(P + "registrations_total", "Registrations accepted (the first and "
                                           "every reconnection)", registry=r)
        self.load_score = Gauge(P + "load_score", "The load_score last sent (0-1)", registry=r)
        self.draining = Gauge(P + "draining", "1 once asked to stop (SIGTERM): no new jobs, the held ones finish", registry=r)
        # (what the admin server's error boundary and token check count)
        self.connections_failed_total = Counter(P + "http_connections_failed_total", "HTTP connections to this listener "
                                                "ended by an exception", ["listener", "reason"], registry=r)
        self.admin_unauthorized_total = Counter(P + "http_unauthorized_total", "Requests refused 401", registry=r)
        for outcome in OUTCOMES:
            self.jobs_total.labels(outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@attrs.define
class Stats:
    """What the node did, kept as plain counts (and in :class:`NodeMetrics` when it serves them)."""

    registrations: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_cancelled: int = 0
    jobs_expired: int = 0
    connected: bool = False
    metrics: NodeMetrics | None = attrs.field(default=None, repr=False)

    def registered(self) -> None:
        self.registrations += 1
        self.connected = True
        if self.metrics is not None:
            self.metrics.registrations_total.inc()
            self.metrics.connected.set(1)

    def disconnected(self) -> None:
        self.connected = False
        if self.metrics is not None:
            self.metrics.connected.set(0)

    def held(self, jobs: int) -> None:
        if self.metrics is not None:
            self.metrics.jobs_in_flight.set(jobs)

    def ended(self, outcome: str, seconds: float) -> None:
        """One job's end: ``ok``, ``failed``, ``expired`` (also failed) or ``cancelled``."""
        if outcome == "ok":
            self.jobs_done += 1
        elif outcome == "cancelled":
            self.jobs_cancelled += 1
        else:
            self.jobs_failed += 1
            self.jobs_expired += outcome == "expired"
        if self.metrics is not None:
            self.metrics.jobs_total.labels(outcome).inc()
            if outcome == "expired":
                self.metrics.jobs_total.labels("failed").inc()
            if outcome != "cancelled":
                self.metrics.job_seconds.observe(seconds)
