"""Reference worker node: the node library (:mod:`scheduler.node`) around two plug-ins.

Speech (``asr``): ``fake`` (default; deterministic so tests can check it end to end: the
duration of the job's audio and its CRC-32, tagged with the language, ``[zh] 1200ms
crc32=1a2b3c4d``) or ``pocketsphinx`` (English, model bundled with the package; see
:mod:`scheduler.reference.asr`). Translation (``mt``): ``echo`` (the transcript re-tagged
with the target language) or ``apertium`` (real offline MT, :mod:`scheduler.reference.mt`).
Each job waits ``delay_ms`` (+ up to ``jitter_ms``) first and fails with ``fail_rate``:
knobs for tests and benchmarks. Its ``load_score`` is this process's CPU use since its last
heartbeat over the CPUs of the box (docs/protocol.md, v1.4).
"""

from __future__ import annotations

import os
import random
import ssl
import time
import uuid

import attrs
import trio

from scheduler.node import Job, JobFailed, Node, NodeRefused, Result
from scheduler.reference.asr import make_engine
from scheduler.reference.mt import make_translator, translate_placeholder

NodeFatal = NodeRefused  # (the name before the node library)
__all__ = ["NodeFatal", "NodeOptions", "ReferenceNode", "translate_placeholder"]


@attrs.frozen(kw_only=True)
class NodeOptions:
    url: str
    more_urls: tuple[str, ...] = ()  # tried in turn after ``url`` when it is down
    node_id: str = attrs.field(factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    lang_pairs: tuple[tuple[str, str], ...] = (("zh", "en"),)
    pools: tuple[str, ...] | None = None
    max_jobs: int = 4
    delay_ms: int = 200
    jitter_ms: int = 0
    fail_rate: float = 0.0
    token: str | None = None
    reconnect: bool = True
    engine: str = "fake"  # the speech plug-in (--asr)
    mt: str = "echo"
    drain_timeout_s: float = 60.0
    metrics_port: int | None = None  # serve /metrics there (scheduler/node/metrics.py)
    metrics_host: str = "127.0.0.1"
    ssl_context: ssl.SSLContext | None = None  # for wss:// (None: the system's trust store)


class CpuLoad:
    """This process's CPU use since the last call, over the CPUs of the box (0-1)."""

    def __init__(self) -> None:
        self._cores = os.cpu_count() or 1
        self._wall, self._cpu = time.monotonic(), time.process_time()

    def __call__(self) -> float:
        wall, cpu = time.monotonic(), time.process_time()
        score = (cpu - self._cpu) / max(1e-6, (wall - self._wall) * self._cores)
        self._wall, self._cpu = wall, cpu
        return min(1.0, max(0.0, score))


class ReferenceNode:
    def __init__(self, options: NodeOptions) -> None:
        self.options = o = options
        self.engine = make_engine(o.engine, o.max_jobs)
        self.translator = make_translator(o.mt, o.lang_pairs, o.max_jobs)
        self.node = Node(self.handle, lang_pairs=o.lang_pairs, max_jobs=o.max_jobs, urls=(o.url, *o.more_urls),
                         node_id=o.node_id, pools=o.pools, token=o.token, load_score=CpuLoad(),
                         capabilities={"engine": o.engine, "mt": o.mt}, drain_timeout_s=o.drain_timeout_s,
                         reconnect=o.reconnect, ssl_context=o.ssl_context, metrics_port=o.metrics_port,
                         metrics_host=o.metrics_host)

    @property
    def jobs_done(self) -> int:
        return self.node.stats.jobs_done

    @property
    def jobs_cancelled(self) -> int:
        return self.node.stats.jobs_cancelled

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect with backoff; ``task_status`` fires on the first registration."""
        await self.node.run(task_status=task_status)

    async def handle(self, job: Job) -> Result:
        o = self.options
        await trio.sleep((o.delay_ms + random.randint(0, o.jitter_ms)) / 1000)
        if o.fail_rate and random.random() < o.fail_rate:
            raise JobFailed("FAKE_FAILURE")
        source_text = await self.engine.transcribe(job.audio, job.sample_rate, job.src_lang)
        text = await self.translator.translate(source_text, job.src_lang, job.tgt_lang)
        return Result(text=text, source_text=source_text)
