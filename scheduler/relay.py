"""Relay: jobs and answers between instances that share one Redis.

design.md, "Several instances": a job for a node held by another instance travels over that
instance's Redis Stream (consumer group, so entries survive a crash of the reader and are
reclaimed with XAUTOCLAIM), and an answer for a session held by another instance travels
over Pub/Sub to that instance's channel, read by one subscriber connection per instance.

- ``scheduler:jobs:{instance_id}``: stream, field ``node_id`` and ``msg`` (the job_assign
  JSON); group ``relay``, consumer = the instance id; trimmed to ``STREAM_MAXLEN``.
- ``scheduler:answers:{instance_id}``: Pub/Sub channel of JobOutcome JSON for its sessions.
- ``scheduler:answers:{session_id}``: hash "index:tgt_lang" -> the same JSON, written before
  it is published and deleted once the session took it, so that a lost Pub/Sub message
  loses nothing: the owner also looks there, every ``ANSWER_POLL_S``, for each of its
  sessions with an utterance that has waited more than 2 s for its answers. A duplicate (published and polled) is harmless:
  the session's results sequencer takes one answer per index and language.

Both blocking reads run in their own threads with their own connections (never in the
adapter's pool) and hand each message to Trio with ``trio.from_thread.run_sync``; they
stop within ``POLL_S`` of the relay's exit. A job entry is acknowledged once handed to the
node's outbox, or once the node turns out not to be here (the job's owner moves it when its
lease runs out). On start the instance first re-reads what it had read but not acknowledged
before; every ``RECLAIM_EVERY_S`` it reclaims (XAUTOCLAIM) entries that any reader of its
stream left unacknowledged for ``RECLAIM_IDLE_MS``.

An answer for a session that has no owner at the moment (its instance died, its client has
not resumed yet) is stored the same way without publishing; the instance that resumes the
session takes the stored answers at once (:meth:`Relay.take_stored`). Unclaimed, they lapse
after ``ANSWER_TTL_MS``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import trio

from . import keys
from .logs import event
from .metrics import Metrics
from .protocol import JobAssign, converter, encode
from .redis_adapter import RedisAdapter, RedisUnavailable, connect
from .session import JobOutcome

log = logging.getLogger("scheduler.relay")

GROUP = "relay"
STREAM_MAXLEN = 100_000
POLL_S = 0.5
RECLAIM_IDLE_MS = 10_000  # an entry read but not acknowledged for this long belongs to a dead reader
RECLAIM_EVERY_S = 5.0
ANSWER_POLL_S = 1.0
ANSWER_TTL_MS = 600_000


class Relay:
    """Async context manager. ``deliver_job(node_id, msg_json) -> bool`` hands a job (its
    job_assign text, sent to the node as it is) to a local node; ``deliver_outcome(session_id, outcome) -> bool`` to a local session."""

    def __init__(self, url: str, instance_id: str, metrics: Metrics, adapter: RedisAdapter, *,
                 deliver_job: Callable[[str, str], bool], deliver_outcome: Callable[[str, JobOutcome], bool],
                 waiting_sessions: Callable[[], list[str]] = list) -> None:
        self._url = url
        self._redis = adapter
        self.instance_id = instance_id
        self._metrics = metrics
        self._deliver_job = deliver_job
        self._deliver_outcome = deliver_outcome
        self._waiting_sessions = waiting_sessions  # local sessions with results still owed
        self._stop = threading.Event()

    async def __aenter__(self) -> Relay:
        try:
            await self._redis.command("XGROUP", "CREATE", keys.job_stream(self.instance_id), GROUP, "0", "MKSTREAM")
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._nursery_cm = trio.open_nursery()
        nursery = self._nursery = await self._nursery_cm.__aenter__()
        subscribed = trio.Event()
        nursery.start_soon(self._thread, self._read_jobs, None)
        nursery.start_soon(self._thread, self._read_answers, subscribed)
        nursery.start_soon(self._poll_stored_answers)
        with trio.fail_after(10):
            await subscribed.wait()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        self._stop.set()  # the reader threads return within POLL_S (abandoned meanwhile)
        self._nursery.cancel_scope.cancel()  # the stored-answer poller
        return await self._nursery_cm.__aexit__(*exc_info)

    async def _thread(self, fn: Callable[..., None], arg: Any) -> None:
        token = trio.lowlevel.current_trio_token()
        await trio.to_thread.run_sync(fn, token, arg, abandon_on_cancel=True)

    # ------------------------------------------------------------ sending (any task)

    async def send_job(self, owner: str, node_id: str, assign: JobAssign) -> None:
        """XADD the job to the stream of the instance holding ``node_id``."""
        await self._redis.command("XADD", keys.job_stream(owner), "MAXLEN", "~", STREAM_MAXLEN, "*",
                                  "node_id", node_id, "msg", encode(assign))
        self._metrics.relay_messages_total.labels("job_sent").inc()

    async def send_outcome(self, owner: str, session_id: str, outcome: JobOutcome) -> int:
        """PUBLISH the answer to the instance holding the session; returns the receivers."""
        payload = _payload(session_id, outcome)
        key = keys.stored_answers(session_id)
        *_, receivers = await self._redis.commands_many([  # one round trip, stored before published
            ("HSET", key, _field(outcome), payload), ("PEXPIRE", key, ANSWER_TTL_MS),
            ("PUBLISH", keys.answer_channel(owner), payload)])
        if isinstance(receivers, BaseException):
            raise receivers
        self._metrics.relay_messages_total.labels("outcome_sent").inc()
        return int(receivers)

    # ------------------------------------------------------------ the reader threads

    def _read_jobs(self, token: trio.lowlevel.TrioToken, _: Any) -> None:
        client = connect(self._url, decode_responses=True, socket_timeout=POLL_S * 4 + 5)
        stream = keys.job_stream(self.instance_id)
        next_reclaim = 0.0
        try:
            # what this instance id read before but never acknowledged (a crash)
            self._handle_entries(client, token, client.xreadgroup(GROUP, self.instance_id, {stream: "0"}, count=1000))
            while not self._stop.is_set():
                try:
                    if time.monotonic() >= next_reclaim:  # entries a dead reader left pending
                        next_reclaim = time.monotonic() + RECLAIM_EVERY_S
                        _, claimed, _ = client.xautoclaim(stream, GROUP, self.instance_id, RECLAIM_IDLE_MS, "0-0", count=1000)
                        if claimed:
                            event(log, "relay_reclaimed", stream=stream, entries=len(claimed))
                        self._handle_entries(client, token, [[stream, claimed]])
                    reply = client.xreadgroup(GROUP, self.instance_id, {stream: ">"}, count=256, block=int(POLL_S * 1000))
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    event(log, "relay_read_failed", logging.WARNING, stream=stream, error=str(exc))
                    self._stop.wait(POLL_S)
                    continue
                except redis.exceptions.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    if self._stop.is_set():
                        break
                    # Redis came back without its data: the stream and group are gone
                    event(log, "relay_group_recreated", logging.WARNING, stream=stream)
                    with contextlib.suppress(redis.exceptions.ResponseError):
                        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                    continue
                self._handle_entries(client, token, reply)
        finally:
            client.close()

    def _handle_entries(self, client: Any, token: trio.lowlevel.TrioToken, reply: Any) -> None:
        for stream, entries in reply or []:
            done = []
            for entry_id, fields in entries:
                if not fields:  # deleted by trimming
                    done.append(entry_id)
                    continue
                try:
                    handed = trio.from_thread.run_sync(self._deliver_job, fields["node_id"], fields["msg"], trio_token=token)
                except trio.RunFinishedError:
                    return  # the daemon is gone: leave it pending for the next run
                self._metrics.relay_messages_total.labels("job_received" if handed else "job_node_gone").inc()
                done.append(entry_id)
            if done:
                client.xack(stream, GROUP, *done)

    def _read_answers(self, token: trio.lowlevel.TrioToken, subscribed: trio.Event) -> None:
        client = connect(self._url, decode_responses=True, socket_timeout=POLL_S * 4 + 5)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.answer_channel(self.instance_id))
            trio.from_thread.run_sync(subscribed.set, trio_token=token)
            while not self._stop.is_set():
                try:
                    message = pubsub.get_message(timeout=POLL_S)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    event(log, "relay_subscribe_failed", logging.WARNING, error=str(exc))
                    self._stop.wait(POLL_S)
                    continue
                if message is None:
                    continue
                data = json.loads(message["data"])
                outcome = converter.structure(data["outcome"], JobOutcome)
                try:
                    delivered = trio.from_thread.run_sync(self._deliver_outcome, data["session_id"], outcome, trio_token=token)
                except trio.RunFinishedError:
                    return
                self._metrics.relay_messages_total.labels("outcome_received" if delivered else "outcome_session_gone").inc()
                if delivered:
                    client.hdel(keys.stored_answers(data["session_id"]), _field(outcome))
        finally:
            pubsub.close()
            client.close()


    async def _poll_stored_answers(self) -> None:
        """Answers stored for local sessions that still wait (their Pub/Sub message was lost)."""
        while True:
            await trio.sleep(ANSWER_POLL_S)
            try:
                await self.take_stored(self._waiting_sessions())
            except RedisUnavailable:
                continue

    async def take_stored(self, sessions: list[str]) -> None:
        """Hand the answers stored for ``sessions`` (local ones) to them, and delete those taken."""
        stored = await self._redis.commands_many([("HGETALL", keys.stored_answers(s)) for s in sessions])
        taken = []
        for session_id, answers in zip(sessions, stored, strict=True):
            if isinstance(answers, BaseException) or not answers:
                continue
            for field, payload in answers.items():
                outcome = converter.structure(json.loads(payload)["outcome"], JobOutcome)
                if self._deliver_outcome(session_id, outcome):
                    self._metrics.relay_messages_total.labels("outcome_polled").inc()
                    taken.append(("HDEL", keys.stored_answers(session_id), field))
        if taken:
            await self._redis.commands_many(taken)

    async def store_outcome(self, session_id: str, outcome: JobOutcome) -> None:
        """Keep an answer for a session that has no owner now, for the one that resumes it."""
        key = keys.stored_answers(session_id)
        await self._redis.commands_many([("HSET", key, _field(outcome), _payload(session_id, outcome)),
                                         ("PEXPIRE", key, ANSWER_TTL_MS)])
        self._metrics.relay_messages_total.labels("outcome_stored").inc()


def _payload(session_id: str, outcome: JobOutcome) -> str:
    return json.dumps({"session_id": session_id, "outcome": converter.unstructure(outcome)})


def _field(outcome: JobOutcome) -> str:
    return f"{outcome.utterance_index}:{outcome.tgt_lang}"
