"""``scheduler status``: the cluster at a glance, from any instance's (or a supervisor's) admin port.

Reads ``GET /cluster`` (cluster/overview.py) and prints it as tables, or as the JSON itself
with ``--json``. The admin token, when the daemon has one, comes from the environment
(``SCHEDULER_ADMIN_TOKEN``) or a file (``--admin-token-file`` / ``SCHEDULER_ADMIN_TOKEN_FILE``),
never from the command line, where other users of the box could read it.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from scheduler.ops import secrets

DEFAULT_URL = "http://127.0.0.1:8766"


class StatusError(Exception):
    """The admin port could not be read; the message says why (never the token)."""


def admin_token(token_file: str | None) -> str | None:
    """The first admin token: ``token_file``, else ``SCHEDULER_ADMIN_TOKEN_FILE``, else
    ``SCHEDULER_ADMIN_TOKEN`` (several, comma-separated, as the daemon takes them)."""
    path = token_file or os.environ.get("SCHEDULER_ADMIN_TOKEN_FILE")
    try:
        raw = Path(path).read_text() if path else os.environ.get("SCHEDULER_ADMIN_TOKEN")
    except OSError as exc:
        raise StatusError(f"cannot read the admin token file: {exc.strerror}") from None
    tokens = secrets.tokens(raw.strip()) if raw else []
    return tokens[0] if tokens else None


def fetch_cluster(url: str, token: str | None, cafile: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/cluster",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        hint = " (set SCHEDULER_ADMIN_TOKEN or --admin-token-file)" if exc.code == 401 else ""
        raise StatusError(f"{url}/cluster answered HTTP {exc.code}{hint}") from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read {url}/cluster: {getattr(exc, 'reason', exc)}") from None


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _state(n: dict[str, Any]) -> str:
    if not n["online"]:
        return "offline"
    return "draining" if n["draining"] else "saturated" if n["saturated"] else "online"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(cluster: dict[str, Any]) -> str:
    """The cluster as plain-text tables (what ``scheduler status`` prints)."""
    t, b = cluster["totals"], cluster["balance"]
    out = [f"instances ({t['instances']}): {t['sessions']} sessions, {t['jobs_in_flight']} jobs in flight, "
           f"{t['jobs_waiting']} waiting"]
    out += _table(["INSTANCE", "SESSIONS", "NODES", "IN FLIGHT", "WAITING", "WEBSOCKET"],
                  [[i["instance_id"], i["sessions"], i["nodes"], i["jobs_in_flight"], i["jobs_waiting"], i["ws_url"]]
                   for i in cluster["instances"]])
    out += ["", f"nodes ({len(cluster['nodes'])}, {t['nodes_online']} online)"]
    out += _table(["NODE", "STATE", "SLOTS", "LOAD SCORE", "INSTANCE", "PAIRS"],
                  [[n["node_id"], _state(n), f"{n['current_jobs']}/{n['max_jobs']}", _score(n["load_score"]), n["owner"],
                    " ".join(f"{s}-{g}" for s, g in n["lang_pairs"])] for n in cluster["nodes"]])
    out += ["", "language pairs"]
    out += _table(["PAIR", "NODES", "ELIGIBLE", "FREE / SLOTS", "LOAD"],
                  [[f"{p['src_lang']}-{p['tgt_lang']}", p["nodes"], p["eligible"], f"{p['free_slots']}/{p['slots']}",
                    _score(p["load"])] for p in cluster["lang_pairs"]])
    cv = "-" if b["cv"] is None else f"{b['cv']:.2f}"
    out += ["", f"balance of jobs over online nodes: mean {b['mean']}, stddev {b['stddev']}, stddev/mean {cv}"]
    return "\n".join(out)
