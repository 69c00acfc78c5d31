"""One connection of a node to one daemon: register, heartbeats, jobs, drain, until it closes.

Tasks (all in the link's nursery, cancelled together when the socket closes): the reader
(this module's :meth:`Link.serve`), the heartbeats, the drain that waits for the node to be
asked to stop, and one task per job. A job answers at most once: an answer when its function
returns or raises, ``DEADLINE_EXCEEDED`` at its deadline, nothing after ``job_cancel`` (the
daemon no longer wants it) or when the socket closed under it (the daemon moves it: the node
can no longer answer for it).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from scheduler.node.job import DEADLINE_EXCEEDED, Handler, Job, answer, error
from scheduler.node.metrics import Stats
from scheduler.ops.logs import event
from scheduler.protocol import Drain, Error, Heartbeat, JobAssign, JobCancel, JobResult, ProtocolError, Register, Registered, encode
from scheduler.protocol import parse_from_daemon as parse

log = logging.getLogger("scheduler.node")

REGISTER_TIMEOUT_S = 10.0
DRAINED_CLOSE_WAIT_S = 5.0
"""After its last answer, how long a draining node waits for the daemon's ``drained`` close
before it closes the socket itself."""
OVERCOMMIT = 2
NODE_FULL = "NODE_FULL"
"""A daemon gives a node at most ``max_jobs`` jobs; one it has just cancelled may still be
ending here when the next comes. Past ``OVERCOMMIT`` x ``max_jobs`` held, a job is answered
``NODE_FULL`` at once instead of run: a daemon that ignores the bound (a bug, or not a
daemon) cannot make the node hold unbounded audio and tasks."""
EARLY_BEAT_FROM = 0.5
"""The default load score is sent again at once when it falls below the one last sent and
that one was at least this: a node whose slots just freed is not kept saturated until its
next heartbeat."""


class NodeRefused(Exception):
    """The daemon refused this node for good (``UNAUTHORIZED``, ``BAD_MESSAGE``, a node id
    in use on the first registration): trying again would not help."""


class TryLater(Exception):
    """The daemon did not take the registration now (``SHUTTING_DOWN``, ``UNAVAILABLE``, ...)."""

    def __init__(self, code: str, retry_after_s: float | None) -> None:
        super().__init__(code)
        self.retry_after_s = retry_after_s


@attrs.define
class _Running:
    job: Job
    scope: trio.CancelScope
    unwanted: bool = False  # job_cancel: no answer


@attrs.frozen(kw_only=True)
class LinkConfig:
    register: Register
    handler: Handler
    limiter: trio.CapacityLimiter
    load_score: Callable[[], float | None] | None
    drain_timeout_s: float
    stopping: trio.Event
    stats: Stats
    first: bool  # no registration yet: a node id in use is fatal (later it is likely our own old socket)


class Link:
    def __init__(self, ws: WebSocketConnection, config: LinkConfig) -> None:
        self.ws, self.config = ws, config
        self.node_id = config.register.node_id
        self.jobs: dict[tuple[str, int], _Running] = {}
        self._idle = trio.Event()
        self._idle.set()
        self._beat_now = trio.Event()
        self._last_score: float | None = None

    async def register(self) -> Registered:
        await self.ws.send_message(encode(self.config.register))
        with trio.fail_after(REGISTER_TIMEOUT_S):
            reply = parse(await self.ws.get_message(), "node")
        if isinstance(reply, Error):
            fatal = {"UNAUTHORIZED", "BAD_MESSAGE"} | ({"DUPLICATE_NODE_ID"} if self.config.first else set())
            if reply.code in fatal:
                raise NodeRefused(f"{reply.code}: {reply.message}")
            raise TryLater(reply.code, reply.retry_after_ms / 1000 if reply.retry_after_ms else None)
        if not isinstance(reply, Registered):
            raise TryLater("UNEXPECTED_REPLY", None)
        self.config.stats.registered()
        return reply

    async def serve(self, registered: Registered) -> str:
        """Serve until the socket closes; returns how it closed (``1001 drained`` ...)."""
        async with trio.open_nursery() as nursery:
            # (a peer's 0 would make a tight loop of heartbeats, a huge one none: kept within 0.1-300 s)
            nursery.start_soon(self._heartbeats, min(max(registered.heartbeat_interval_ms / 1000, 0.1), 300.0))
            nursery.start_soon(self._drain_on_stop)
            try:
                while True:
                    text = await self.ws.get_message()
                    try:
                        msg = parse(text, "node")
                    except ProtocolError as exc:  # (a newer daemon's message, say: not ours to die of)
                        event(log, "daemon_message_ignored", logging.WARNING, node_id=self.node_id, error=exc.message[:200])
                        continue
                    self._take(msg, nursery)
            except ConnectionClosed as closed:
                reason = closed.reason
                nursery.cancel_scope.cancel()
                return f"{reason.code} {reason.reason or ''}".strip()

    def _take(self, msg: Any, nursery: trio.Nursery) -> None:
        if isinstance(msg, JobAssign):
            key = (msg.job_id, msg.attempt)
            if key in self.jobs:  # (the same assignment twice is one job: one answer)
                return
            if len(self.jobs) >= OVERCOMMIT * self.config.register.max_jobs:
                event(log, "job_refused_node_full", logging.WARNING, node_id=self.node_id, job_id=msg.job_id, jobs=len(self.jobs))
                nursery.start_soon(self._send, JobResult(job_id=msg.job_id, attempt=msg.attempt, status="error", error=NODE_FULL))
                return
            self._start(msg, nursery)
        elif isinstance(msg, JobCancel):
            running = self.jobs.get((msg.job_id, msg.attempt))
            if running is not None:
                running.unwanted = True
                running.scope.cancel()
        elif isinstance(msg, Error):
            event(log, "daemon_error", logging.WARNING, node_id=self.node_id, code=msg.code, fatal=msg.fatal,
                  message=msg.message[:200])
            if msg.fatal and msg.code in ("UNAUTHORIZED", "BAD_MESSAGE"):
                raise NodeRefused(f"{msg.code}: {msg.message}")

    def _start(self, msg: JobAssign, nursery: trio.Nursery) -> None:
        try:
            audio = base64.b64decode(msg.audio, validate=True)
        except (binascii.Error, ValueError):
            audio = None
        job = Job.from_assign(msg, audio or b"")
        deadline = trio.current_time() + (msg.deadline_ms / 1000 - time.time())
        self.jobs[(msg.job_id, msg.attempt)] = _Running(job, trio.CancelScope(deadline=deadline))
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        nursery.start_soon(self._job, job, audio is None)

    async def _job(self, job: Job, bad_audio: bool) -> None:
        key = (job.job_id, job.attempt)
        running = self.jobs[key]
        started, stats = trio.current_time(), self.config.stats
        stats.held(len(self.jobs))
        try:
            result: JobResult | None = error(job, "BAD_AUDIO: not base64") if bad_audio else None
            with running.scope:
                if result is None:
                    result = await answer(self.config.handler, job, self.config.limiter, self.node_id)
            outcome = "ok" if result is not None and result.status == "ok" else "failed"
            if running.scope.cancelled_caught:
                job.cancelled.set()
                if running.unwanted:
                    stats.ended("cancelled", trio.current_time() - started)
                    event(log, "job_cancelled", node_id=self.node_id, job_id=job.job_id, attempt=job.attempt)
                    return
                result, outcome = error(job, DEADLINE_EXCEEDED), "expired"
            assert result is not None
            await self._send(result)
            stats.ended(outcome, trio.current_time() - started)
        finally:
            job.cancelled.set()  # (also when the socket closed under it: nobody wants its answer now)
            self.jobs.pop(key, None)
            stats.held(len(self.jobs))
            if not self.jobs:
                self._idle.set()
            self._maybe_beat_now()

    async def _send(self, msg: Any) -> None:
        try:
            await self.ws.send_message(encode(msg))
        except ConnectionClosed:
            pass  # the reader sees the close and ends the link

    def load_score(self) -> float | None:
        """The author's score, or busy slots over ``max_jobs``."""
        score_of = self.config.load_score
        if score_of is None:
            return round(len(self.jobs) / self.config.register.max_jobs, 3)
        try:
            score = score_of()
        except Exception:
            event(log, "load_score_raised", logging.WARNING, exc_info=True, node_id=self.node_id)
            return None
        if score is None or isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            if score is not None:
                event(log, "load_score_invalid", logging.WARNING, node_id=self.node_id, value=repr(score)[:40])
            return None
        return round(float(score), 3)

    def _maybe_beat_now(self) -> None:
        last, now = self._last_score, len(self.jobs) / self.config.register.max_jobs
        if self.config.load_score is None and last is not None and last >= EARLY_BEAT_FROM and now < last:
            self._beat_now.set()

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            with trio.move_on_after(interval_s):
                await self._beat_now.wait()
            self._beat_now = trio.Event()
            score = self._last_score = self.load_score()
            if self.config.stats.metrics is not None and score is not None:
                self.config.stats.metrics.load_score.set(score)
            await self._send(Heartbeat(load={"jobs": len(self.jobs)}, load_score=score))

    async def _drain_on_stop(self) -> None:
        """When the node is asked to stop: ``drain``, answer the jobs held (and any assigned
        before the daemon saw the drain), then leave once the daemon closes the socket
        (``1001 drained``), or :data:`DRAINED_CLOSE_WAIT_S` after the last answer. Jobs still
        running at the drain timeout are not answered: the socket closes and the daemon gives
        them to another node."""
        await self.config.stopping.wait()
        await self._send(Drain())
        event(log, "node_draining", node_id=self.node_id, jobs=len(self.jobs))
        deadline = trio.current_time() + self.config.drain_timeout_s
        while True:
            with trio.move_on_at(deadline) as waited:
                await self._idle.wait()
            if waited.cancelled_caught:
                event(log, "node_drain_timeout", logging.WARNING, node_id=self.node_id, jobs=len(self.jobs),
                      drain_timeout_s=self.config.drain_timeout_s)
                break
            with trio.move_on_after(DRAINED_CLOSE_WAIT_S):  # the daemon's close, unless a late job comes first
                while not self.jobs:
                    await trio.sleep(0.05)
            if not self.jobs:
                break
        await self.ws.aclose(1001, "node stopping")
