"""Everything that can happen to a session, as typed events: the core's only input.

Client events come through the session's backlog (``backlog.py``), in the order the client
sent them; the others come through the actor's inbox:

- :class:`AudioIn`: frames for the open utterance (one, or several when the backlog merged
  them), maybe ending the utterance (``is_final``); ``queued_behind`` is how many client
  events still waited in the backlog when this one was taken (the backpressure signal);
- :class:`FinalizeIn`: the client's ``finalize``; :class:`CloseIn`: its ``close_session``;
- :class:`JobOutcome` / :class:`JobWaiting` (from :mod:`scheduler.jobs`): a job's answer, or
  a note that it waits for a node;
- :class:`ShutdownIn`: the daemon drains; :class:`TakenOverIn`: the session was resumed elsewhere;
- :class:`Tick`: only time passed (a deadline of the core came due).
"""

from __future__ import annotations

import attrs

from scheduler.jobs import JobOutcome, JobWaiting


@attrs.frozen
class AudioIn:
    """Audio frames for the open utterance, in order (one frame unless merged), then maybe ``is_final``."""

    frames: tuple[bytes, ...]
    is_final: bool = False
    queued_behind: int = attrs.field(default=0, eq=False)  # a measurement, not part of the event

    @classmethod
    def of(cls, pcm: bytes, is_final: bool = False) -> AudioIn:
        return cls((pcm,), is_final)

    @property
    def merged(self) -> int:
        """How many frames were merged into this event beyond the first."""
        return max(0, len(self.frames) - 1)

    @property
    def nbytes(self) -> int:
        return sum(map(len, self.frames))


@attrs.frozen
class FinalizeIn:
    pass


@attrs.frozen
class CloseIn:
    reason: str = "client_close"


@attrs.frozen
class ShutdownIn:
    """The daemon is draining (not a client event: it takes no client slot)."""


@attrs.frozen
class TakenOverIn:
    """The session was resumed elsewhere (or on a newer connection here): stop at once,
    leaving its jobs to the new owner."""


@attrs.frozen
class Tick:
    """Nothing happened but time: the core's next deadline came due."""


ClientEvent = AudioIn | FinalizeIn | CloseIn
SessionEvent = AudioIn | FinalizeIn | CloseIn | JobOutcome | JobWaiting | ShutdownIn | TakenOverIn | Tick

__all__ = ["AudioIn", "ClientEvent", "CloseIn", "FinalizeIn", "JobOutcome", "JobWaiting", "SessionEvent", "ShutdownIn",
           "TakenOverIn", "Tick"]
