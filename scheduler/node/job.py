"""What a node's function sees and gives back: a :class:`Job` in, a :class:`Result` (or a
``str``, or :class:`JobFailed`) out, and how one call of it becomes exactly one ``job_result``.

The function may be ``async`` (it runs in the node's Trio task, cancelled at the job's
deadline or on ``job_cancel``) or blocking (it runs in a worker thread under the node's
``CapacityLimiter``; a cancelled thread cannot be stopped, so its answer is dropped and
:attr:`Job.cancelled` is set for a function that wants to stop early).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from scheduler.ops.logs import event
from scheduler.protocol import JobAssign, JobResult

log = logging.getLogger("scheduler.node")

MAX_REASON_CHARS = 200
"""A :class:`JobFailed` reason is cut to this many characters (the daemon takes up to 1,000)."""

DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
HANDLER_ERROR = "HANDLER_ERROR"
NODE_STOPPING = "NODE_STOPPING"


@attrs.frozen(kw_only=True)
class Job:
    """One job: turn ``audio`` (mono PCM s16le at ``sample_rate``) in ``src_lang`` into text
    in ``tgt_lang``. ``turn_id`` names the speaker's turn (jobs of one turn tend to come to the
    same node); ``deadline_ms`` is when the answer stops being useful (epoch ms)."""

    job_id: str
    attempt: int
    session_id: str
    utterance_index: int
    turn_id: str
    src_lang: str
    tgt_lang: str
    sample_rate: int
    audio: bytes = attrs.field(repr=lambda audio: f"<{len(audio)} bytes>")
    deadline_ms: int
    cancelled: threading.Event = attrs.field(factory=threading.Event, repr=False, eq=False)
    """Set when the answer is no longer wanted (``job_cancel``, the deadline, the node stopping
    or losing its connection): a blocking function may look at it between steps."""

    @property
    def audio_ms(self) -> float:
        return len(self.audio) // 2 * 1000 / self.sample_rate

    @property
    def seconds_left(self) -> float:
        """Until the deadline (0 once it passed): a timeout for the function's own calls."""
        return max(0.0, self.deadline_ms / 1000 - time.time())

    @classmethod
    def from_assign(cls, msg: JobAssign, audio: bytes) -> Job:
        return cls(job_id=msg.job_id, attempt=msg.attempt, session_id=msg.session_id, utterance_index=msg.utterance_index,
                   turn_id=msg.turn_id, src_lang=msg.src_lang, tgt_lang=msg.tgt_lang, sample_rate=msg.sample_rate,
                   audio=audio, deadline_ms=msg.deadline_ms)


@attrs.frozen
class Result:
    """A job's answer: ``text`` in the target language, ``source_text`` the transcript."""

    text: str = attrs.field(validator=attrs.validators.instance_of(str))
    source_text: str | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str)))


class JobFailed(Exception):
    """Raise it to answer the job with ``status: error`` and ``reason`` (shown to the client as
    the translation's error). Any other exception is answered ``HANDLER_ERROR: <its type>``,
    with its traceback in the node's log only: an exception's message may hold what a client
    should not see (a path, a URL with its credentials)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Handler = Callable[[Job], Result | str | Awaitable[Result | str]]


def is_async(handler: Callable) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 (an object with an async __call__)
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


async def call(handler: Handler, job: Job, limiter: trio.CapacityLimiter) -> Result | str:
    """One call of ``handler``: awaited when async, else in a thread under ``limiter``."""
    if is_async(handler):
        return await handler(job)  # type: ignore[misc]
    return await trio.to_thread.run_sync(handler, job, limiter=limiter, abandon_on_cancel=True)  # type: ignore[arg-type]


async def answer(handler: Handler, job: Job, limiter: trio.CapacityLimiter, node_id: str) -> JobResult:
    """Call ``handler`` for ``job`` and make its ``job_result``: ok, or error with a reason.
    Cancellation is not caught here: the caller decides whether a cancelled job is answered."""
    try:
        outcome = await call(handler, job, limiter)
    except JobFailed as failed:
        event(log, "job_failed", node_id=node_id, job_id=job.job_id, reason=failed.reason[:MAX_REASON_CHARS])
        return error(job, failed.reason)
    except Exception as exc:
        event(log, "job_handler_raised", logging.ERROR, exc_info=True, node_id=node_id, job_id=job.job_id,
              error=type(exc).__name__)
        return error(job, f"{HANDLER_ERROR}: {type(exc).__name__}")
    if isinstance(outcome, str):
        outcome = Result(text=outcome)
    if not isinstance(outcome, Result):
        event(log, "job_handler_returned", logging.ERROR, node_id=node_id, job_id=job.job_id, returned=type(outcome).__name__)
        return error(job, f"{HANDLER_ERROR}: returned {type(outcome).__name__}, not Result or str")
    return JobResult(job_id=job.job_id, attempt=job.attempt, status="ok", source_text=outcome.source_text, text=outcome.text)


def error(job: Job, reason: str) -> JobResult:
    return JobResult(job_id=job.job_id, attempt=job.attempt, status="error", error=reason[:MAX_REASON_CHARS] or HANDLER_ERROR)
