"""scheduler-client.js (the browser client, /app is built on it) resumes with its session's
resume_token: run as an ES module under Node.js (its WebSocket is the WHATWG one, behind
``--experimental-websocket`` on Node 20), against two daemons on one Valkey; the first
drains mid-session and the client goes on on the second. Skipped where there is no node."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from .helpers import session, start_node

JS_CLIENT = Path(__file__).resolve().parent.parent / "scheduler" / "ops" / "static" / "scheduler-client.js"

PRELUDE = """
import { SchedulerClient } from "%(module)s";
const out = (o) => process.stdout.write(JSON.stringify(o) + "\\n");
const client = new SchedulerClient({ urls: %(urls)s, srcLang: "zh", tgtLangs: ["en"], maxReconnects: 4 });
for (const name of ["ready", "result", "closed", "error", "reconnecting"]) {
  client.addEventListener(name, (e) => out({ event: name, ...JSON.parse(JSON.stringify(e.detail, (k, v) =>
    k === "result" ? { utterance_index: v.utterance_index, status: v.status } : v)) }));
}
"""

SCRIPT = PRELUDE + """
const tone = () => {  // 100 ms of a 440 Hz tone at 16 kHz
  const frame = new Int16Array(1600);
  for (let i = 0; i < frame.length; i++) frame[i] = Math.round(8000 * Math.sin((2 * Math.PI * 440 * i) / 16000));
  return frame;
};
const utter = () => { for (let i = 0; i < 3; i++) client.sendAudio(tone()); client.finalize(); };
const next = (name) => new Promise((resolve) => client.addEventListener(name, resolve, { once: true }));
await client.start();
utter();
await next("result");
out({ event: "drain_now", token_kept: typeof client._resumeToken === "string" && client._resumeToken.length >= 22 });
const resumed = await next("ready");
utter();
await next("result");
client.finish();
await next("closed");
"""


@pytest.mark.slow
async def test_the_js_client_resumes_on_another_daemon_with_its_token(start_daemon, nursery, tmp_path):
    node_js = shutil.which("node")
    if node_js is None:
        pytest.skip("needs Node.js (node) for the browser client's module")
    a, b = await start_daemon(), await start_daemon()
    await start_node(nursery, b, node_id="nb", delay_ms=10)  # on b: a drains under it (a's jobs go over the relay)
    script = tmp_path / "resume.mjs"
    script.write_text(SCRIPT % {"module": JS_CLIENT.as_uri(), "urls": json.dumps([a.ws_url, b.ws_url])})
    events, code, stderr = await _run_node(node_js, script, lambda e: a.shutdown() if e["event"] == "drain_now" else None)
    # (drain_now: session_closed(shutdown), and the client resumes on b)
    assert code == 0, (events, stderr)
    names = [e["event"] for e in events]
    readies = [e for e in events if e["event"] == "ready"]
    assert [r["resumed"] for r in readies] == [False, True], events
    assert readies[0]["sessionId"] == readies[1]["sessionId"]
    assert [e["result"]["utterance_index"] for e in events if e["event"] == "result"] == [0, 1], events
    assert all(e["result"]["status"] == "SUCCESS" for e in events if e["event"] == "result")
    assert events[names.index("drain_now")]["token_kept"] and names[-1] == "closed" and events[-1]["reason"] == "client_close"
    assert b.metrics.sessions_resumed_total._value.get() == 1
    assert a.metrics.resume_refused_total.labels("denied")._value.get() == 0 == b.metrics.resume_refused_total.labels("denied")._value.get()


async def _run_node(node_js: str, script: Path, on_event=lambda event: None) -> tuple[list[dict], int, bytes]:
    """Run ``script`` under Node.js; its stdout lines as events (``on_event`` sees each as it
    comes), its exit code and (when it failed) its stderr."""
    events: list[dict] = []
    proc = await trio.lowlevel.open_process([node_js, "--experimental-websocket", "--no-warnings", str(script)],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        buffer = b""
        with trio.fail_after(60):
            while chunk := await proc.stdout.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    events.append(json.loads(line))
                    on_event(events[-1])
            await proc.wait()
        stderr = await proc.stderr.receive_some() if proc.returncode else b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return events, proc.returncode, stderr


FULL_SCRIPT = PRELUDE + """const frame = new Int16Array(1600);
for (let i = 0; i < frame.length; i++) frame[i] = Math.round(8000 * Math.sin((2 * Math.PI * 440 * i) / 16000));
await client.start();
for (let i = 0; i < 3; i++) client.sendAudio(frame);
client.finalize();
await new Promise((resolve) => client.addEventListener("result", resolve, { once: true }));
client.finish();
await new Promise((resolve) => client.addEventListener("closed", resolve, { once: true }));
"""


@pytest.mark.slow
async def test_the_js_client_waits_retry_after_ms_when_the_daemon_is_full(start_daemon, nursery, tmp_path):
    node_js = shutil.which("node")
    if node_js is None:
        pytest.skip("needs Node.js (node) for the browser client's module")
    running = await start_daemon(max_sessions=2)  # one new session at a time (reserve 1)
    await start_node(nursery, running, node_id="n1", delay_ms=10)

    async def hold_then_leave():
        async with session(running):
            await trio.sleep(0.5)

    nursery.start_soon(hold_then_leave)
    await trio.sleep(0.2)
    script = tmp_path / "full.mjs"
    script.write_text(FULL_SCRIPT % {"module": JS_CLIENT.as_uri(), "urls": json.dumps([running.ws_url])})
    events, code, stderr = await _run_node(node_js, script)
    assert code == 0, (events, stderr)
    names = [e["event"] for e in events]
    assert names[:3] == ["error", "reconnecting", "ready"], events
    assert events[0]["error"]["code"] == "SERVER_FULL" and 800 <= events[1]["delayMs"] <= 3600, events
    assert [e["result"]["status"] for e in events if e["event"] == "result"] == ["SUCCESS"], events
