"""The live status page in a real headless Chromium (Debian's `chromium`), against a running daemon.

The fixture installs Chromium with apt-get when it is missing and we are root (as on CI);
elsewhere the test is skipped with the reason. Set STATUS_PAGE_SCREENSHOT=path to also
save a screenshot (docs/status-page.png was made that way).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import trio

from .helpers import SPEECH_100MS, session, start_node

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def chromium():
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium); CI installs it as root")
    return path


def browser(chromium: str, profile: str, *args: str) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args]


async def test_status_page_shows_a_node_and_a_session(start_daemon, nursery, chromium, tmp_path):
    daemon = await start_daemon()
    await start_node(nursery, daemon, node_id="gpu-node-7", max_jobs=4)
    url = f"http://127.0.0.1:{daemon.admin_port}/"
    async with session(daemon) as s:
        await s.send_raw(SPEECH_100MS)
        await s.send(type="finalize")
        await s.recv_until("result")
        result = await trio.run_process(browser(chromium, str(tmp_path / "p1"), "--dump-dom", url),
                                        capture_stdout=True, capture_stderr=True, check=False)
        dom = result.stdout.decode()
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert "gpu-node-7" in dom and s.ready["session_id"] in dom, dom[-3000:]
        assert 'class="state ready"' in dom and "zh → en" in dom
        assert "#0" in dom and "en: SUCCESS" in dom  # the recent result
        shot = os.environ.get("STATUS_PAGE_SCREENSHOT")
        if shot:
            await trio.run_process(browser(chromium, str(tmp_path / "p2"), f"--screenshot={os.path.abspath(shot)}",
                                           "--window-size=1100,620", url), capture_stdout=True, capture_stderr=True)
