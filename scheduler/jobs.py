"""Job contracts between a session and scheduling: what the actor asks for and what comes back.

- :class:`JobRequest`: one job (one utterance, one target language) the actor submits;
- :class:`JobPort`: what the actor needs from scheduling (the dispatcher implements it);
- :class:`JobOutcome`: a job's answer, or its failure to be placed, routed to its session;
- :class:`JobWaiting`: the job waits for a node (or no longer does);
- :class:`SessionInbox`: where outcomes for the sessions held here go (the real one is
  :class:`scheduler.session.registry.SessionRegistry`).

They live here, not in the actor's module, so that the dispatcher, the node gateway, the
relay and the session registry can name them without importing the actor.
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Protocol

import attrs

from scheduler.protocol import Translation


def job_key_for(session_id: str, utterance_index: int, tgt_lang: str) -> str:
    """``job_key = "{session_id}:{utterance_index}:{job_type}"`` (docs/protocol.md)."""
    return f"{session_id}:{utterance_index}:{job_type_for(tgt_lang)}"


def job_type_for(tgt_lang: str) -> str:
    return f"translate:{tgt_lang}"


def owed_entry(reason: str, turn_id: str, deadline_ms: int) -> str:
    """The resume journal's entry of a finalized utterance still owed its result
    (``u:<index>`` in the session hash): written by the creation of its first job
    (:attr:`JobRequest.finalize_reason`), or else by the session's writer (journal.py)."""
    return json.dumps({"reason": reason, "turn_id": turn_id, "deadline_ms": deadline_ms})


@attrs.frozen
class JobOutcome:
    """A job's answer (or its failure to be placed), routed to the session that owns it."""

    utterance_index: int
    tgt_lang: str
    translation: Translation
    source_text: str | None = None
    node_s: float | None = None  # the job's time at its node, as the instance holding the node saw it


@attrs.frozen
class JobWaiting:
    """The job waits for a node (``error`` set, e.g. NO_AVAILABLE_NODE) or no longer does (None).

    At the result deadline a still-waiting job's translation is FAILED with ``error``, not SKIPPED.
    """

    utterance_index: int
    tgt_lang: str
    error: str | None


@attrs.frozen
class JobRequest:
    job_key: str
    session_id: str
    utterance_index: int
    src_lang: str
    tgt_lang: str
    turn_id: str
    turn_action: str  # "keep" (max_duration), "end" (turn had affinity), "none"
    turn_jobs: int  # jobs of this utterance (for "end")
    sample_rate: int
    audio: bytes
    deadline: float  # trio clock: after this the answer is no longer wanted
    epoch: int | None = None  # the session's fencing epoch (resume); None: not fenced
    finalize_reason: str = ""  # the first job of an utterance: its finalize reason, so that the job's creation
    # writes the utterance's resume-journal entry (docs/redis.md); '' for the others

    @property
    def job_type(self) -> str:
        return job_type_for(self.tgt_lang)

    @functools.cached_property
    def audio_b64(self) -> str:
        """The audio as base64, encoded once: the job keeps it in Redis and its job_assign carries it."""
        return base64.b64encode(self.audio).decode("ascii")


@attrs.frozen
class StoreOutage:
    """Whether the store that answers go through (Redis) is out, on the Trio clock: ``since``
    when it went out (None: it does its work), and ``last`` the (start, end) of the last outage
    that ended (None: none yet)."""

    since: float | None = None
    last: tuple[float, float] | None = None


def outage_postponement(deadline: float, outage: tuple[float, float], hold: float) -> float:
    """How much later a result deadline falls once the outage ``(start, end)`` ended: by the
    outage time after both the outage's start and the utterance's own start (``deadline -
    hold``, ``hold`` being the result deadline), at most ``hold``; a deadline that passed
    before the outage began does not move. The session (its results) and the dispatcher (its
    lanes) count an outage out by this one rule, so a job waits in its lane exactly as long as
    its session waits for it."""
    start, end = outage
    return min(max(0.0, end - max(start, deadline - hold)), hold) if deadline > start else 0.0


def held_due(deadline: float, held_from: float | None, hold: float) -> float:
    """When a result deadline comes due while the store is out since ``held_from`` (None: it is
    not): a deadline after the outage began is held, at most ``hold`` later."""
    return deadline + hold if held_from is not None and deadline > held_from else deadline


class JobPort(Protocol):
    """What the actor needs from scheduling; the real one is :class:`scheduler.placement.dispatcher.Dispatcher`.

    ``submit_nowait`` queues a job and returns at once: None when queued (the outcome comes
    back later as a :class:`JobOutcome` in the actor's inbox), or an error code when the job
    was refused (``OVERLOADED``), which the actor records as FAILED. It never blocks, so a slow
    scheduler can never stall a session. ``cancel`` withdraws jobs whose answers are no
    longer wanted (slots released, nodes told). ``outage`` says whether answers are held
    up by Redis.
    """

    def submit_nowait(self, request: JobRequest) -> str | None: ...

    async def cancel(self, session_id: str, job_keys: list[str]) -> None: ...

    def outage(self, now: float) -> StoreOutage:
        """The store's outage as of ``now``; result deadlines count it out."""


class SessionInbox(Protocol):
    """Where scheduling hands outcomes for the sessions held by this instance."""

    def __contains__(self, session_id: str) -> bool: ...

    def deliver(self, session_id: str, outcome: JobOutcome | JobWaiting) -> bool:
        """Into the session's inbox, never blocking; False when the session is not here or its inbox is full."""

    def journaled(self, session_id: str, utterance_index: int, written: bool) -> None:
        """The first placement try of the job that carries the utterance's journal entry
        (:attr:`JobRequest.finalize_reason`) created it and so wrote the entry (``written``),
        or did not (refused, Redis out, a duplicate): the session's writer writes it then."""

    def take_over(self, session_id: str) -> None:
        """The session was resumed on another instance: end its copy here, leaving its jobs."""

    def epoch(self, session_id: str) -> int | None:
        """The fencing epoch of the session's copy held here (None: not here, or not fenced)."""
