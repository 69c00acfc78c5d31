"""What the dispatcher asks the store to place (store/placing.py): a new job, or a move of
a placed one, and what every placement of one call shares."""

from __future__ import annotations

import attrs


@attrs.frozen
class Context:
    """What every placement of one call shares."""

    now_ms: int
    lease_ms: int
    node_ttl_ms: int
    placed_by: str
    locality_slack: float


@attrs.frozen
class NewJob:
    """A job to create and place. ``number``: the id the dispatcher allocated (layout 1: the
    job id; layout 2: the ``n`` of ``<shard>.<n>``)."""

    job_key: str
    number: str
    session_id: str
    utterance_index: int
    src: str
    tgt: str
    turn_id: str
    turn_action: str
    turn_jobs: int
    epoch: int | None
    audio_b64: str
    sample_rate: int
    deadline_ms: int
    rand: int  # ties among equally loaded nodes
    journal_entry: str = ""  # the utterance's resume-journal entry, written with a fresh claim ('' none)


@attrs.frozen
class MoveJob:
    """A placed job to move off ``old_node`` (attempt + 1)."""

    job_id: str
    old_node: str
    expected_attempt: int
    session_id: str
    turn_id: str
    src: str
    tgt: str
    rand: int


Item = NewJob | MoveJob
