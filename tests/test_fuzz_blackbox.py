"""A 30-second run of the black-box fuzzer (tests/fuzz/blackbox.py, ``just fuzz``) in every
``just test``: a real daemon process, two nodes, three witnesses, hostile traffic on all three
listeners. A fresh seed each run (printed, with the line that replays it)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_30_second_black_box_run():
    seed = random.SystemRandom().getrandbits(32)
    done = subprocess.run([sys.executable, "-m", "tests.fuzz.blackbox", "--seconds", "30", "--seed", str(seed)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(done.stdout[-5000:], done.stderr[-3000:])
    assert done.returncode == 0, f"fuzz seed {seed} failed (just fuzz --seed {seed}):\n{done.stdout[-3000:]}"
    assert '"ok": true' in done.stdout.splitlines()[-1]
