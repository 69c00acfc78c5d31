"""Reference worker node: registers, heartbeats, answers every job.

With the ``fake`` engine (default) the answer is deterministic so tests can check it end to
end: the duration of the job's audio and its CRC-32, tagged with the language
(``[zh] 1200ms crc32=1a2b3c4d``). With ``pocketsphinx`` it really transcribes (English
model bundled with the package) and tags the transcript as a placeholder translation
(see :mod:`scheduler.reference.asr`). Jobs run
concurrently (the daemon never sends more than ``max_jobs``), each after ``delay_ms``;
``job_cancel`` cancels the job's task. The node reconnects with backoff when the socket
drops, and stops on a fatal error (bad token, duplicate node id).
"""

from __future__ import annotations

import base64
import logging
import os
import random
import ssl
import time
import uuid

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from scheduler.ops.logs import event
from scheduler.protocol import Error, Heartbeat, JobAssign, JobCancel, JobResult, Register, Registered, encode, parse_from_daemon
from scheduler.reference.asr import make_engine

log = logging.getLogger("scheduler.node")

FATAL_CODES = {"UNAUTHORIZED", "DUPLICATE_NODE_ID", "BAD_MESSAGE"}


@attrs.frozen(kw_only=True)
class NodeOptions:
    url: str
    node_id: str = attrs.field(factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    lang_pairs: tuple[tuple[str, str], ...] = (("zh", "en"),)
    pools: tuple[str, ...] | None = None
    max_jobs: int = 4
    delay_ms: int = 200
    jitter_ms: int = 0
    fail_rate: float = 0.0
    token: str | None = None
    reconnect: bool = True
    engine: str = "fake"
    ssl_context: ssl.SSLContext | None = None  # for wss:// (None: the system's trust store)


class NodeFatal(Exception):
    """The daemon refused this node for good (e.g. UNAUTHORIZED); reconnecting would not help."""


def translate_placeholder(source_text: str, src_lang: str, tgt_lang: str) -> str:
    """No offline MT model: the "translation" is the source text re-tagged with the target language."""
    prefix = f"[{src_lang}] "
    body = source_text[len(prefix):] if source_text.startswith(prefix) else source_text
    return f"[{tgt_lang}] {body}"


class ReferenceNode:
    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.engine = make_engine(options.engine, options.max_jobs)
        self.jobs_done = 0
        self.jobs_cancelled = 0
        self._jobs: dict[tuple[str, int], trio.CancelScope] = {}
        self._registered = False

    def _url(self) -> str:
        url = self.options.url.rstrip("/")
        return url if url.endswith("/v1/node") else url + "/v1/node"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect with backoff; ``task_status`` fires on the first registration."""
        backoff = 0.2
        while True:
            try:
                async with open_websocket_url(self._url(), ssl_context=self.options.ssl_context) as ws:
                    backoff = 0.2
                    await self._session(ws, task_status)
            except* (ConnectionClosed, HandshakeError, OSError) as group:  # (also from inside its nursery: a group)
                event(log, "node_disconnected", logging.WARNING, node_id=self.options.node_id, error=repr(group.exceptions[0]))
            if not self.options.reconnect:
                return
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def _session(self, ws, task_status) -> None:
        o = self.options
        await ws.send_message(encode(Register(node_id=o.node_id, lang_pairs=[list(p) for p in o.lang_pairs],
                                              max_jobs=o.max_jobs, pools=list(o.pools) if o.pools else None,
                                              capabilities={"engine": o.engine}, token=o.token)))
        reply = parse_from_daemon(await ws.get_message(), "node")
        if isinstance(reply, Error):
            raise NodeFatal(f"{reply.code}: {reply.message}")
        assert isinstance(reply, Registered)
        event(log, "node_registered", node_id=o.node_id, url=self._url(), max_jobs=o.max_jobs)
        if not self._registered:  # (the first registration only: a reconnect must not report again)
            self._registered = True
            task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats, ws, reply.heartbeat_interval_ms / 1000)
            while True:
                msg = parse_from_daemon(await ws.get_message(), "node")
                if isinstance(msg, JobAssign):
                    nursery.start_soon(self._job, ws, msg)
                elif isinstance(msg, JobCancel):
                    scope = self._jobs.get((msg.job_id, msg.attempt))
                    if scope is not None:
                        scope.cancel()
                        self.jobs_cancelled += 1
                elif isinstance(msg, Error):
                    event(log, "daemon_error", logging.WARNING, node_id=o.node_id, code=msg.code, message=msg.message)
                    if msg.fatal and msg.code in FATAL_CODES:
                        raise NodeFatal(f"{msg.code}: {msg.message}")

    async def _heartbeats(self, ws, interval: float) -> None:
        """Every ``interval``: the jobs held, and as ``load_score`` the engine's measured load:
        the CPU this process used since the last heartbeat over the CPU the box has (busy slots
        over max_jobs would only repeat, late, what the daemon knows at once from its slots:
        a node whose slots had just freed would stay saturated until its next heartbeat)."""
        cores = os.cpu_count() or 1
        last_wall, last_cpu = time.monotonic(), time.process_time()
        while True:
            await trio.sleep(interval)
            wall, cpu = time.monotonic(), time.process_time()
            score = min(1.0, max(0.0, (cpu - last_cpu) / max(1e-6, (wall - last_wall) * cores)))
            last_wall, last_cpu = wall, cpu
            await ws.send_message(encode(Heartbeat(load={"jobs": len(self._jobs)}, load_score=round(score, 3))))

    async def _job(self, ws, job: JobAssign) -> None:
        o = self.options
        key = (job.job_id, job.attempt)
        with trio.CancelScope() as scope:
            self._jobs[key] = scope
            try:
                await trio.sleep((o.delay_ms + random.randint(0, o.jitter_ms)) / 1000)
                if o.fail_rate and random.random() < o.fail_rate:
                    result = JobResult(job_id=job.job_id, attempt=job.attempt, status="error", error="FAKE_FAILURE")
                else:
                    source_text = await self.engine.transcribe(base64.b64decode(job.audio), job.sample_rate, job.src_lang)
                    text = translate_placeholder(source_text, job.src_lang, job.tgt_lang)
                    result = JobResult(job_id=job.job_id, attempt=job.attempt, status="ok", source_text=source_text, text=text)
                await ws.send_message(encode(result))
                self.jobs_done += 1
            finally:
                self._jobs.pop(key, None)

