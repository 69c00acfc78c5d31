"""Structured logs: one event per line, JSON when stderr is not a terminal, key=value otherwise.

Call :func:`event` (``event(log, "session_started", session_id=sid)``); the event name and
fields go out as JSON keys (``{"ts":..., "level":"info", "logger":..., "event":
"session_started", "session_id":...}``) or as ``event=session_started session_id=...``.
Never log audio or secrets. :func:`setup` configures the root logger once for the process.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


def _fmt(value: Any) -> str:
    text = str(value)
    if not text.isprintable():  # control characters, line breaks, lone surrogates: escaped, one line always
        return '"' + ascii(text)[1:-1].replace('"', '\\"') + '"'
    if text == "" or any(c in text for c in ' ="\\'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def kv(**fields: Any) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, *, exc_info: bool = False, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "event=%s%s", name, (" " + kv(**fields)) if fields else "",
                   extra={"event": name, "fields": fields}, exc_info=exc_info)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"ts={_timestamp(record)} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + _fmt(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        name = getattr(record, "event", None)
        if name is not None:
            out["event"] = name
            out.update({k: v for k, v in record.fields.items() if v is not None})
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = json.dumps(out, default=str, ensure_ascii=False)
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: escape it rather than fail the write
                line = json.dumps(out, default=str)
        return line


def setup(level: str = "info", *, json_lines: bool | None = None) -> None:
    """Log to stderr at ``level``; JSON lines unless stderr is a terminal (or as ``json_lines`` says)."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = not sys.stderr.isatty() if json_lines is None else json_lines
    handler.setFormatter(JsonFormatter() if use_json else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("trio-websocket", "trio_websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
