"""pytest plugin for ``lua_mutants.py``: load the Lua scripts from ``$LUA_MUTANT_DIR`` (a
mutated copy of ``luascripts/``) instead of the package's own."""

from __future__ import annotations

import os
from pathlib import Path

from scheduler.store import redis_adapter


def pytest_configure(config):
    directory = os.environ.get("LUA_MUTANT_DIR")
    if directory:
        redis_adapter.scripts_dir = lambda: Path(directory)
