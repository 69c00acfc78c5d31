"""``just fuzz [--seconds N] [--seed S] [--replay NAME:SEED]``: a black-box run against a real daemon.

The daemon runs as its own process (``scheduler serve``, embedded Valkey, ``--node-token``
set), with two well-behaved reference nodes and three witness sessions streaming speech in
real time throughout. ``--workers`` tasks throw the cases of tests/fuzz/cases.py at all
three listeners (``/v1/session``, ``/v1/node``, admin) until the time is up. It checks:

- the daemon never exits, and ``/healthz`` answers 200 every second;
- every case gets its documented answer within 10 s (a case that does not prints
  ``FAIL NAME:SEED`` and how to replay it);
- no ``INTERNAL`` error, no ERROR line and no traceback in the daemon's log;
- open fds and RSS come back within bounds once the attack stops;
- every witness's results are contiguous from 0, in order, and all SUCCESS.

Prints the seed first and a summary last (one JSON line); exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import attrs
import trio
from trio_websocket import open_websocket_url

from scheduler.reference.node import NodeOptions, ReferenceNode
from scheduler.session.audio import silence, tone
from tests.fuzz.cases import CASES, Target, Violation

NODE_TOKEN = "fuzz-node-token"
MAX_FRAME_BYTES = 262144  # smaller than the default, so that the oversized cases cost less to send
FD_SLACK, RSS_SLACK_MB = 16, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.define
class Report:
    seed: int
    cases: dict[str, int] = attrs.field(factory=dict)
    failures: list[str] = attrs.field(factory=list)
    health_misses: int = 0
    witnesses: list[dict] = attrs.field(factory=list)
    fds: dict = attrs.field(factory=dict)
    rss_mb: dict = attrs.field(factory=dict)


async def _witness(url: str, index: int, stop: trio.Event, report: Report, session_ids: list[str]) -> None:
    """A well-behaved client: 300 ms of speech and a finalize, in real time, until ``stop``;
    then close_session and check its results."""
    results: list[dict] = []
    sent = [0]
    try:
        await _stream(url, stop, results, sent, session_ids)
    except Exception as exc:  # noqa: BLE001 (a group from its nursery too: the daemon cut or refused it)
        report.witnesses.append({"witness": index, "error": repr(exc)[:300], "ok": False})
        return
    indexes = [r["utterance_index"] for r in results]
    statuses = sorted({r["status"] for r in results})
    ok = indexes == list(range(sent[0])) and statuses in ([], ["SUCCESS"])
    report.witnesses.append({"witness": index, "utterances": sent[0], "results": len(results), "statuses": statuses, "ok": ok})


async def _stream(url: str, stop: trio.Event, results: list[dict], sent: list[int], session_ids: list[str]) -> None:
    async with open_websocket_url(url + "/v1/session") as ws:
        await ws.send_message(json.dumps({"type": "session_init", "src_lang": "zh", "tgt_langs": ["en"]}))
        ready = json.loads(await ws.get_message())
        assert ready["type"] == "session_ready"
        session_ids.append(ready["session_id"])

        async def read() -> None:
            while True:
                msg = json.loads(await ws.get_message())
                if msg["type"] == "result":
                    results.append(msg)
                elif msg["type"] == "session_closed":
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while not stop.is_set():
                for _ in range(3):
                    await ws.send_message(tone(100))
                    await trio.sleep(0.1)
                await ws.send_message(json.dumps({"type": "finalize"}))
                sent[0] += 1
                await ws.send_message(silence(100))
                await trio.sleep(0.2)
            await ws.send_message(json.dumps({"type": "close_session"}))


async def _health(admin_port: int, stop: trio.Event, report: Report) -> None:
    url = f"http://127.0.0.1:{admin_port}/healthz"
    while not stop.is_set():
        try:
            code = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=1).status)
        except Exception:  # noqa: BLE001 (any failure is a miss)
            code = None
        if code != 200:
            report.health_misses += 1
        await trio.sleep(1)


async def _attacker(target: Target, rng: random.Random, deadline: float, report: Report, only: str | None) -> None:
    names = sorted(CASES) if only is None else [only]
    while trio.current_time() < deadline:
        name, seed = rng.choice(names), rng.getrandbits(32)
        report.cases[name] = report.cases.get(name, 0) + 1
        try:
            await CASES[name](target, random.Random(seed))
        except Violation as exc:
            report.failures.append(f"{name}:{seed}: {exc}")
            print(f"FAIL {name}:{seed}: {exc}\n  replay: just fuzz --replay {name}:{seed}", flush=True)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            report.failures.append(f"{name}:{seed}: connection error {exc!r}")
            print(f"FAIL {name}:{seed}: connection error {exc!r}\n  replay: just fuzz --replay {name}:{seed}", flush=True)


async def _node(url: str, node_id: str, report: Report, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A well-behaved reference node; its end (the daemon cut it) is a failure of the run."""
    node = ReferenceNode(NodeOptions(url=url, node_id=node_id, max_jobs=8, delay_ms=30, token=NODE_TOKEN))
    try:
        await node.run(task_status=task_status)
    except Exception as exc:  # noqa: BLE001
        report.failures.append(f"node {node_id} ended: {exc!r}"[:300])


def _usage(pid: int) -> tuple[int, float]:
    """(open fds, RSS in MB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    return fds, rss_kb / 1024


async def _run(args: argparse.Namespace, log_path: Path) -> Report:
    report = Report(seed=args.seed)
    ws_port, admin_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "scheduler", "serve", "--ws-port", str(ws_port), "--admin-port", str(admin_port),
               "--node-token", NODE_TOKEN, "--max-frame-bytes", str(MAX_FRAME_BYTES), "--pause-ms", "400",
               "--max-messages-per-s", "2000"]
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        url = f"ws://127.0.0.1:{ws_port}"
        target = Target(ws_port, admin_port, NODE_TOKEN, MAX_FRAME_BYTES)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(2):
                await nursery.start(_node, url, f"good{i}", report)
            await trio.sleep(0.5)
            baseline = _usage(daemon.pid)
            async with trio.open_nursery() as clients:
                for i in range(3):
                    clients.start_soon(_witness, url, i, stop, report, target.session_ids)
                clients.start_soon(_health, admin_port, stop, report)
                rng = random.Random(args.seed)
                deadline = trio.current_time() + args.seconds
                async with trio.open_nursery() as attackers:
                    for _ in range(args.workers if args.replay is None else 1):
                        attackers.start_soon(_attacker, target, random.Random(rng.getrandbits(64)), deadline, report, args.only)
                    if args.replay is not None:
                        attackers.cancel_scope.cancel()
                        await _replay(target, args.replay, report)
                await trio.sleep(5)  # let the daemon settle: hostile connections closed, queues drained
                after = _usage(daemon.pid) if daemon.poll() is None else (0, 0.0)
                stop.set()
            nursery.cancel_scope.cancel()
        report.fds = {"before": baseline[0], "after": after[0]}
        report.rss_mb = {"before": round(baseline[1], 1), "after": round(after[1], 1)}
        if after[0] > baseline[0] + FD_SLACK:
            report.failures.append(f"open fds {baseline[0]} -> {after[0]} after the attack")
        if after[1] > baseline[1] + RSS_SLACK_MB:
            report.failures.append(f"RSS {baseline[1]:.0f} -> {after[1]:.0f} MB after the attack")
        if daemon.poll() is not None:
            report.failures.append(f"the daemon exited with status {daemon.returncode}")
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
    return report


async def _replay(target: Target, spec: str, report: Report) -> None:
    name, _, seed = spec.partition(":")
    report.cases[name] = 1
    try:
        await CASES[name](target, random.Random(int(seed)))
    except Violation as exc:
        report.failures.append(f"{spec}: {exc}")


def _scan_log(log_path: Path, report: Report) -> None:
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            report.failures.append(f"a log line that is not JSON: {line[:200]}")
            continue
        if record.get("level") in ("error", "critical") or "Traceback" in line:
            report.failures.append(f"ERROR in the log: {line[:300]}")
        if '"INTERNAL' in line or "code=INTERNAL" in line:
            report.failures.append(f"INTERNAL in the log: {line[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just fuzz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="how long to attack (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the run (default: random, printed)")
    parser.add_argument("--workers", type=int, default=6, help="concurrent attacking tasks (default 6)")
    parser.add_argument("--only", choices=sorted(CASES), default=None, help="run one case only")
    parser.add_argument("--replay", metavar="NAME:SEED", default=None, help="run one failing case again, exactly")
    parser.add_argument("--log", default=None, help="keep the daemon's log at this path")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    print(f"fuzz seed {args.seed} ({args.seconds:g} s, {args.workers} workers); replay the run: just fuzz --seed {args.seed}",
          flush=True)
    log_path = Path(args.log) if args.log else Path(tempfile.mkdtemp(prefix="fuzz-")) / "daemon.log"
    report = trio.run(_run, args, log_path)
    _scan_log(log_path, report)
    if not report.witnesses or not all(w["ok"] for w in report.witnesses):
        report.failures.append(f"witnesses: {report.witnesses}")
    if report.health_misses:
        report.failures.append(f"/healthz missed {report.health_misses} times")
    summary = {**attrs.asdict(report), "log": str(log_path), "ok": not report.failures}
    summary["failures_total"] = len(report.failures)
    if len(report.failures) > 50:  # the first ones (the cause, usually) and the last ones (the run's verdicts)
        summary["failures"] = report.failures[:40] + ["..."] + report.failures[-10:]
    print(json.dumps(summary), flush=True)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
