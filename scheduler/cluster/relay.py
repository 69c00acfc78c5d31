"""Relay: jobs and answers between instances that share one Redis.

docs/scaling.md, "What works": a job for a node held by another instance travels over that
instance's Redis Stream (consumer group, so entries survive a crash of the reader and are
reclaimed with XAUTOCLAIM), and an answer for a session held by another instance travels
over Pub/Sub to that instance's channel, read by one subscriber connection per instance.

- ``scheduler:jobs:{instance_id}``: stream, fields ``node_id``, ``type`` (``job_assign`` or
  ``job_cancel``; absent means ``job_assign``) and ``msg`` (its JSON); group ``relay``,
  consumer = the instance id; trimmed to ``STREAM_MAXLEN``.
- ``scheduler:answers:{instance_id}``: Pub/Sub channel of JobOutcome JSON for its sessions.
- the job hash's ``answer`` (``{scheduler}:job:<job_id>``, found by the job key's claim):
  every accepted answer, written by ``complete_task`` in the same step that accepts it
  (whichever instance holds the node) and kept, with its job and job key, until past the
  result deadline (:func:`encode_answer`). So an answer is retrievable until its result was
  sent, whatever dies meanwhile: a lost Pub/Sub message, the instance that received it, or
  the session's owner before it sent the result. The owner looks there, every
  ``ANSWER_POLL_S``, for the answers still missing of each of its sessions with an utterance
  that has waited more than 2 s; an instance that resumes a session looks there at once. A
  duplicate (published and polled) is harmless: the session's results sequencer takes one
  answer per index and language.

Both blocking reads run in their own threads with their own connections (never in the
adapter's pool) and hand each message to Trio with ``trio.from_thread.run_sync``; they
stop within ``POLL_S`` of the relay's exit. A job entry is acknowledged once handed to the
node's outbox, or once the node turns out not to be here (the job's owner moves it when its
lease runs out). On start the instance first re-reads what it had read but not acknowledged
before; every ``RECLAIM_EVERY_S`` it reclaims (XAUTOCLAIM) entries that any reader of its
stream left unacknowledged for ``RECLAIM_IDLE_MS``.

An answer for a session that has no owner at the moment (its instance died, its client has
not resumed yet) is not published at all; the instance that resumes the session takes it
from Redis (:meth:`Relay.take_stored`).

Error handling: neither reader thread ends on a Redis error (connection refused, a restart,
an unexpected reply): each is logged once per episode and the read retried after
``POLL_S``; Pub/Sub subscriptions are renewed by redis-py on reconnect.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import trio

from scheduler.jobs import JobOutcome, job_key_for
from scheduler.ops.logs import event
from scheduler.ops.metrics import Metrics
from scheduler.protocol import JobAssign, JobCancel, Translation, converter, encode
from scheduler.store import keys, scheduling
from scheduler.store.redis_adapter import RedisAdapter, RedisUnavailable, connect
from scheduler.store.resilient import every

log = logging.getLogger("scheduler.relay")

GROUP = "relay"
STREAM_MAXLEN = 100_000
POLL_S = 0.5
RECLAIM_IDLE_MS = 10_000  # an entry read but not acknowledged for this long belongs to a dead reader
RECLAIM_EVERY_S = 5.0
ANSWER_POLL_S = 1.0


class Relay:
    """Async context manager. ``deliver_job(node_id, msg_json, msg_type, job_id) -> bool`` hands a job
    or its cancel (the text, sent to the node as it is) to a local node; ``deliver_outcome(session_id, outcome) -> bool`` to a local session;
    ``waiting_sessions()`` names the local sessions worth a look in Redis, each with the
    (utterance index, target language) answers it still misses."""

    def __init__(self, url: str, instance_id: str, metrics: Metrics, adapter: RedisAdapter, *,
                 deliver_job: Callable[[str, str, str, str], bool], deliver_outcome: Callable[[str, JobOutcome], bool],
                 waiting_sessions: Callable[[], dict[str, list[tuple[int, str]]]] = dict,
                 taken_over: Callable[[str], None] = lambda _: None) -> None:
        self._url = url
        self._redis = adapter
        self.instance_id = instance_id
        self._metrics = metrics
        self._deliver_job = deliver_job
        self._deliver_outcome = deliver_outcome
        self._taken_over = taken_over  # a session held here was resumed on another instance
        self._waiting_sessions = waiting_sessions  # local sessions with results still owed
        self._stop = threading.Event()
        self._readers_done: list[threading.Event] = []  # one per reader thread, set as it returns

    async def __aenter__(self) -> Relay:
        try:
            await self._redis.command("XGROUP", "CREATE", keys.job_stream(self.instance_id), GROUP, "0", "MKSTREAM")
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        except RedisUnavailable as exc:
            # not made (Redis full, loading, unreachable: an instance restarted during a Redis
            # fault), or made on the primary but not yet on enough replicas: the reader makes
            # it once Redis answers (NOGROUP), so the instance starts anyway
            event(log, "relay_group_deferred", logging.WARNING, reply=exc.reply)
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
        """Stop the readers and wait until their threads have returned (within ``POLL_S``,
        their read timeout), so that nothing reads Redis after this: a daemon that stops its
        embedded Valkey next logs no relay error on a clean shutdown."""
        self._stop.set()
        with trio.CancelScope(shield=True), trio.move_on_after(POLL_S * 4 + 6):
            await trio.to_thread.run_sync(lambda: all(done.wait() for done in self._readers_done), abandon_on_cancel=True)
        self._nursery.cancel_scope.cancel()  # the stored-answer poller
        return await self._nursery_cm.__aexit__(*exc_info)

    async def _thread(self, fn: Callable[..., None], arg: Any) -> None:
        token = trio.lowlevel.current_trio_token()
        done = threading.Event()
        self._readers_done.append(done)

        def run() -> None:
            try:
                fn(token, arg)
            finally:
                done.set()

        await trio.to_thread.run_sync(run, abandon_on_cancel=True)

    # ------------------------------------------------------------ sending (any task)

    async def send_job(self, owner: str, node_id: str, msg: JobAssign | JobCancel) -> None:
        """XADD the job (or its cancel) to the stream of the instance holding ``node_id``."""
        await self._redis.command("XADD", keys.job_stream(owner), "MAXLEN", "~", STREAM_MAXLEN, "*",
                                  "node_id", node_id, "type", msg.TYPE, "job_id", msg.job_id,
                                  "msg", encode(msg))
        self._metrics.relay_messages_total.labels("job_sent" if isinstance(msg, JobAssign) else "cancel_sent").inc()

    async def send_outcome(self, owner: str, session_id: str, outcome: JobOutcome) -> int:
        """PUBLISH the answer to the instance holding the session; returns the receivers.
        (The answer itself is already in Redis: complete_task kept it.)"""
        receivers = await self._redis.command("PUBLISH", keys.answer_channel(owner), _payload(session_id, outcome))
        self._metrics.relay_messages_total.labels("outcome_sent").inc()
        return int(receivers)

    async def send_taken_over(self, owner: str, session_id: str) -> None:
        """Tell the instance that held the session until now that it was resumed elsewhere
        (on its answer channel: it ends its copy of the session at once)."""
        await self._redis.command("PUBLISH", keys.answer_channel(owner), json.dumps({"session_id": session_id,
                                                                                    "taken_over": True}))
        self._metrics.relay_messages_total.labels("takeover_sent").inc()

    # ------------------------------------------------------------ the reader threads

    def _read_jobs(self, token: trio.lowlevel.TrioToken, _: Any) -> None:
        client = connect(self._url, decode_responses=True, socket_timeout=POLL_S * 4 + 5)
        stream = keys.job_stream(self.instance_id)
        next_reclaim = 0.0
        backlog = True  # first: what this instance id read before but never acknowledged (a crash)
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    if backlog:
                        self._handle_entries(client, token, client.xreadgroup(GROUP, self.instance_id, {stream: "0"}, count=1000))
                        backlog = False
                    if time.monotonic() >= next_reclaim:  # entries a dead reader left pending
                        next_reclaim = time.monotonic() + RECLAIM_EVERY_S
                        _, claimed, _ = client.xautoclaim(stream, GROUP, self.instance_id, RECLAIM_IDLE_MS, "0-0", count=1000)
                        if claimed:
                            event(log, "relay_reclaimed", stream=stream, entries=len(claimed))
                        self._handle_entries(client, token, [[stream, claimed]])
                    reply = client.xreadgroup(GROUP, self.instance_id, {stream: ">"}, count=256, block=int(POLL_S * 1000))
                    self._handle_entries(client, token, reply)
                    failing = False
                except trio.RunFinishedError:
                    return  # the daemon is gone: what was not acknowledged stays pending for the next run
                except redis.exceptions.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        failing = self._read_failed("relay_read_failed", failing, exc, stream=stream)
                        continue
                    if self._stop.is_set():
                        break
                    # Redis came back without its data (the stream and group are gone), or the
                    # group could not be made at start (Redis full): made now, or tried again
                    # after a pause, logged once per episode
                    try:
                        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                        event(log, "relay_group_recreated", logging.WARNING, stream=stream)
                        failing = False
                    except redis.exceptions.RedisError as create_exc:
                        if "BUSYGROUP" not in str(create_exc):
                            failing = self._read_failed("relay_group_failed", failing, create_exc, stream=stream)
                except Exception as exc:  # connection refused, a restart, a timeout: retry, never end the daemon
                    failing = self._read_failed("relay_read_failed", failing, exc, stream=stream)
        finally:
            client.close()

    def _read_failed(self, name: str, failing: bool, exc: Exception, **fields: Any) -> bool:
        """Log a reader's failure once per episode (not while stopping), then wait ``POLL_S`` (or the stop)."""
        if not failing and not self._stop.is_set():
            level = logging.WARNING if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError) \
                else logging.ERROR
            event(log, name, level, error=f"{type(exc).__name__}: {exc}", **fields)
        self._stop.wait(POLL_S)
        return True

    def _handle_entries(self, client: Any, token: trio.lowlevel.TrioToken, reply: Any) -> None:
        """Hand each entry to its node; acknowledge those handled (raises on a Redis error:
        the unacknowledged ones are read again as this reader's pending entries)."""
        for stream, entries in reply or []:
            done = []
            for entry_id, fields in entries:
                if not fields:  # deleted by trimming
                    done.append(entry_id)
                    continue
                msg_type = fields.get("type", JobAssign.TYPE)
                handed = trio.from_thread.run_sync(self._deliver_job, fields["node_id"], fields["msg"], msg_type,
                                                   fields.get("job_id", ""), trio_token=token)
                kind = "job" if msg_type == JobAssign.TYPE else "cancel"
                self._metrics.relay_messages_total.labels(f"{kind}_received" if handed else f"{kind}_node_gone").inc()
                done.append(entry_id)
            if done:
                client.xack(stream, GROUP, *done)

    def _read_answers(self, token: trio.lowlevel.TrioToken, subscribed: trio.Event) -> None:
        client = connect(self._url, decode_responses=True, socket_timeout=POLL_S * 4 + 5)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        failing = False
        try:
            pubsub.subscribe(keys.answer_channel(self.instance_id))
            trio.from_thread.run_sync(subscribed.set, trio_token=token)
            while not self._stop.is_set():
                try:
                    message = pubsub.get_message(timeout=POLL_S)
                    failing = False
                    if message is None:
                        continue
                    data = json.loads(message["data"])
                    if data.get("taken_over"):
                        trio.from_thread.run_sync(self._taken_over, data["session_id"], trio_token=token)
                        continue
                    outcome = converter.structure(data["outcome"], JobOutcome)
                    delivered = trio.from_thread.run_sync(self._deliver_outcome, data["session_id"], outcome, trio_token=token)
                    self._metrics.relay_messages_total.labels("outcome_received" if delivered else "outcome_session_gone").inc()
                except trio.RunFinishedError:
                    return
                except Exception as exc:  # connection lost, a restart, a malformed message: retry
                    failing = self._read_failed("relay_subscribe_failed", failing, exc)
        finally:
            pubsub.close()
            client.close()

    async def _poll_stored_answers(self) -> None:
        """Answers kept in Redis for local sessions that still wait (their Pub/Sub message was lost)."""
        await every(ANSWER_POLL_S, lambda: self.take_stored(self._waiting_sessions()), name="answer_poll", log=log)

    async def take_stored(self, wanted: dict[str, list[tuple[int, str]]]) -> int:
        """Hand the answers Redis keeps for ``wanted`` (local session -> missing (index,
        target language)) to their sessions; returns how many were handed over."""
        wanted = {session_id: missing for session_id, missing in wanted.items() if missing}
        if not wanted:
            return 0
        stored = await scheduling.stored_answers(  # (layout 1: one MGET per session)
            self._redis, [(session_id, [job_key_for(session_id, index, tgt) for index, tgt in missing])
                          for session_id, missing in wanted.items()])
        handed = 0
        for (session_id, missing), texts in zip(wanted.items(), stored, strict=True):
            if isinstance(texts, RedisUnavailable):
                raise texts
            if isinstance(texts, BaseException):
                continue
            for (index, tgt), text in zip(missing, texts, strict=True):
                if text and self._deliver_outcome(session_id, decode_answer(index, tgt, text)):
                    self._metrics.relay_messages_total.labels("outcome_polled").inc()
                    handed += 1
        return handed


def encode_answer(translation: Translation, source_text: str | None) -> str:
    """An accepted answer as complete_task keeps it (the job hash's ``answer``)."""
    return json.dumps({"translation": converter.unstructure(translation), "source_text": source_text})


def decode_answer(utterance_index: int, tgt_lang: str, text: str) -> JobOutcome:
    data = json.loads(text)
    return JobOutcome(utterance_index, tgt_lang, converter.structure(data["translation"], Translation), data.get("source_text"))


def _payload(session_id: str, outcome: JobOutcome) -> str:
    return json.dumps({"session_id": session_id, "outcome": converter.unstructure(outcome)})
