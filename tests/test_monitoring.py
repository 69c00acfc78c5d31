"""deploy/grafana/scheduler.json, deploy/prometheus/{rules,alerts}.yml and docs/runbook.md
(docs/operations.md, "Dashboard and alerts"), proven with Debian's Prometheus:

- ``promtool check rules`` and ``promtool test rules`` (deploy/prometheus/alerts_test.yml:
  every alert fires on a broken instance's synthetic series, none on a healthy one's);
- every alert carries what the runbook promises (severity, a summary naming the instance and
  the value, a runbook_url whose section exists);
- a real Prometheus scrapes a real daemon and a real ``--workers 2`` supervisor (one Redis:
  the supervisor's sessions reach the daemon's nodes over the relay) under a little load,
  and every dashboard query, variable and recording rule returns data, every rule evaluates
  without error.

The ``prometheus`` fixture (conftest.py) installs Debian's package with apt-get when it is
missing and the tests run as root (as on CI); elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import trio
import yaml

from scheduler.reference.node import NodeOptions, ReferenceNode

from .helpers import SPEECH_100MS, peer, speak
from .test_workers import Supervisor

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "scheduler.json"
RUNBOOK = ROOT / "docs" / "runbook.md"


def _alerts() -> list[dict]:
    return [rule for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def _recorded() -> list[str]:
    return [rule["record"] for group in yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
            for rule in group["rules"]]


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, with Grafana's variables as Prometheus
    would get them for "All" (a ``worker=~".*"`` also matches series without the label)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    out = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$worker", ".*")
            out.append((panel["title"], expr))
    return out


def test_promtool_checks_the_rules(prometheus):
    _, promtool = prometheus
    done = subprocess.run([promtool, "check", "rules", str(PROM / "rules.yml"), str(PROM / "alerts.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_when_broken_and_stays_silent_when_healthy(prometheus):
    _, promtool = prometheus
    done = subprocess.run([promtool, "test", "rules", str(PROM / "alerts_test.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    assert tested == {rule["alert"] for rule in _alerts()}  # each alert, both ways


def test_every_alert_has_a_severity_a_summary_and_its_runbook_section():
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.M)}
    names = [rule["alert"] for rule in _alerts()]
    assert len(names) == len(set(names)) >= 8
    for rule in _alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        summary = rule["annotations"]["summary"]
        assert "$labels.instance" in summary and "$value" in summary, rule["alert"]
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == rule["alert"].lower() and anchor in headings, rule["alert"]


def test_the_dashboard_reads_only_known_series():
    """Every metric a panel names is one the daemon exposes (docs/operations.md, "Metrics")
    or a recording rule: a renamed metric fails here before it leaves a panel empty."""
    documented = set(re.findall(r"`(scheduler_\w+)", (ROOT / "docs" / "operations.md").read_text()))
    recorded = set(_recorded())
    for title, expr in _dashboard_queries():
        for name in re.findall(r"\b(\w+:scheduler_[\w:]+|scheduler_\w+|process_\w+)", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in recorded or base in documented or name.startswith("process_"), (title, name)


# ------------------------------------------------------------------ against a real Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _start_prometheus(binary: str, tmp: Path, targets: list[str]) -> tuple[subprocess.Popen, int]:
    """Prometheus on a free port, scraping ``targets`` every second as job "scheduler", with
    the rules and alerts loaded; returns once it is ready. (Blocking: run it in a thread, so
    that the in-process daemon and nodes keep their heartbeats meanwhile.)"""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM / "rules.yml"), str(PROM / "alerts.yml")],
        "scrape_configs": [{"job_name": "scheduler", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    with open(tmp / "prometheus.log", "w") as log:
        proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return proc, port
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((tmp / "prometheus.log").read_text())
        time.sleep(0.2)


async def _talk(url: str, stop: trio.Event, counts: dict) -> None:
    """One client: utterances ended by is_final, each waited for, until ``stop``."""
    async with peer(url + "/v1/session") as p:
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en", "de"])
        ready = await p.recv()
        if ready["type"] != "session_ready":
            counts["refused"] += 1
            return
        while not stop.is_set():
            await speak(p)
            await p.send(type="audio_chunk", data=base64.b64encode(SPEECH_100MS).decode(), is_final=True)
            result, _ = await p.recv_until("result", timeout=20)
            counts[result["status"]] = counts.get(result["status"], 0) + 1


async def _all_return_data(port: int, queries: list[tuple[str, str]], within_s: float) -> list[tuple[str, str]]:
    """The queries still empty after up to ``within_s`` (asked again every second)."""
    missing = queries
    deadline = trio.current_time() + within_s
    while missing and trio.current_time() < deadline:
        await trio.sleep(1)
        answers = [await trio.to_thread.run_sync(lambda q=q: _api(port, "query", query=q)) for _, q in missing]
        missing = [pair for pair, answer in zip(missing, answers, strict=True) if not answer["data"]["result"]]
    return missing


@pytest.mark.slow
async def test_a_real_prometheus_gets_data_for_every_panel_and_rule(prometheus, start_daemon, redis_url, tmp_path, nursery):
    binary, _ = prometheus
    daemon = await start_daemon(max_sessions=2, instance_id="solo")  # (a third session is refused: that panel too)
    for n in range(2):
        node = ReferenceNode(NodeOptions(url=daemon.ws_url, node_id=f"n{n}", reconnect=False, delay_ms=100, max_jobs=4,
                                         lang_pairs=(("zh", "en"), ("zh", "de"))))
        await nursery.start(node.run)
    # (both waits block: in a thread, so that the nodes' heartbeats here go on meanwhile)
    sup = await trio.to_thread.run_sync(lambda: Supervisor(tmp_path, "--redis-url", redis_url, "--instance-id", "box"))
    prom = None
    try:
        prom, port = await trio.to_thread.run_sync(
            _start_prometheus, binary, tmp_path, [f"127.0.0.1:{daemon.admin_port}", f"127.0.0.1:{sup.admin_port}"])
        stop, counts = trio.Event(), {"refused": 0}
        async with trio.open_nursery() as clients:
            for url in [daemon.ws_url] * 3 + [sup.ws_url] * 4:  # the box has no node: its jobs are relayed
                clients.start_soon(_talk, url, stop, counts)
            queries = ([(title, q) for title, q in _dashboard_queries()] + [(name, name) for name in _recorded()]
                       + [("up", 'up{job="scheduler"} == 1')])
            missing = await _all_return_data(port, queries, within_s=60)
            stop.set()
        assert not missing, (missing, counts)
        assert counts["refused"] >= 1 and counts.get("SUCCESS", 0) > 0, counts
        up = await trio.to_thread.run_sync(lambda: _api(port, "query", query='up{job="scheduler"} == 1'))
        assert len(up["data"]["result"]) == 2  # the daemon and the box
        for variable in ("instance", "worker"):  # the dashboard's variables
            values = await trio.to_thread.run_sync(
                lambda v=variable: _api(port, f"label/{v}/values", **{"match[]": "scheduler_sessions_active"}))
            assert values["data"], variable
        groups = (await trio.to_thread.run_sync(lambda: _api(port, "rules")))["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == len(_recorded()) + len(_alerts())
        assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=20)
        await trio.to_thread.run_sync(sup.close)
