"""The dispatcher's books: where each job placed by this instance runs (:class:`Placement`),
and :class:`Placed`, job key -> placement with the one index job id -> job key (a node's
answer names only the job id). Written by the dispatcher (dispatcher.py), read by its
recovery (recovery.py) and, through ``Dispatcher.job_key_of``, by the node gateway."""

from __future__ import annotations

from typing import Protocol

import attrs

from scheduler.jobs import JobRequest


@attrs.define
class Placement:
    job_id: str
    node_id: str
    attempt: int
    request: JobRequest
    lease_deadline: float = float("inf")  # trio clock; mirrors the lease stored in Redis
    conn_id: str = ""  # the node connection that got the job (register_node); "" if unknown
    uncertain: bool = False  # a move of it timed out: it may have gone through (see _resolve)
    outage_at: float = 0.0  # the Redis outage clock (store/outage.py) when the lease was set

    def lease_due(self, outage_now: float) -> float:
        """When the lease runs out here: its deadline, later by the Redis outages since it was
        set (a node's answer waiting on Redis is not the node's fault)."""
        return self.lease_deadline + (outage_now - self.outage_at)


class Placed(dict[str, Placement]):
    """job key -> Placement, with an index job id -> job key (answers name only the job id)."""

    def __init__(self) -> None:
        super().__init__()
        self.job_keys: dict[str, str] = {}

    def __setitem__(self, job_key: str, placement: Placement) -> None:
        super().__setitem__(job_key, placement)
        self.job_keys[placement.job_id] = job_key

    def __delitem__(self, job_key: str) -> None:
        self.pop(job_key)

    def pop(self, job_key: str, default: Placement | None = None) -> Placement | None:  # type: ignore[override]
        placement = super().pop(job_key, default)
        if placement is not None and placement is not default:
            self.job_keys.pop(placement.job_id, None)
        return placement


class Books(Protocol):
    """What the recovery (recovery.py) needs of the dispatcher: its books, and how to move,
    release or cancel a job on them."""

    placed: Placed

    def holds(self, job_key: str) -> bool: ...

    def placements_on(self, node_id: str) -> list[Placement]: ...

    def move(self, placement: Placement, reason: str) -> None: ...

    def answered(self, job_key: str, *, freed_here: bool = False) -> None: ...

    async def send_cancel(self, node_id: str, job_id: str, attempt: int) -> None: ...

    async def release(self, job_id: str, job_key: str, node_id: str, attempt: int | None = None, *,
                      counted: bool = True) -> list | None: ...
