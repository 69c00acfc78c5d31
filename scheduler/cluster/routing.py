"""Routing: a job to its node and an answer to its session, here first, else over the relay.

The one place that knows whether a node or a session is held by this instance or another:

- :meth:`Router.to_node`: a placed job (or its ``job_cancel``) goes to the node's outbox when
  the node is connected here; else to the instance holding it (its ``node_owner`` record),
  over that instance's job stream. False when neither works (no owner, Redis away): the
  caller moves the job (a cancel needs nothing more: the node's answer is refused anyway).
  A job on another instance's node that is cancelled, or whose lease ran out, must stop
  taking its slot there, so its cancel travels as the job did.
- :meth:`Router.to_session`: an accepted answer goes to the session's inbox when the session
  is held here; else to the instance holding it, over Pub/Sub. With no owner at the moment
  there is nothing to send: ``complete_task`` kept the answer in Redis, and the instance
  that resumes the session takes it (:meth:`take_stored`).
- What arrives over the relay from other instances is delivered here, the same way:
  jobs to local nodes, answers to local sessions (an answer for a job this instance placed
  also takes it off the dispatcher's books: ``answered``), and the note that a session held
  here was resumed elsewhere (:meth:`session_taken_over` sends it).

The relay (``relay.py``) is transport only; the router owns it and runs it (``async with``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from scheduler.cluster.relay import Relay
from scheduler.jobs import JobOutcome, SessionInbox, job_key_for
from scheduler.ops.metrics import Metrics
from scheduler.protocol import Encoded, JobAssign, JobCancel
from scheduler.store.redis_adapter import RedisAdapter, RedisUnavailable

if TYPE_CHECKING:
    from scheduler.cluster.ownership import Ownership
    from scheduler.placement.nodes import NodeRegistry


class Router:
    """Async context manager (runs the relay). ``answered(job_key)`` is told when an answer
    arrives over the relay; ``waiting_sessions()`` names the local sessions whose missing
    answers are worth a look in Redis (see ``relay.py``)."""

    def __init__(self, *, instance_id: str, url: str, redis: RedisAdapter, metrics: Metrics, nodes: NodeRegistry,
                 sessions: SessionInbox, ownership: Ownership, answered: Callable[[str], None],
                 waiting_sessions: Callable[[], dict[str, list[tuple[int, str]]]]) -> None:
        self.instance_id = instance_id
        self._metrics = metrics
        self._nodes = nodes
        self._sessions = sessions
        self._ownership = ownership
        self._answered = answered
        self.relay = Relay(url, instance_id, metrics, redis, deliver_job=self._job_from_relay,
                           deliver_outcome=self._answer_from_relay, waiting_sessions=waiting_sessions,
                           taken_over=sessions.take_over)

    async def __aenter__(self) -> Router:
        await self.relay.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        return await self.relay.__aexit__(*exc_info)

    # ------------------------------------------------------------ jobs to nodes

    def node_is_here(self, node_id: str) -> bool:
        return node_id in self._nodes

    def to_node_here(self, node_id: str, msg: JobAssign | JobCancel | Encoded) -> bool:
        """Hand a job (or its cancel) to a node connected here; False if it is not (or is not reading)."""
        conn = self._nodes.get(node_id)
        return conn is not None and conn.send_nowait(msg)

    async def to_node(self, node_id: str, msg: JobAssign | JobCancel) -> bool:
        """Here first, else to the instance holding the node. False: unreachable (a job then
        moves on). Redis unavailable: a job is unreachable; a ``job_cancel`` raises
        :class:`RedisUnavailable`, so that the caller sends it again later (a node that kept
        a cancelled job would run more than its ``max_jobs``)."""
        if self.to_node_here(node_id, msg):
            return True
        if self.node_is_here(node_id):
            return False  # held here but not reading
        try:
            owner = await self._ownership.node_owner(node_id)
            if owner and owner != self.instance_id:
                await self.relay.send_job(owner, node_id, msg)
                return True
        except RedisUnavailable:
            if isinstance(msg, JobCancel):
                raise
        return False

    def _job_from_relay(self, node_id: str, msg: str, msg_type: str = JobAssign.TYPE, job_id: str = "") -> bool:
        """A job (or its cancel) another instance sent to a node held here, as the text it encoded."""
        return self.to_node_here(node_id, Encoded(msg_type, msg, job_id))

    # ------------------------------------------------------------ answers to sessions

    async def to_session(self, session_id: str, outcome: JobOutcome) -> None:
        """Here first, else to the instance holding the session (see the module docstring)."""
        if session_id in self._sessions:
            self._sessions.deliver(session_id, outcome)
            return
        try:
            owner = await self._ownership.session_owner(session_id)
            if not owner or owner == self.instance_id:
                self._metrics.relay_messages_total.labels("outcome_stored").inc()  # taken on resume
                return
            if await self.relay.send_outcome(owner, session_id, outcome):
                return
        except RedisUnavailable:
            pass
        self._metrics.answers_undeliverable_total.inc()

    def _answer_from_relay(self, session_id: str, outcome: JobOutcome) -> bool:
        """An answer from another instance's node: its job leaves this instance's books (if
        placed here), and the answer goes to its session."""
        self._answered(job_key_for(session_id, outcome.utterance_index, outcome.tgt_lang))
        return self._sessions.deliver(session_id, outcome)

    async def session_taken_over(self, previous_owner: str, session_id: str) -> None:
        """This instance just took the session over from ``previous_owner`` (a resume): that
        instance ends its copy at once (its journal writes would be fenced anyway)."""
        if previous_owner and previous_owner != self.instance_id:
            try:
                await self.relay.send_taken_over(previous_owner, session_id)
            except RedisUnavailable:
                pass

    async def take_stored(self, wanted: dict[str, list[tuple[int, str]]]) -> int:
        """Deliver the answers Redis kept for these sessions' (index, language) pairs."""
        return await self.relay.take_stored(wanted)
