"""End to end over real processes: `scheduler serve` (embedded Valkey, or the suite's 3-master
Valkey cluster) + 2 reference nodes + 3 concurrent `scheduler client` processes, all on loopback.

Every client must get results 0..n-1 exactly once, in order, each carrying the node's answer
for exactly the bytes of that utterance (duration and CRC-32 of the WAV slice).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from scheduler.reference.client import write_wav
from scheduler.session.audio import silence, tone
from scheduler.store import keys
from scheduler.store.keys import KeySpace
from scheduler.store.redis_adapter import connect

pytestmark = pytest.mark.slow
CMD = [sys.executable, "-m", "scheduler"]
BYTES_PER_MS = 32  # 16 kHz, 16-bit mono


class Daemon:
    def __init__(self, tmp: Path, *flags: str):
        self.log_path = tmp / "daemon.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*CMD, "serve", "--ws-port", "0", "--admin-port", "0", *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            events = log_events(self.log_path)
            if "listening" in events:
                self.ws_url, self.admin_url = events["listening"]["ws"], events["listening"]["admin"]
                self.valkey_pid = events.get("embedded_redis_started", {}).get("pid")  # None with --redis-url
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("daemon did not start:\n" + self.log_path.read_text())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            self.log.close()


def log_events(path: Path) -> dict[str, dict]:
    """The daemon's JSON log lines (stderr is not a terminal here), last one per event name."""
    events = {}
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            events[record.get("event") or record["msg"]] = record
    return events


def wait_joined(daemon: Daemon, count: int, timeout: float = 30.0) -> None:
    """Wait until ``count`` nodes registered (``node_joined`` lines: their pools are in Redis)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        joined = sum('"node_joined"' in line for line in daemon.log_path.read_text().splitlines())
        if joined >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} nodes did not register:\n" + daemon.log_path.read_text())


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def make_wav(path: Path, speech_ms: list[int]) -> bytes:
    pcm = b"".join(tone(ms, freq=300 + 50 * i) + silence(1000) for i, ms in enumerate(speech_ms))
    write_wav(str(path), pcm)
    return pcm


def check_transcript(lines: list[str], pcm: bytes, expected_utterances: int) -> None:
    msgs = [json.loads(line) for line in lines if line.startswith("{")]
    finalized = [m for m in msgs if m["type"] == "utterance_finalized"]
    results = [m for m in msgs if m["type"] == "result"]
    assert msgs[-1]["type"] == "session_closed" and msgs[-1]["reason"] == "client_close"
    assert [m["utterance_index"] for m in finalized] == list(range(expected_utterances))
    assert [r["utterance_index"] for r in results] == list(range(expected_utterances))
    offset = 0
    for fin, result in zip(finalized, results, strict=True):
        chunk = pcm[offset : offset + fin["audio_ms"] * BYTES_PER_MS]
        offset += len(chunk)
        tag = f"{fin['audio_ms']}ms crc32={zlib.crc32(chunk):08x}"
        assert result["status"] == "SUCCESS", result
        assert result["source_text"] == f"[zh] {tag}"
        assert result["translations"]["en"]["text"] == f"[en] {tag}"
        assert result["translations"]["en"]["node_id"] in ("node-a", "node-b")
        assert result["turn_id"] == fin["turn_id"] and result["reason"] == fin["reason"]
    # every byte up to the last utterance went into exactly one utterance; what is left is the
    # silence after the last pause cut, a silent utterance that is discarded without an index
    rest = pcm[offset:]
    assert len(rest) < 1000 * BYTES_PER_MS and rest == bytes(len(rest))


@pytest.mark.parametrize("redis", ["embedded", "cluster", "sharded"])
def test_three_clients_two_nodes_real_processes(tmp_path, request, redis):
    """``cluster``: the same on the suite's 3-master Valkey cluster (``--redis-url``);
    ``sharded``: there with key layout 2 (``--redis-shards 3``: the node directory puts the
    two nodes in two shards, on two primaries), and the scheduling state is found on every
    primary."""
    cluster = redis != "embedded"
    url = request.getfixturevalue("flushed_cluster_url") if cluster else None
    daemon = Daemon(tmp_path, *(["--redis-url", url] if cluster else []),
                    *(["--redis-shards", "3"] if redis == "sharded" else []))
    nodes, clients = [], []
    try:
        for name in ("node-a", "node-b"):
            nodes.append(subprocess.Popen([*CMD, "node", "--url", daemon.ws_url, "--node-id", name, "--max-jobs", "2",
                                           "--delay-ms", "50", "--jitter-ms", "100", "--log-level", "warning"],
                                          stdin=subprocess.DEVNULL))
        wait_joined(daemon, 2)  # (a fixed second was not always enough on a busy CI: UNSUPPORTED_LANG_PAIR)
        plans = {"c0": ([700, 400, 900, 300], ["--fast"]), "c1": ([500] * 6, ["--fast"]), "c2": ([600, 800], [])}
        pcms = {}
        for name, (speech, extra) in plans.items():
            wav = tmp_path / f"{name}.wav"
            pcms[name] = make_wav(wav, speech)
            clients.append((name, subprocess.Popen([*CMD, "client", "--url", daemon.ws_url, "--wav", str(wav),
                                                    "--src", "zh", "--tgt", "en", "--json", *extra],
                                                   stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)))
        for name, proc in clients:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{out}"
            check_transcript(out.splitlines(), pcms[name], len(plans[name][0]))
    finally:
        for node in nodes:
            node.terminate()
        for _, proc in clients:
            proc.kill()
        code = daemon.stop()
    log = daemon.log_path.read_text()
    assert code == 0, log
    events = log_events(daemon.log_path)
    assert "stopped" in events and ("embedded_redis_stopped" in events) != cluster
    assert events["utterance_finalized"]["reason"] in ("pause", "is_final") and "latency_ms" in events["utterance_finalized"]
    assert cluster or not pid_alive(daemon.valkey_pid)
    assert "Traceback" not in log and '"level": "error"' not in log, log
    # the relay stops (its reader threads returned) before the embedded Valkey does
    assert '"logger": "scheduler.relay"' not in log, log
    if redis == "sharded":
        assert events["key_layout"]["layout"] == "2:3" and sorted(events["key_layout"]["shards_per_primary"].values()) == [1, 1, 1]
        assert_spread(url)


def assert_spread(url: str) -> None:
    """Layout 2 on the 3-master cluster: the layout key says so, the three sessions' own keys
    carry their own tags, both nodes' shards hold finished jobs, and every primary holds
    scheduling keys."""
    client = connect(url, decode_responses=True)
    try:
        assert client.get(keys.layout()) == "2:3"
        space = KeySpace(3)
        assert len(list(client.scan_iter("{s:*}:session:*"))) == 3
        node_shards = {int(client.hget(keys.node_directory(), n)) for n in ("node-a", "node-b")}
        assert len(node_shards) == 2, node_shards
        for shard in range(3):
            jobs = list(client.scan_iter(keys.job("[0-9]*", tag=space.shard_tag(shard))))
            statuses = [client.hget(j, "status") for j in jobs]
            if shard in node_shards:
                assert statuses and set(statuses) <= {"finished", "cancelled"}, (shard, statuses)
            else:
                assert not jobs, f"no node in shard {shard}"
        per_primary = [n.redis_connection.dbsize() for n in client.get_primaries()]
        assert len(per_primary) == 3 and all(per_primary), per_primary
    finally:
        client.close()


def test_sigint_twice_exits_and_leaves_no_valkey(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.proc.send_signal(signal.SIGINT)
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(timeout=20) == 0
    daemon.log.close()
    assert not pid_alive(daemon.valkey_pid)


def test_external_redis_url_is_used(tmp_path, redis_url):
    daemon_log = tmp_path / "d.log"
    with open(daemon_log, "w") as log:
        env = {**os.environ, "SCHEDULER_REDIS_URL": redis_url}
        proc = subprocess.Popen([*CMD, "serve", "--ws-port", "0", "--admin-port", "0"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "listening" not in log_events(daemon_log) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    events = log_events(daemon_log)
    assert events["listening"]["redis"] == redis_url and "embedded_redis_started" not in events
