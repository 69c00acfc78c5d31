"""Structured logs: one event per line, ``key=value`` pairs, values quoted when needed.

Call :func:`event` (``event(log, "session_started", session_id=sid)``); never log audio or
secrets. :func:`setup` configures the root logger once for the process.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(**fields: Any) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "event=%s%s", name, (" " + kv(**fields)) if fields else "")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + _fmt(self.formatException(record.exc_info))
        return line


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("trio-websocket", "trio_websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
