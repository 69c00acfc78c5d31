"""The live status page in a real headless Chromium (Debian's `chromium`), against a running daemon.

The ``chromium`` fixture (conftest.py) installs Chromium with apt-get when it is missing and
we are root (as on CI); elsewhere the test is skipped with the reason. Set STATUS_PAGE_SCREENSHOT=path to also
save a screenshot (docs/status-page.png was made that way).
"""

from __future__ import annotations

import os

import pytest
import trio

from .helpers import SPEECH_100MS, browser, session, start_node

pytestmark = pytest.mark.slow


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
