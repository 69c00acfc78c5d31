"""Registry of the sessions this instance holds, and the router of job outcomes to them."""

from __future__ import annotations

import collections
import logging
import time

from trio_util import AsyncValue

from scheduler.cluster.journal import Journal
from scheduler.jobs import JobOutcome, JobWaiting
from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.protocol import Result
from scheduler.session.actor import SessionActor

log = logging.getLogger("scheduler.registry")


class SessionRegistry:
    """session_id -> live :class:`SessionActor` of this instance."""

    def __init__(self, metrics: Metrics) -> None:
        self._actors: dict[str, SessionActor] = {}
        self.journals: dict[str, Journal] = {}  # session id -> its journal writer (for Journal.reassert)
        self._metrics = metrics
        self.count = AsyncValue(0)  # live sessions, for "wait until all gone"
        self.recent_results: collections.deque[dict] = collections.deque(maxlen=20)  # for /status

    def __len__(self) -> int:
        return len(self._actors)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._actors

    def actors(self) -> list[SessionActor]:
        return list(self._actors.values())

    def add(self, actor: SessionActor, journal: Journal | None = None) -> SessionActor | None:
        """Register ``actor`` (and its journal writer); returns the actor it replaces (same
        session id: a resume), if any."""
        previous = self._actors.get(actor.session_id)
        self._actors[actor.session_id] = actor
        if journal is not None:
            self.journals[actor.session_id] = journal
        self._changed()
        return previous

    def remove(self, actor: SessionActor) -> None:
        if self._actors.get(actor.session_id) is actor:
            del self._actors[actor.session_id]
            self.journals.pop(actor.session_id, None)
        self._changed()

    def take_over(self, session_id: str) -> None:
        """The session was resumed by another instance: end it here, leaving its jobs."""
        actor = self._actors.get(session_id)
        if actor is not None:
            actor.take_over_nowait()

    def epoch(self, session_id: str) -> int | None:
        """The fencing epoch of the session's live actor here (None: not here, or not fenced)."""
        actor = self._actors.get(session_id)
        return actor.epoch if actor is not None else None

    def _changed(self) -> None:
        self.count.value = len(self._actors)
        self._metrics.sessions_active.set(len(self._actors))

    def note_result(self, session_id: str, result: Result) -> None:
        """Remember a result sent to a client (newest last; the 20 most recent are kept)."""
        self.recent_results.append({
            "ts": int(time.time() * 1000), "session_id": session_id, "utterance_index": result.utterance_index,
            "status": result.status, "reason": result.reason,
            "translations": {lang: t.status for lang, t in result.translations.items()},
        })

    def journaled(self, session_id: str, utterance_index: int, written: bool) -> None:
        """To the session's journal writer (:meth:`Journal.ahead`), if the session is here."""
        writer = self.journals.get(session_id)
        if writer is not None:
            writer.ahead(utterance_index, written)

    def deliver(self, session_id: str, outcome: JobOutcome | JobWaiting) -> bool:
        """Hand an outcome to its session without blocking; False (counted, logged) if it cannot."""
        actor = self._actors.get(session_id)
        if actor is not None and actor.put_outcome_nowait(outcome):
            return True
        self._metrics.answers_undeliverable_total.inc()
        event(log, "outcome_undeliverable", logging.DEBUG, session_id=session_id,
              utterance_index=outcome.utterance_index, tgt_lang=outcome.tgt_lang,
              session_present=actor is not None)
        return False
