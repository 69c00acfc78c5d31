"""Load harness: N real-time clients and M simulated nodes against a real daemon process.

Everything runs over real sockets on loopback, in separate processes: the daemon is a
`scheduler serve` child process on its own Valkey (a valkey-server child of this harness, so
that its counters can be read); the clients are bench/loadgen.py, a child process that writes
pre-encoded, pre-masked frames to plain sockets and parses only what comes back; the nodes
are Trio tasks in this process. Unless ``--no-pin`` (or ``--workers``), the daemon runs on
CPU 0 and everything else (generator, nodes, Valkey) on the other CPUs, so the load
generator's CPU is not the daemon's; the generator's own CPU and schedule lag are reported,
and a run where it fell behind its schedule is marked ``"valid": false``.

Phases, in one run:
1. Baselines: EVALSHA calls/s through the Trio adapter (64 callers) and one caller's round
   trip; a bare trio-websocket server process (on the daemon's CPU) fed the same real-time
   schedule of frames by the generator, answering each with 2 bytes: its frames per CPU-second.
2. Idle: N sessions connect and initialise; the daemon's RSS with them, minus its RSS
   before, over N is the RSS per idle session.
3. Active, `--duration` seconds: every session streams real-time PCM (`--chunk-ms` frames
   on an absolute schedule): speech segments of 0.6-3 s, each ended either by `is_final`
   (probability `--final-prob`) or by enough silence for the daemon's pause finalize, then
   silence (``--silence-only``: silence throughout). Nodes answer after a log-normal service
   time (`--service-ms` median) and fail a fraction `--failure-rate` of jobs with status error.

Measured per utterance (clocks of this process):
- finalize: when the client sent `is_final`, or (pause finalize) when it received
  `utterance_finalized`;
- dispatch latency: the node received job_assign - finalize;
- service: the node's job_result sent - job_assign received;
- overhead: (result received - finalize) - service - order wait, where order wait is how
  long the answer had to wait for the previous utterance's result (results are delivered in
  order; that wait is the contract, not daemon work). `e2e_minus_service` is reported too.
Also: results/s, the daemon's CPU (% of one core) per session, Redis commands and EVALSHA
per result, the generator's CPU and send lag (how late it was against its schedule), and
``ratios``: the daemon's frames per CPU-second, and that over the bare server's
(``daemon_frames_per_cpu_s_vs_echo``).

With ``--redis-cluster 3`` the daemon runs on a 3-master Valkey cluster (children of this
harness) instead, and commands, EVALSHA and Valkey CPU are reported per master
(``redis_per_server``, with ``commands_spread``: how far the busiest or idlest master is from
the mean): how evenly the deployment's Redis work spreads over the primaries.

Writes JSON and a PNG (matplotlib) to --out (default bench/results/load.json / .png).
Usage: python bench/load.py [--sessions 1000] [--nodes 8] [--duration 30] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import spread  # noqa: E402
from adapter_throughput import adapter as adapter_throughput  # noqa: E402
from loadgen import cpu_s, pct  # noqa: E402  (the generator's own helpers; pct is the benches' percentile)

from scheduler.ops.embedded_redis import EmbeddedValkey, EmbeddedValkeyCluster  # noqa: E402

RATE = 16000
PAIR = ("en", "de")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, RSS bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def tree_stats(pid: int) -> tuple[float, int]:
    """:func:`proc_stats` of a process and its children (``--workers``: the supervisor and
    its worker processes), summed; a child that went away meanwhile is left out."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    cpu, rss, todo = 0.0, 0, [pid]
    while todo:
        one = todo.pop()
        with contextlib.suppress(OSError):
            c, r = proc_stats(one)
            cpu, rss = cpu + c, rss + r
        todo.extend(children.get(one, ()))
    return cpu, rss


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


# ---------------------------------------------------------------- baselines

ECHO_SERVER = """
import sys, trio
from trio_websocket import serve_websocket, ConnectionClosed
async def handler(request):
    ws = await request.accept()
    try:
        while True:
            await ws.get_message()
            await ws.send_message(b"ok")
    except ConnectionClosed:
        pass
trio.run(lambda: serve_websocket(handler, "127.0.0.1", int(sys.argv[1]), ssl_context=None))
"""


class LoadGen:
    """bench/loadgen.py as a child process (module docstring there): its control lines, its report."""

    def __init__(self, process: trio.Process, report: Path) -> None:
        self._process, self._report, self._buffer = process, report, b""

    async def event(self, name: str) -> dict[str, Any]:
        """The next control line, which must be event ``name``."""
        while b"\n" not in self._buffer:
            chunk = await self._process.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"the load generator ended before {name!r} (exit {await self._process.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        event = json.loads(line)
        if event.get("event") != name:
            raise RuntimeError(f"the load generator said {event}, expected {name!r}")
        return event

    async def go(self) -> dict[str, Any]:
        await self._process.stdin.send_all(b"go\n")
        return await self.event("active")

    async def finish(self) -> dict[str, Any]:
        """Its report, once it has closed every session."""
        await self.event("done")
        await self._process.wait()
        return json.loads(self._report.read_text())

    def kill(self) -> None:
        if self._process.returncode is None:
            self._process.kill()


async def open_loadgen(args: argparse.Namespace, url: str, mode: str, duration: float, report: Path) -> LoadGen:
    """Start bench/loadgen.py against ``url`` with the run's sessions, audio and seed."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "loadgen.py"), "--url", url, "--mode", mode,
           "--sessions", str(args.sessions), "--duration", str(duration), "--chunk-ms", str(args.chunk_ms),
           "--pause-ms", str(args.pause_ms), "--final-prob", str(args.final_prob), "--seed", str(args.seed),
           "--src", PAIR[0], "--tgt", PAIR[1], "--rate", str(RATE),
           "--drain-s", str(args.service_ms / 1000 * 20 + 10), "--report", str(report)]
    if getattr(args, "silence_only", False):
        cmd.append("--silence-only")
    process = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return LoadGen(process, report)


async def echo_baseline(args: argparse.Namespace, cpus: set[int] | None, seconds: float,
                        server_code: str = ECHO_SERVER) -> dict[str, Any]:
    """A bare trio-websocket server process (on the daemon's CPUs) that answers every frame with
    2 bytes, fed the same real-time schedule of frames by the load generator in another process:
    frames it handles per CPU-second of its own process. ``server_code``: another such server
    (bench/codec.py: one that parses frames itself)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", server_code, str(port)],
                              preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            await trio.sleep(0.05)
        gen = await open_loadgen(args, f"ws://127.0.0.1:{port}", "echo", seconds, Path(args.out).with_suffix(".echo-gen.json"))
        try:
            idle = await gen.event("idle")
            cpu0 = proc_stats(server.pid)[0]
            active = await gen.go()
            await trio.sleep(max(0.0, active["t"] + seconds - time.perf_counter()))
            cpu1 = proc_stats(server.pid)[0]
            streamed = await gen.event("streamed")
            await gen.finish()
        finally:
            gen.kill()
        return {"echo_connections": idle["held"], "echo_frames_per_s": round(streamed["frames_sent"] / seconds),
                "echo_cpu_pct_of_core": round((cpu1 - cpu0) / seconds * 100, 1),
                "echo_frames_per_cpu_s": round(streamed["frames_sent"] / max(1e-9, cpu1 - cpu0)),
                "echo_generator_cpu_pct_of_core": streamed["cpu_pct_of_core"], "echo_generator_behind": streamed["behind"],
                "echo_answered": streamed["answers"] / max(1, streamed["frames_sent"])}
    finally:
        server.terminate()
        server.wait()


async def evalsha_round_trip(url: str, calls: int = 2000) -> float:
    """Mean seconds of one EVALSHA through the adapter with a lone caller."""
    one = await adapter_throughput(url, calls, 1, 2)
    return 1 / one["ops_per_s"]


# ---------------------------------------------------------------- simulated nodes


class Record:
    """Timestamps by (session_id, utterance_index), shared by clients and nodes."""

    def __init__(self) -> None:
        self.final: dict[tuple[str, int], tuple[float, str]] = {}  # -> (time, "is_final" | "pause" | other)
        self.assigned: dict[tuple[str, int], float] = {}
        self.answered: dict[tuple[str, int], float] = {}
        self.result: dict[tuple[str, int], tuple[float, str]] = {}
        self.result_times: list[float] = []
        self.send_lag: list[float] = []
        self.busy = 0
        self.errors: dict[str, int] = {}
        self.node_jobs = 0
        self.node_failed = 0
        self.ready = 0
        self.admit_wait: list[float] = []  # per admitted session: from asking to session_ready (refusals waited out)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


async def sim_node(url: str, node_id: str, max_jobs: int, service_ms: float, sigma: float, failure_rate: float, rec: Record,
                   rng: random.Random) -> None:
    async with open_websocket_url(url + "/v1/node") as ws:
        await ws.send_message(json.dumps({"type": "register", "node_id": node_id, "lang_pairs": [list(PAIR)],
                                          "max_jobs": max_jobs}))
        reply = json.loads(await ws.get_message())
        assert reply["type"] == "registered", reply
        send_lock = trio.Lock()

        async def send(msg: dict) -> None:
            async with send_lock:
                await ws.send_message(json.dumps(msg))

        async def heartbeats() -> None:
            while True:
                await trio.sleep(reply["heartbeat_interval_ms"] / 1000)
                await send({"type": "heartbeat", "load": {}})

        async def job(msg: dict, got: float) -> None:
            await trio.sleep(rng.lognormvariate(0, sigma) * service_ms / 1000)
            failed = rng.random() < failure_rate
            key = (msg["session_id"], msg["utterance_index"])
            rec.answered[key] = time.perf_counter()
            rec.node_failed += failed
            await send({"type": "job_result", "job_id": msg["job_id"], "attempt": msg["attempt"],
                        "status": "error" if failed else "ok", "source_text": "s", "text": "t",
                        "error": "SIMULATED" if failed else None})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats)
            try:
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg["type"] == "job_assign":
                        now = time.perf_counter()
                        rec.node_jobs += 1
                        rec.assigned.setdefault((msg["session_id"], msg["utterance_index"]), now)
                        nursery.start_soon(job, msg, now)
            except ConnectionClosed:
                nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- the run


def start_daemon(args: argparse.Namespace, redis_url: str, cpus: set[int] | None = None) -> tuple[subprocess.Popen, str, int]:
    """``cpus``: pin the daemon (every thread it will have) to these CPUs."""
    ws_port, admin_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "scheduler", "serve", "--ws-port", str(ws_port), "--admin-port", str(admin_port),
           "--redis-url", redis_url, "--idle-timeout-ms", "600000", "--pause-ms", str(args.pause_ms),
           "--log-level", "warning", "--redis-pool-size", str(args.redis_pool_size), *args.daemon_arg]
    with open(Path(args.out).with_suffix(".daemon.log"), "w") as log:  # the child keeps its own descriptor
        daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                  preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return daemon, f"ws://127.0.0.1:{ws_port}", admin_port
        time.sleep(0.1)
    daemon.kill()
    raise RuntimeError("daemon did not become ready in 30 s")


DAEMON_CPUS = {0}


@contextlib.contextmanager
def off_the_daemon(pin: bool = True):
    """This harness (and every process it starts from now: Valkey, the load generator) on the
    CPUs other than :data:`DAEMON_CPUS`, given back on exit. Yields the harness's CPUs."""
    before = os.sched_getaffinity(0)
    others = set(range(os.cpu_count() or 1)) - DAEMON_CPUS
    if pin and others:
        os.sched_setaffinity(0, others)
    try:
        yield sorted(others if pin and others else before)
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def harness_off_the_daemon(pin: bool = True):
    """:func:`off_the_daemon` with a Valkey started there (``start_daemon(..., cpus=DAEMON_CPUS)``
    pins the daemon on the rest). Yields (the Valkey's URL, the harness's CPUs)."""
    with off_the_daemon(pin) as cpus:
        valkey = EmbeddedValkey()
        try:
            yield valkey.start(), cpus
        finally:
            valkey.stop()


def redis_counters(client: redis.Redis) -> dict[str, int]:
    """Commands so far (inside scripts included), EVALSHA, and each command's calls as ``cmd:<name>``."""
    stats = client.info("commandstats")
    return {"commands": int(client.info("stats")["total_commands_processed"]),
            "evalsha": int(stats.get("cmdstat_evalsha", {}).get("calls", 0)),
            **{"cmd:" + name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}}


class Servers:
    """The Redis the daemon runs on: one valkey-server, or (``masters`` > 0) a Valkey cluster of
    that many masters; commands, EVALSHA and CPU are read per server."""

    def __init__(self, masters: int = 0) -> None:
        self._cluster = EmbeddedValkeyCluster(masters) if masters else None
        self._single = None if masters else EmbeddedValkey()
        self._clients: list[redis.Redis] = []

    def start(self) -> str:
        url = self._cluster.start() if self._cluster else self._single.start()
        self._clients = [redis.Redis.from_url(s.url, decode_responses=True) for s in self.servers]
        return url

    @property
    def servers(self) -> list[EmbeddedValkey]:
        return self._cluster.nodes if self._cluster else [self._single]

    def sample(self) -> list[dict[str, float]]:
        """Per server: commands and EVALSHA so far, and CPU seconds."""
        return [{**redis_counters(c), "cpu": proc_stats(s.pid)[0]} for c, s in zip(self._clients, self.servers, strict=True)]

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        if self._cluster:
            self._cluster.stop()
        else:
            self._single.stop()


def metric_lines(admin_port: int, prefix: str) -> dict[str, float]:
    """The daemon's /metrics series whose name starts with ``prefix`` (labels included), or {}."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2) as resp:
            lines = resp.read().decode().splitlines()
    except OSError:
        return {}
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in lines)
            if name.startswith(prefix) and not name.startswith("#")}


def loop_lag_ms(admin_port: int) -> float | None:
    """The daemon's smoothed event-loop lag (``scheduler_event_loop_lag_seconds``), in ms."""
    lag = metric_lines(admin_port, "scheduler_event_loop_lag_seconds").get("scheduler_event_loop_lag_seconds")
    return None if lag is None else round(lag * 1000, 1)


def gc_summary(series: dict[str, float]) -> dict[str, Any]:
    """``scheduler_gc_pause_seconds`` since the daemon started, per generation: collections,
    their total in ms, and how many stopped the event loop for 20 ms or more."""
    out = {}
    for gen in ("0", "1", "2"):
        count = series.get(f'scheduler_gc_pause_seconds_count{{generation="{gen}"}}', 0.0)
        total = series.get(f'scheduler_gc_pause_seconds_sum{{generation="{gen}"}}', 0.0)
        short = series.get(f'scheduler_gc_pause_seconds_bucket{{generation="{gen}",le="0.02"}}', 0.0)
        out[gen] = {"count": int(count), "total_ms": round(total * 1000, 1), "over_20ms": int(count - short)}
    return out


def journal_wait_summary(series: dict[str, float]) -> dict[str, Any]:
    """``scheduler_journal_ahead_wait_seconds`` as the bench reports it: how many
    utterance_finalized the writers held back for the dispatcher's word, the mean wait, and the
    bucket bounds (ms) under which half and 99 % of the waits fell (docs/redis.md)."""
    name = "scheduler_journal_ahead_wait_seconds"
    count = series.get(name + "_count", 0.0)
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in series.items() if k.startswith(name + "_bucket"))
    out: dict[str, Any] = {"n": int(count), "mean": round(series.get(name + "_sum", 0.0) / count * 1000, 2) if count else None}
    for q in (50, 99):
        out[f"p{q}_le"] = next((le * 1000 for le, v in buckets if count and v >= count * q / 100), None)
    return out


def pinning(args: argparse.Namespace) -> bool:
    """Pin the daemon to :data:`DAEMON_CPUS` and the rest elsewhere, unless told not to, the box
    has one CPU, or the daemon runs several workers (they need every core)."""
    workers = any(a.startswith("--workers") for a in args.daemon_arg)
    return not args.no_pin and not workers and (os.cpu_count() or 1) > 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"args": vars(args), "host": {"cpus": os.cpu_count()}}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the daemon child inherits it
    pin = pinning(args)
    with off_the_daemon(pin) as harness_cpus:
        out["host"]["daemon_cpus"] = sorted(DAEMON_CPUS) if pin else None
        out["host"]["harness_cpus"] = harness_cpus  # nodes, load generator, Valkey
        servers = Servers(args.redis_cluster)
        redis_url = servers.start()
        try:
            if not args.skip_baselines and not args.redis_cluster:
                print("baselines ...", file=sys.stderr)
                many = await adapter_throughput(redis_url, 20_000, 64, args.redis_pool_size)
                out["baselines"] = {
                    "adapter_evalsha_per_s_64_callers": round(many["ops_per_s"]),
                    "adapter_evalsha_round_trip_ms": ms(await evalsha_round_trip(redis_url)),
                    **await echo_baseline(args, DAEMON_CPUS if pin else None, args.echo_seconds),
                }
            daemon, url, admin_port = start_daemon(args, redis_url, cpus=DAEMON_CPUS if pin else None)
            try:
                out.update(await drive(args, url, daemon.pid, servers, admin_port))
                out["ratios"] = ratios(out)
            finally:
                daemon.terminate()
                daemon.wait(timeout=20)
        finally:
            servers.stop()
    generator = out["active"]["generator"]
    out["valid"] = not generator["behind"]
    if not out["valid"]:
        out["invalid_reason"] = (f"the load generator fell behind its schedule (send lag p99 "
                                 f"{generator['send_lag_ms']['p99']} ms): it, not the daemon, was the limit")
    return out


def ratios(out: dict[str, Any]) -> dict[str, Any]:
    """Frames the daemon handles per second of its CPU (all its work: audio, jobs, results),
    and against the bare server's frames per second of its own CPU, same schedule, same run."""
    active = out["active"]
    per_cpu_s = active["frames_in"] / max(1e-9, active["daemon_cpu_s"])
    found = {"daemon_frames_per_cpu_s": round(per_cpu_s)}
    echo = out.get("baselines", {}).get("echo_frames_per_cpu_s")
    if echo:
        found["daemon_frames_per_cpu_s_vs_echo"] = round(per_cpu_s / echo, 3)
    return found


async def drive(args: argparse.Namespace, url: str, daemon_pid: int, servers: Servers, admin_port: int) -> dict[str, Any]:
    rec = Record()
    rng = random.Random(args.seed)
    timeline: list[dict[str, float]] = []
    result: dict[str, Any] = {}

    async with trio.open_nursery() as node_nursery:
        for i in range(args.nodes):
            node_nursery.start_soon(sim_node, url, f"sim-{i}", args.max_jobs, args.service_ms, args.service_sigma,
                                    args.failure_rate, rec, random.Random(rng.random()))
        await trio.sleep(1.0)
        gen = await open_loadgen(args, url, "session", args.duration, Path(args.out).with_suffix(".gen.json"))
        try:
            await _sessions(args, gen, (daemon_pid, admin_port), servers, rec, result, timeline)
        finally:
            gen.kill()
        node_nursery.cancel_scope.cancel()  # every client is done: stop the nodes
    return _report(args, rec, result, timeline)


async def _sessions(args, gen: LoadGen, daemon, servers, rec, result, timeline) -> None:
    """Open the sessions (idle phase), stream (active phase), take the generator's report.
    ``daemon`` is its (pid, admin port): the timeline samples its CPU, RSS and event-loop lag."""
    daemon_pid, admin_port = daemon
    _, rss_before = tree_stats(daemon_pid)
    print(f"idle: opening {args.sessions} sessions ...", file=sys.stderr)
    idle = await gen.event("idle")
    rec.ready = idle["held"]
    await trio.sleep(3.0)  # settle
    _, rss_idle = tree_stats(daemon_pid)
    result["idle"] = {
        "sessions_held": rec.ready,
        "open_seconds": idle["open_seconds"],
        "daemon_rss_before_mib": round(rss_before / 2**20, 1),
        "daemon_rss_idle_mib": round(rss_idle / 2**20, 1),
        "rss_per_idle_session_kib": round((rss_idle - rss_before) / max(1, rec.ready) / 1024, 1),
        "refused": idle["errors"],
    }
    print(json.dumps(result["idle"]), file=sys.stderr)

    print(f"active: {args.duration} s of real-time audio ...", file=sys.stderr)
    counters0 = servers.sample()
    cpu0, _ = tree_stats(daemon_pid)
    harness0 = cpu_s()
    t0 = (await gen.go())["t"]
    stop_at = t0 + args.duration
    profiler: subprocess.Popen | None = None
    if args.profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # (in the venv, off PATH)
        profiler = subprocess.Popen([py_spy, "record", "--pid", str(daemon_pid), "--duration", str(int(args.duration)),
                                     "--rate", "200", "--format", "raw", "--output",
                                     str(Path(args.out).with_suffix(".collapsed.txt"))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last_cpu = cpu0
    while time.perf_counter() < stop_at:
        await trio.sleep(min(1.0, max(0.0, stop_at - time.perf_counter())))
        cpu, rss = tree_stats(daemon_pid)
        timeline.append({"t": round(time.perf_counter() - t0, 2), "daemon_cpu_pct": round((cpu - last_cpu) * 100, 1),
                         "daemon_rss_mib": round(rss / 2**20, 1), "answers": len(rec.answered),
                         "loop_lag_ms": await trio.to_thread.run_sync(loop_lag_ms, admin_port)})
        last_cpu = cpu
    cpu1, rss_active = tree_stats(daemon_pid)
    counters1 = servers.sample()
    journal_wait = await trio.to_thread.run_sync(metric_lines, admin_port, "scheduler_journal_ahead_wait_seconds")
    gc_pauses = await trio.to_thread.run_sync(metric_lines, admin_port, "scheduler_gc_pause_seconds")
    harness1 = cpu_s()
    active_s = time.perf_counter() - t0
    per_server = [{k: b[k] - a.get(k, 0) for k in b} for a, b in zip(counters0, counters1, strict=True)]
    streamed = await gen.event("streamed")
    report = await gen.finish()  # the sessions closed, their last results in
    rec.final = {(s, i): (t, r) for s, i, t, r in report["final"]}
    rec.result = {(s, i): (t, st) for s, i, t, st in report["result"]}
    rec.result_times = sorted(t for t, _ in rec.result.values())
    rec.busy = report["busy"]
    for code, n in report["errors"].items():
        rec.errors[code] = rec.errors.get(code, 0) + n
    result["_window"] = dict(cpu=cpu1 - cpu0, vcpu=sum(s["cpu"] for s in per_server), rss_active=rss_active,
                             rss_before=rss_before, active_s=active_s, per_server=per_server,
                             commands=sum(s["commands"] for s in per_server),
                             evalsha=sum(s["evalsha"] for s in per_server),
                             results_in_window=len([x for x in rec.result_times if x <= t0 + active_s]),
                             harness_cpu=harness1 - harness0, streamed=streamed, journal_wait=journal_wait,
                             gc_pauses=gc_pauses)
    if profiler is not None:
        await trio.to_thread.run_sync(profiler.wait)


def latencies(rec: Record) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per utterance with a result: (finalize -> dispatch, e2e - service, daemon overhead,
    order wait), in seconds (module docstring)."""
    dispatch, e2e_minus_service, overhead, order_wait = [], [], [], []
    by_session: dict[str, list[int]] = {}
    for (sid, idx) in rec.result:
        by_session.setdefault(sid, []).append(idx)
    for sid, indexes in by_session.items():
        prev_result = 0.0
        for idx in sorted(indexes):
            key = (sid, idx)
            got, _status = rec.result[key]
            if key in rec.final and key in rec.assigned and key in rec.answered:
                final_t, _reason = rec.final[key]
                service = rec.answered[key] - rec.assigned[key]
                dispatch.append(rec.assigned[key] - final_t)
                wait = max(0.0, prev_result - rec.answered[key])
                e2e_minus_service.append(got - final_t - service)
                order_wait.append(wait)
                overhead.append(got - final_t - service - wait)
            prev_result = got
    return dispatch, e2e_minus_service, overhead, order_wait


def _report(args: argparse.Namespace, rec: Record, result: dict[str, Any], timeline: list[dict[str, float]]) -> dict[str, Any]:
    w = result.pop("_window")
    active_s, results_in_window = w["active_s"], w["results_in_window"]
    dispatch, e2e_minus_service, overhead, order_wait = latencies(rec)
    statuses: dict[str, int] = {}
    for _, status in rec.result.values():
        statuses[status] = statuses.get(status, 0) + 1
    reasons: dict[str, int] = {}
    for _, reason in rec.final.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    results = len(rec.result)
    streamed = w["streamed"]
    result["active"] = {
        "seconds": round(active_s, 1),
        "sessions": rec.ready,
        "results": results,
        "results_per_s": round(results_in_window / active_s, 1),
        "result_status": statuses,
        "finalize_reasons": reasons,
        "frames_in": streamed["frames_sent"],
        "frames_per_s_in": round(streamed["frames_sent"] / active_s),
        "finalize_to_dispatch_ms": {"p50": ms(pct(dispatch, 50)), "p99": ms(pct(dispatch, 99)), "n": len(dispatch)},
        "e2e_minus_service_ms": {"p50": ms(pct(e2e_minus_service, 50)), "p99": ms(pct(e2e_minus_service, 99))},
        "order_wait_ms": {"p50": ms(pct(order_wait, 50)), "p99": ms(pct(order_wait, 99))},
        "daemon_overhead_ms": {"p50": ms(pct(overhead, 50)), "p99": ms(pct(overhead, 99)),
                               "mean": ms(statistics.fmean(overhead)) if overhead else None},
        "daemon_cpu_s": round(w["cpu"], 3),
        "daemon_cpu_pct_of_core": round(w["cpu"] / active_s * 100, 1),
        "daemon_cpu_pct_per_session": round(w["cpu"] / active_s * 100 / max(1, rec.ready), 4),
        "valkey_cpu_pct_of_core": round(w["vcpu"] / active_s * 100, 1),
        "daemon_rss_active_mib": round(w["rss_active"] / 2**20, 1),
        "daemon_rss_growth_per_session_kib": round((w["rss_active"] - w["rss_before"]) / max(1, rec.ready) / 1024, 1),
        "redis_commands_per_result": round(w["commands"] / max(1, results_in_window), 2),
        "redis_evalsha_per_result": round(w["evalsha"] / max(1, results_in_window), 2),
        "redis_per_result_by_command": by_command(w["per_server"], results_in_window),
        "journal_ahead_wait_ms": journal_wait_summary(w["journal_wait"]),
        "gc_pauses": gc_summary(w["gc_pauses"]),
        "redis_per_server": per_server_report(w["per_server"], active_s),
        "generator": {k: streamed[k] for k in ("cpu_pct_of_core", "send_lag_ms", "behind", "backpressured_frames")},
        "harness_cpu_pct_of_core": round(w["harness_cpu"] / active_s * 100, 1),  # the simulated nodes
        "daemon_loop_lag_ms": _lag_summary(timeline),
        "node_jobs": rec.node_jobs,
        "node_failed": rec.node_failed,
        "busy": rec.busy,
        "errors": dict(rec.errors),
    }
    result["timeline"] = timeline
    result["_samples"] = {"dispatch": dispatch, "overhead": overhead, "e2e_minus_service": e2e_minus_service}
    return result


def by_command(per_server: list[dict[str, float]], results: int) -> dict[str, float]:
    """Each command's calls per result over all servers (those inside scripts included), the
    largest first: where item 2's "commands per result" go."""
    total: dict[str, float] = {}
    for server in per_server:
        for key, calls in server.items():
            if key.startswith("cmd:") and calls:
                total[key[4:]] = total.get(key[4:], 0) + calls
    return {name: round(calls / max(1, results), 2) for name, calls in sorted(total.items(), key=lambda kv: -kv[1])}


def per_server_report(per_server: list[dict[str, float]], active_s: float) -> dict[str, Any]:
    """Each server's share of the commands and its CPU; ``commands_spread``: the largest
    deviation of one server's commands from their mean, as a fraction of the mean."""
    commands = [s["commands"] for s in per_server]
    return {"commands": [int(c) for c in commands], "evalsha": [int(s["evalsha"]) for s in per_server],
            "cpu_pct_of_core": [round(s["cpu"] / active_s * 100, 1) for s in per_server],
            "commands_spread": spread(commands)}


def _lag_summary(timeline: list[dict[str, Any]]) -> dict[str, float | None]:
    """The daemon's smoothed event-loop lag over the active phase (one sample a second)."""
    lags = sorted(x["loop_lag_ms"] for x in timeline if x.get("loop_lag_ms") is not None)
    if not lags:
        return {"p50": None, "max": None}
    return {"p50": lags[len(lags) // 2], "max": lags[-1]}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    samples = data["_samples"]
    ax = axes[0]
    for name, values in (("finalize -> dispatch", samples["dispatch"]), ("daemon overhead", samples["overhead"]),
                         ("e2e - service", samples["e2e_minus_service"])):
        if values:
            xs = sorted(v * 1000 for v in values)
            ax.plot(xs, [i / len(xs) for i in range(len(xs))], label=name)
    ax.axvline(20, color="grey", linestyle=":", label="20 ms target (p99)")
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of utterances")
    ax.set_title("latency CDF")
    ax.legend(fontsize=8)
    timeline = data["timeline"]
    ts = [p["t"] for p in timeline]
    ax = axes[1]
    rates = [0.0] + [(b["answers"] - a["answers"]) / max(1e-9, b["t"] - a["t"]) for a, b in zip(timeline, timeline[1:], strict=False)]
    ax.plot(ts, rates, label="node answers/s")
    ax.set_xlabel("s")
    ax.set_title(f"{data['active']['sessions']} sessions: node answers/s")
    ax = axes[2]
    ax.plot(ts, [p["daemon_cpu_pct"] for p in timeline], label="daemon CPU % of a core")
    ax.set_xlabel("s")
    ax2 = ax.twinx()
    ax2.plot(ts, [p["daemon_rss_mib"] for p in timeline], color="tab:red", label="daemon RSS MiB")
    ax.set_title("daemon CPU and RSS")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def traffic_arguments(parser: argparse.ArgumentParser, nodes: int) -> None:
    """The knobs bench/load.py and bench/overload.py share: nodes, audio, service, the daemon."""
    parser.add_argument("--nodes", type=int, default=nodes, help=f"simulated worker nodes (default {nodes})")
    parser.add_argument("--max-jobs", type=int, default=200, help="max_jobs per node (default 200)")
    parser.add_argument("--chunk-ms", type=int, default=200, help="audio per frame (default 200 ms)")
    parser.add_argument("--pause-ms", type=int, default=800, help="the daemon's pause finalize (default 800)")
    parser.add_argument("--final-prob", type=float, default=0.5, help="share of utterances ended by is_final (default 0.5)")
    parser.add_argument("--service-ms", type=float, default=300.0, help="median node service time (default 300)")
    parser.add_argument("--service-sigma", type=float, default=0.5, help="log-normal sigma of the service time (default 0.5)")
    parser.add_argument("--redis-pool-size", type=int, default=4)
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="extra flag for scheduler serve (repeat: --daemon-arg=--owner-ttl-ms --daemon-arg=9000)")
    parser.add_argument("--seed", type=int, default=1)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000, help="concurrent client sessions (default 1000)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of real-time streaming (default 30)")
    parser.add_argument("--failure-rate", type=float, default=0.02, help="share of jobs a node answers with error (default 0.02)")
    traffic_arguments(parser, nodes=8)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--echo-seconds", type=float, default=10.0,
                        help="seconds of the bare-server baseline (same sessions and frames; default 10)")
    parser.add_argument("--silence-only", action="store_true",
                        help="clients send silence only: no utterance is cut (the per-frame cost alone)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the daemon to CPU 0 and the generator, nodes and Valkey to the others "
                             "(never pinned with --workers)")
    parser.add_argument("--redis-cluster", type=int, default=0, metavar="MASTERS",
                        help="run the daemon on a Valkey cluster of this many masters (no replicas) instead of one "
                             "Valkey; commands and CPU are reported per master (`redis_per_server`); no baselines")
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon during the active phase (collapsed stacks next to the JSON)")
    parser.add_argument("--out", default="bench/results/load.json", help="JSON path; the PNG goes next to it")
    return parser


def main() -> None:
    args = parser().parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data = trio.run(run, args)
    plot(data, Path(args.out).with_suffix(".png"))
    data.pop("_samples")
    Path(args.out).write_text(json.dumps(data, indent=2))
    summary = {k: v for k, v in data.items() if k != "timeline"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
