"""Chaos run: an operator's bad day, bounded in time, with every result checked.

Several ``scheduler serve`` processes (`--instances`) share one Valkey (a child of this
harness, so it can be killed); `--nodes` simulated worker nodes and `--clients` clients are
Trio tasks in this process, over real loopback sockets. Every ~`--fault-every` seconds one
fault from `--faults` strikes:

- ``node``: a node's socket is cut; it reconnects to a random instance;
- ``kill``: an instance is killed with SIGKILL, and started again (same id and ports);
- ``term``: an instance gets SIGTERM (it must drain and exit 0), and is started again;
- ``redis``: Valkey is stopped and started again empty;
- ``stall``: Valkey is frozen (SIGSTOP) for 30-60 % of the result deadline, then resumed
  (SIGCONT): every call sent meanwhile times out and runs when it resumes (ambiguous outcomes);
- ``full``: Valkey's ``maxmemory`` is set below its use for 40-70 % of the result deadline
  (``noeviction``: every write is refused ``OOM``), then lifted.

Redis episodes (``redis``, ``stall``, ``full``) take turns: each starts once the one before
has ended and Redis has served for :data:`REDIS_GAP_S` (one drawn while another runs waits;
one that cannot start before the end is dropped). Back to back they would make one outage
longer than any result deadline can hold: a translation waits at most twice its result
deadline however long Redis stays out (docs/redis.md), so an outage longer than about one
deadline ends the translations finalized just before it ``SKIPPED``, by design.

With ``--workers N`` the instances are the workers of one ``scheduler serve --workers N``
(one port, SO_REUSEPORT): ``kill`` and ``term`` strike a worker, and its supervisor must start
it again by itself; every ``worker_exited`` in the supervisor's log must be one the harness
caused (exit code -9 after ``kill``, 0 after ``term``), and the supervisor must not exit.
``reload`` (``--workers`` only) sends the supervisor SIGHUP (``systemctl reload``): it
replaces its workers one at a time, each new one ready before the old one drains. A reload
exits no worker by ``worker_exited``, and each ends ``reload_done`` (or ``reload_ignored``
while the previous one is still under way), never ``worker_replace_failed``.

Clients stream utterances (tones of 200-700 ms in 100 ms binary frames, then ``finalize``)
and resume on another instance (``session_id`` + ``resume_from``) whenever their connection
breaks, re-sending the one utterance the daemon may not have finalized. Nodes answer like the
reference node's fake engine: ``[en] <ms>ms crc32=<crc of the job's audio>``, so each result's
text proves which audio it was made from.

Checked, and the run fails (exit 1) on any of them: a result index out of order, repeated or
skipped; a SUCCESS whose text is not the answer for that utterance's audio; a finalized
utterance with no result at the end; a session that could not be resumed; an instance that
exited without being told to, or exited non-zero after SIGTERM; a SUCCESS share below
`--min-success`. Printed: utterances, the SUCCESS share, every non-SUCCESS result with its
status, error and the last fault before it, and the faults applied; JSON in `--out`.

``--redis-cluster 3`` runs it all on a 3-master Valkey cluster instead of one Valkey, and
``--redis-url`` on a Redis (or cluster) already running, flushed first (node, kill, term and
reload faults only, either way).

Usage: python bench/chaos.py [--duration 120] [--fault-every 5] [--faults node,kill,term,redis]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from scheduler.ops.embedded_redis import EmbeddedValkey, EmbeddedValkeyCluster
from scheduler.session.audio import tone
from scheduler.store.redis_adapter import connect

RATE = 16000
FRAME = 3200  # 100 ms of 16 kHz s16le
FAULTS = ("node", "kill", "term", "redis", "stall", "full", "reload")
CONNECTION_ENDED = (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=3, help="scheduler serve processes on one Valkey (default 3)")
    p.add_argument("--workers", type=int, default=0,
                   help="instead: one 'scheduler serve --workers N' (N workers behind one port); 0: off (default)")
    p.add_argument("--nodes", type=int, default=6, help="simulated worker nodes, 4 slots each (default 6)")
    p.add_argument("--clients", type=int, default=12, help="clients streaming and resuming (default 12)")
    p.add_argument("--duration", type=float, default=120, help="seconds of streaming with faults (default 120)")
    p.add_argument("--fault-every", type=float, default=5, help="mean seconds between faults (default 5)")
    p.add_argument("--faults", default="node,kill,term", help=f"comma list of {', '.join(FAULTS)} (default node,kill,term)")
    p.add_argument("--result-deadline-ms", type=int, default=10000, help="the daemons' result deadline (default 10000)")
    p.add_argument("--min-success", type=float, default=0.995, help="fail below this SUCCESS share (default 0.995)")
    p.add_argument("--redis-cluster", type=int, default=0, metavar="MASTERS",
                   help="run on a Valkey cluster of this many masters instead of one Valkey (no Redis faults then)")
    p.add_argument("--redis-url", default=None,
                   help="run on this Redis (or cluster) instead of starting one; it is flushed first (no Redis faults then)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    p.add_argument("--out", default="bench/results/chaos.json", help="JSON summary (default bench/results/chaos.json)")
    p.add_argument("--daemon-arg", action="append", default=[], help="extra flag for every daemon (repeatable)")
    p.add_argument("--logs", default=None, help="keep the daemons' logs in this folder (default: a temporary one, removed)")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer_text(pcm: bytes) -> str:
    """What the reference node's fake engine answers for ``pcm`` (zh -> en)."""
    return f"[en] {len(pcm) * 1000 // (2 * RATE)}ms crc32={zlib.crc32(pcm):08x}"


@attrs.define
class Report:
    t0: float = attrs.Factory(trio.current_time)
    faults: list[dict] = attrs.Factory(list)
    violations: list[str] = attrs.Factory(list)
    non_success: list[dict] = attrs.Factory(list)
    utterances: int = 0
    success: int = 0
    resumes: int = 0

    def now(self) -> float:
        return round(trio.current_time() - self.t0, 2)

    def fault(self, kind: str, target: str) -> None:
        self.faults.append({"t": self.now(), "kind": kind, "target": target})
        print(f"[{self.now():7.2f}] fault {kind} {target}", flush=True)

    def violation(self, text: str) -> None:
        self.violations.append(f"[{self.now():.2f}] {text}")
        print(f"[{self.now():7.2f}] VIOLATION {text}", flush=True)

    def fault_in_flight(self, finalized_t: float, deadline_s: float) -> str:
        """The first fault that struck while an utterance was in flight (from a second before
        the client saw it finalized to its result deadline): the likely cause of its loss."""
        hits = [f for f in self.faults if finalized_t - 1.0 <= f["t"] <= finalized_t + deadline_s]
        return f"{hits[0]['kind']} {hits[0]['target']} at {hits[0]['t']}s" if hits else "none"


# ---------------------------------------------------------------- daemons


class Instance:
    """One ``scheduler serve`` process with a fixed id and fixed ports (so it can come back)."""

    def __init__(self, name: str, redis_url: str, workdir: Path, args: argparse.Namespace) -> None:
        self.name = name
        self.ws_port, self.admin_port = free_port(), free_port()
        self.url = f"ws://127.0.0.1:{self.ws_port}"
        self.cmd = [sys.executable, "-m", "scheduler", "serve", "--redis-url", redis_url, "--instance-id", name,
                    "--ws-port", str(self.ws_port), "--admin-port", str(self.admin_port),
                    "--result-deadline-ms", str(args.result_deadline_ms), "--drain-timeout-ms", "5000",
                    "--log-level", "info", *args.daemon_arg]
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.expected_exit = False  # set before the harness kills or stops it

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.expected_exit = False

    async def wait_listening(self, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.ws_port)
                    await stream.aclose()
                    return
                except OSError:
                    await trio.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Box:
    """One ``scheduler serve --workers N``: its workers are the instances; the supervisor
    restarts a worker the harness strikes."""

    def __init__(self, redis_url: str, workdir: Path, args: argparse.Namespace) -> None:
        self.inst = Instance("box", redis_url, workdir, args)
        self.inst.cmd += ["--workers", str(args.workers)]
        self.caused: list[tuple[int, int]] = []  # (worker, expected exit code) of every strike
        self.reloads = 0  # SIGHUPs sent

    async def workers(self) -> list[dict]:
        def get() -> list[dict]:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.inst.admin_port}/status", timeout=5) as resp:
                return json.loads(resp.read())["workers"]
        return await trio.to_thread.run_sync(get)

    async def wait_ready(self, timeout: float = 60) -> None:
        with trio.fail_after(timeout):
            while True:
                with contextlib.suppress(OSError, ValueError):
                    if all(w["ready"] for w in await self.workers()):
                        return
                await trio.sleep(0.2)

    async def strike(self, kind: str, report: Report, rng: random.Random) -> None:
        if kind == "reload":
            report.fault("reload", "box")
            self.reloads += 1
            assert self.inst.proc is not None
            self.inst.proc.send_signal(signal.SIGHUP)
            return
        ready = [w for w in await self.workers() if w["ready"] and w["pid"]]
        if len(ready) < 2:
            return  # keep at least one worker serving
        w = rng.choice(ready)
        report.fault(kind, f"w{w['worker']}")
        self.caused.append((w["worker"], -9 if kind == "kill" else 0))
        os.kill(w["pid"], signal.SIGKILL if kind == "kill" else signal.SIGTERM)

    def events(self, name: str) -> list[dict]:
        """The supervisor's log events called ``name``."""
        found = []
        for line in self.inst.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") == name and ev.get("logger") == "scheduler.supervisor":
                    found.append(ev)
        return found

    def exits(self) -> list[tuple[int, int]]:
        return [(ev["worker"], ev["exit_code"]) for ev in self.events("worker_exited")]

    def reloads_ended(self) -> int:
        return len(self.events("reload_done")) + len(self.events("reload_ignored"))

    async def check(self, report: Report, drain_s: float = 5.0) -> None:
        """Every worker exit is one the harness caused, with the exit code it should have. A
        worker struck just before the end may still be draining: wait for it (drain + 5 s)."""
        with trio.move_on_after(drain_s + 5 + 30 * bool(self.reloads)):
            while len(self.exits()) < len(self.caused) or self.reloads_ended() < self.reloads:
                await trio.sleep(0.2)
        exits = self.exits()
        if sorted(exits) != sorted(self.caused):
            report.violation(f"worker exits {sorted(exits)} != caused {sorted(self.caused)}")
        if self.reloads_ended() != self.reloads or self.events("worker_replace_failed"):
            report.violation(f"{self.reloads} reloads sent, {len(self.events('reload_done'))} done, "
                             f"{len(self.events('reload_ignored'))} ignored, "
                             f"{len(self.events('worker_replace_failed'))} replacements failed")


# ---------------------------------------------------------------- nodes


class Node:
    """A simulated worker node: registers on a random instance, heartbeats, answers each job
    after 100-400 ms like the fake engine, reconnects (to a random instance) when cut."""

    def __init__(self, node_id: str, urls: list[str], rng: random.Random) -> None:
        self.node_id = node_id
        self.urls = urls
        self.rng = rng
        self.scope: trio.CancelScope | None = None
        self.jobs = 0

    def cut(self) -> bool:
        if self.scope is None:
            return False
        self.scope.cancel()
        return True

    async def run(self) -> None:
        while True:
            url = self.rng.choice(self.urls)
            with trio.CancelScope() as self.scope:
                try:
                    async with open_websocket_url(url + "/v1/node", connect_timeout=3, disconnect_timeout=0.5) as ws:
                        await self._serve(ws)
                except* CONNECTION_ENDED:
                    pass
            self.scope = None
            await trio.sleep(0.2 + self.rng.random() * 0.8)

    async def _serve(self, ws: Any) -> None:
        await ws.send_message(json.dumps({"type": "register", "node_id": self.node_id, "lang_pairs": [["zh", "en"]],
                                          "max_jobs": 4}))
        reply = json.loads(await ws.get_message())
        if reply.get("type") != "registered":
            return
        lock = trio.Lock()
        running: dict[tuple[str, int], trio.CancelScope] = {}

        async def send(msg: dict) -> None:
            async with lock:
                await ws.send_message(json.dumps(msg))

        async def heartbeats() -> None:
            while True:
                await trio.sleep(reply["heartbeat_interval_ms"] / 2000)
                await send({"type": "heartbeat", "load": {"jobs": len(running)}})

        async def job(msg: dict) -> None:
            with trio.CancelScope() as scope:
                running[(msg["job_id"], msg["attempt"])] = scope
                await trio.sleep(0.1 + self.rng.random() * 0.3)
                pcm = base64.b64decode(msg["audio"])
                text = answer_text(pcm)
                await send({"type": "job_result", "job_id": msg["job_id"], "attempt": msg["attempt"], "status": "ok",
                            "source_text": text.replace("[en]", "[zh]"), "text": text})
                self.jobs += 1
            running.pop((msg["job_id"], msg["attempt"]), None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats)
            while True:
                msg = json.loads(await ws.get_message())
                if msg["type"] == "job_assign":
                    nursery.start_soon(job, msg)
                elif msg["type"] == "job_cancel" and (msg["job_id"], msg["attempt"]) in running:
                    running[(msg["job_id"], msg["attempt"])].cancel()


# ---------------------------------------------------------------- clients


class Client:
    """Streams utterances, one at a time, resuming on a random instance when cut off.

    ``payloads[k]`` is the k-th utterance's audio; ``index_of`` maps each finalized index to
    its payload. Only the last payload sent can be unconfirmed (finalized or not) when the
    connection breaks; the resume's ``next_utterance_index`` settles it."""

    def __init__(self, name: str, urls: list[str], rng: random.Random, report: Report, deadline_s: float) -> None:
        self.name = name
        self.deadline_s = deadline_s
        self.urls = urls
        self.rng = rng
        self.report = report
        self.session_id: str | None = None
        self.resume_token: str | None = None  # from session_ready, presented on every resume
        self.payloads: list[bytes] = []
        self.audio_of: dict[int, bytes] = {}  # utterance index -> the audio the daemon finalized
        self.finalized_at: dict[int, float] = {}
        self.results: dict[int, dict] = {}
        self.next_result = 0
        self.confirmed = 0  # payloads known finalized (they are a prefix of payloads)
        self.closed = False
        self.lost = False

    def new_payload(self) -> bytes:
        k = len(self.payloads)
        pcm = tone(200 + 100 * self.rng.randrange(6), RATE, freq=200 + 37 * (k % 50) + self.rng.randrange(30))
        self.payloads.append(pcm)
        return pcm

    async def run(self, stop_at: float, close_by: float) -> None:
        with trio.move_on_at(close_by):
            await self._run(stop_at)
        if not self.closed and not self.lost:
            self.report.violation(f"{self.name}: could not finish its session in time ({self.next_result} results)")

    async def _run(self, stop_at: float) -> None:
        backoff = 0.1
        while not self.closed and not self.lost:
            url = self.rng.choice(self.urls)
            try:
                async with open_websocket_url(url + "/v1/session", connect_timeout=3, disconnect_timeout=0.5) as ws:
                    backoff = 0.1
                    await self._connection(ws, stop_at)
            except* CONNECTION_ENDED:
                pass
            if not self.closed and not self.lost:
                await trio.sleep(backoff * (0.5 + self.rng.random()))
                backoff = min(backoff * 2, 1.0)

    async def _connection(self, ws: Any, stop_at: float) -> None:
        init: dict[str, Any] = {"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"]}
        if self.session_id is not None:
            init |= {"session_id": self.session_id, "resume_token": self.resume_token, "resume_from": self.next_result}
        await ws.send_message(json.dumps(init))
        ready = json.loads(await ws.get_message())
        if ready["type"] == "error":
            if ready["code"] == "UNKNOWN_SESSION":
                self.report.violation(f"{self.name}: session {self.session_id} could not be resumed: {ready['message']}")
                self.lost = True
            return  # SHUTTING_DOWN, INTERNAL (Redis away): try another instance
        if self.session_id is not None:
            self.report.resumes += 1
        self.session_id = ready["session_id"]
        self.resume_token = ready.get("resume_token") or self.resume_token
        self._settle(ready["next_utterance_index"])
        async with trio.open_nursery() as nursery:
            confirmed = trio.Event()
            nursery.start_soon(self._send, ws, stop_at, lambda: confirmed)

            def on_finalized() -> None:
                nonlocal confirmed
                confirmed.set()
                confirmed = trio.Event()

            try:
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg["type"] == "utterance_finalized":
                        self._finalized(msg)
                        on_finalized()
                    elif msg["type"] == "result":
                        self._result(msg)
                    elif msg["type"] == "session_closed" and msg["reason"] == "shutdown":
                        break  # the instance is draining: resume the session elsewhere
                    elif msg["type"] == "session_closed":
                        if self.next_result != self.confirmed:
                            self.report.violation(f"{self.name}: closed with results {self.next_result}/{self.confirmed}")
                        self.closed = True
                        break
            finally:
                nursery.cancel_scope.cancel()

    def _settle(self, next_index: int) -> None:
        """After (re)connecting: the daemon has finalized ``next_index`` utterances."""
        if next_index == self.confirmed + 1 and len(self.payloads) > self.confirmed:
            self._map(self.confirmed, trio.current_time())  # the last payload sent was finalized
        elif next_index != self.confirmed:
            self.report.violation(f"{self.name}: resume says next index {next_index}, {self.confirmed} were finalized")
            self.confirmed = next_index

    def _map(self, index: int, t: float, audio_ms: int | None = None) -> None:
        """Utterance ``index`` is the next payload, whole, or (``audio_ms``: a drain cut it,
        reason ``close``) the frames of it that the daemon had received."""
        pcm = self.payloads[self.confirmed]
        self.audio_of[index] = pcm if audio_ms is None else pcm[:audio_ms * 2 * RATE // 1000]
        self.finalized_at[index] = t
        self.confirmed += 1

    def _finalized(self, msg: dict) -> None:
        index = msg["utterance_index"]
        if index != self.confirmed or len(self.payloads) <= self.confirmed:
            self.report.violation(f"{self.name}: utterance_finalized {index}, expected {self.confirmed}")
            return
        whole = len(self.payloads[self.confirmed]) * 1000 // (2 * RATE)
        if msg["audio_ms"] != whole and (msg["reason"] != "close" or msg["audio_ms"] % 100 or msg["audio_ms"] > whole):
            self.report.violation(f"{self.name}: utterance {index} ({msg['reason']}) has {msg['audio_ms']} ms of a {whole} ms payload")
        self._map(index, trio.current_time(), msg["audio_ms"])

    def _result(self, msg: dict) -> None:
        index = msg["utterance_index"]
        if index != self.next_result:
            self.report.violation(f"{self.name}: result {index} arrived, expected {self.next_result}")
            return
        self.next_result += 1
        self.results[index] = msg
        self.report.utterances += 1
        if msg["status"] == "SUCCESS":
            pcm = self.audio_of.get(index)
            got = msg["translations"]["en"]["text"]
            if pcm is None or got != answer_text(pcm):
                self.report.violation(f"{self.name}: result {index} has text {got!r}, expected {pcm and answer_text(pcm)!r}")
            self.report.success += 1
        else:
            t = self.finalized_at.get(index, trio.current_time()) - self.report.t0
            tr = msg["translations"]["en"]
            self.report.non_success.append({
                "client": self.name, "session_id": self.session_id, "utterance_index": index, "status": msg["status"],
                "error": tr.get("error"), "finalized_t": round(t, 2),
                "fault": self.report.fault_in_flight(t, self.deadline_s)})

    async def _send(self, ws: Any, stop_at: float, confirmed: Any) -> None:
        while True:
            if len(self.payloads) > self.confirmed:
                pcm = self.payloads[self.confirmed]  # not finalized on the connection that broke: again
            elif trio.current_time() < stop_at:
                pcm = self.new_payload()
            else:
                await ws.send_message(json.dumps({"type": "close_session"}))
                return
            waiting = confirmed()
            for start in range(0, len(pcm), FRAME):
                await ws.send_message(pcm[start:start + FRAME])
                await trio.sleep(0.05)  # twice real time
            await ws.send_message(json.dumps({"type": "finalize"}))
            await waiting.wait()  # a broken connection cancels this; never send the same audio twice on one
            await trio.sleep(self.rng.random() * 0.3)


# ---------------------------------------------------------------- faults


async def watch_instances(instances: list[Instance], report: Report) -> None:
    """An instance that exits without being told to is a failure; it is started again."""
    while True:
        await trio.sleep(0.2)
        for inst in instances:
            if inst.proc is not None and not inst.expected_exit and inst.proc.poll() is not None:
                report.violation(f"instance {inst.name} exited by itself with code {inst.proc.returncode}:\n{inst.log_tail()}")
                inst.start()


REDIS_GAP_S = 2.0
"""Seconds of a serving Redis between two Redis episodes."""


class RedisTurns:
    """Redis episodes one at a time, each after :data:`REDIS_GAP_S` of a serving Redis (the
    module docstring says why); none starts at or after ``stop_at``."""

    def __init__(self, stop_at: float) -> None:
        self.stop_at = stop_at
        self._lock = trio.Lock()  # (fair: episodes start in the order they were drawn)

    async def take(self, report: Report, kind: str, target: str, episode: Callable[[], Awaitable[None]]) -> None:
        async with self._lock:
            if trio.current_time() >= self.stop_at:
                return
            report.fault(kind, target)
            await episode()
            await trio.sleep(REDIS_GAP_S)


async def strike(kind: str, instances: list[Instance], nodes: list[Node], valkey: EmbeddedValkey, report: Report,
                 rng: random.Random, nursery: trio.Nursery, box: Box | None = None, deadline_s: float = 10.0,
                 turns: RedisTurns | None = None) -> None:
    if kind == "node":
        connected = [n for n in nodes if n.scope is not None]
        if connected:
            node = rng.choice(connected)
            report.fault("node", node.node_id)
            node.cut()
        return
    turns = turns or RedisTurns(math.inf)
    if kind == "redis":  # (in the faults' nursery: an episode under way finishes even past the end)
        nursery.start_soon(turns.take, report, "redis", "restart-empty", partial(_restart_redis, valkey, rng))
        return
    if kind in ("stall", "full"):
        seconds = deadline_s * (rng.uniform(0.3, 0.6) if kind == "stall" else rng.uniform(0.4, 0.7))
        episode = partial(_stall_redis if kind == "stall" else _fill_redis, valkey, seconds)
        nursery.start_soon(turns.take, report, kind, f"{seconds:.1f}s", episode)
        return
    if box is not None:
        await box.strike(kind, report, rng)  # its supervisor starts the worker again
        return
    up = [i for i in instances if i.running and not i.expected_exit]
    if len(up) < 2:
        return  # keep at least one instance serving
    inst = rng.choice(up)
    inst.expected_exit = True
    report.fault(kind, inst.name)
    nursery.start_soon(_cycle, kind, inst, report, rng)


async def _restart_redis(valkey: EmbeddedValkey, rng: random.Random) -> None:
    valkey.stop()
    await trio.sleep(0.5 + rng.random() * 1.5)
    valkey.start()


async def _stall_redis(valkey: EmbeddedValkey, seconds: float) -> None:
    """SIGSTOP for ``seconds``: a fork on a big heap, a slow script, a network blackhole."""
    if valkey.pid is None:
        return
    os.kill(valkey.pid, signal.SIGSTOP)
    try:
        await trio.sleep(seconds)
    finally:
        os.kill(valkey.pid, signal.SIGCONT)


async def _fill_redis(valkey: EmbeddedValkey, seconds: float) -> None:
    """``maxmemory`` below use for ``seconds`` (noeviction: writes refused OOM), then lifted."""
    import redis

    client = redis.Redis.from_url(valkey.url, socket_timeout=30)  # (a stall may be under way: wait it out)
    try:
        await trio.to_thread.run_sync(client.config_set, "maxmemory", 1)
        await trio.sleep(seconds)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(client.config_set, "maxmemory", 0)
        client.close()


async def _cycle(kind: str, inst: Instance, report: Report, rng: random.Random) -> None:
    assert inst.proc is not None
    if kind == "kill":
        inst.proc.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(inst.proc.wait)
        await trio.sleep(0.5 + rng.random())
    else:
        inst.proc.send_signal(signal.SIGTERM)
        try:
            code = await trio.to_thread.run_sync(lambda: inst.proc.wait(timeout=20))
        except subprocess.TimeoutExpired:
            inst.proc.kill()
            code = "timeout"
        if code != 0:
            report.violation(f"instance {inst.name} exited {code} after SIGTERM:\n{inst.log_tail()}")
    inst.start()
    await inst.wait_listening()


async def faults(args: argparse.Namespace, kinds: list[str], instances: list[Instance], nodes: list[Node],
                 valkey: EmbeddedValkey, report: Report, rng: random.Random, stop_at: float, box: Box | None) -> None:
    turns = RedisTurns(stop_at)
    async with trio.open_nursery() as nursery:
        with trio.move_on_at(stop_at):
            while kinds:
                await trio.sleep(args.fault_every * (0.7 + 0.6 * rng.random()))
                await strike(rng.choice(kinds), instances, nodes, valkey, report, rng, nursery, box,
                             deadline_s=args.result_deadline_ms / 1000, turns=turns)


# ---------------------------------------------------------------- the run


class _GivenRedis:
    """A Redis the run did not start (``--redis-url``): flushed at the start, left running."""

    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> str:
        client = connect(self.url)
        client.flushall()  # (on every primary of a cluster)
        client.close()
        return self.url

    def stop(self) -> None:
        pass


async def run(args: argparse.Namespace) -> dict:
    kinds = [k for k in args.faults.split(",") if k]
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if "reload" in kinds and not args.workers:
        raise SystemExit("the reload fault needs --workers (SIGHUP replaces a supervisor's workers)")
    if (args.redis_cluster or args.redis_url) and {"redis", "stall", "full"} & set(kinds):
        raise SystemExit("the redis, stall and full faults strike the Valkey this run starts: not with --redis-cluster "
                         "or --redis-url")
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="sched-chaos-") as tmp:
        workdir = Path(args.logs or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        valkey = _GivenRedis(args.redis_url) if args.redis_url else EmbeddedValkeyCluster(
            args.redis_cluster) if args.redis_cluster else EmbeddedValkey(workdir / "valkey", persist=False)
        url = valkey.start()
        box = Box(url, workdir, args) if args.workers else None
        instances = [box.inst] if box else [Instance(f"i{k}", url, workdir, args) for k in range(args.instances)]
        try:
            for inst in instances:
                inst.start()
            for inst in instances:
                await inst.wait_listening()
            if box is not None:
                await box.wait_ready()
            urls = [i.url for i in instances]
            nodes = [Node(f"n{k}", urls, random.Random(rng.random())) for k in range(args.nodes)]
            clients = [Client(f"c{k}", urls, random.Random(rng.random()), report, args.result_deadline_ms / 1000)
                       for k in range(args.clients)]
            start = trio.current_time()
            stop_at = start + args.duration
            close_by = stop_at + args.result_deadline_ms / 1000 + 40
            async with trio.open_nursery() as outer:
                for node in nodes:
                    outer.start_soon(node.run)
                outer.start_soon(watch_instances, instances, report)
                await trio.sleep(1.0)  # nodes registered
                async with trio.open_nursery() as inner:
                    inner.start_soon(faults, args, kinds, instances, nodes, valkey, report, rng, stop_at, box)
                    for c in clients:
                        inner.start_soon(c.run, stop_at, close_by)
                outer.cancel_scope.cancel()
            for c in clients:
                if c.next_result != c.confirmed:
                    report.violation(f"{c.name}: {c.confirmed} utterances finalized, {c.next_result} results")
            if box is not None:
                await box.check(report)
        finally:
            for inst in instances:
                inst.expected_exit = True
                if inst.running:
                    inst.proc.send_signal(signal.SIGTERM)
            for inst in instances:
                if inst.proc is not None:
                    try:
                        inst.proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        inst.proc.kill()
            valkey.stop()
    share = report.success / report.utterances if report.utterances else 0.0
    summary = {
        "seed": seed, "duration_s": args.duration, "instances": args.workers or args.instances,
        "redis_cluster_masters": args.redis_cluster, "redis_url_given": bool(args.redis_url),
        "workers": bool(args.workers), "nodes": args.nodes, "clients": args.clients,
        "faults_enabled": kinds, "faults": report.faults, "utterances": report.utterances, "success": report.success,
        "success_share": round(share, 5), "resumes": report.resumes, "non_success": report.non_success,
        "violations": report.violations,
        "ok": not report.violations and share >= args.min_success,
    }
    return summary


def print_summary(s: dict, min_success: float) -> None:
    counts = ", ".join(f"{k} {sum(f['kind'] == k for f in s['faults'])}" for k in s["faults_enabled"])
    print(f"\nseed {s['seed']}: {s['utterances']} utterances, {s['success']} SUCCESS ({s['success_share'] * 100:.2f} %), "
          f"{len(s['faults'])} faults ({counts}), {s['resumes']} resumes")
    for r in s["non_success"]:
        print(f"  not SUCCESS: {r['client']} #{r['utterance_index']} {r['status']} error={r['error']} "
              f"finalized at {r['finalized_t']}s, fault in flight: {r['fault']} (session {r['session_id']})")
    for v in s["violations"]:
        print(f"  VIOLATION {v}")
    if s["success_share"] < min_success:
        print(f"  SUCCESS share {s['success_share'] * 100:.2f} % is below {min_success * 100:.2f} %")
    print("PASS" if s["ok"] else "FAIL")


def main() -> None:
    args = parser().parse_args()
    summary = trio.run(run, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print_summary(summary, args.min_success)
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
