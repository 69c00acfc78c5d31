"""The command line every node shares: where the daemons are, who the node is, its token.

:func:`run_node` gives a node file its ``--help`` and flags in one call; ``scheduler node``
(the reference node) adds its engines' flags to the same :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from scheduler.node.job import Handler
from scheduler.node.runner import DEFAULT_URL, TOKEN_ENV, Node, read_token
from scheduler.ops import logs

URLS_ENV = "SCHEDULER_NODE_URLS"

EPILOG = f"""Environment: {URLS_ENV} (comma-separated daemon URLs, when no --url), {TOKEN_ENV} (the
registration token, when neither --token nor --token-file). SIGTERM or Ctrl-C: the node drains
(tells the daemon, answers the jobs it holds, leaves); a second one stops it at once."""


def add_arguments(parser: argparse.ArgumentParser, *, max_jobs: int = 1) -> None:
    parser.add_argument("--url", action="append", metavar="URL",
                        help=f"a daemon's WebSocket URL (/v1/node is appended), repeatable: tried in turn when one is "
                             f"down (default: ${URLS_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--node-id", default=None, help="node id (default: node-<random>)")
    parser.add_argument("--max-jobs", type=int, default=max_jobs, help=f"jobs held at once (default {max_jobs})")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="read the registration token from FILE (the first of several comma-separated ones)")
    parser.add_argument("--token", default=None, help=f"registration token (the daemon's --node-token); visible to other "
                                                      f"users in the process list: prefer --token-file or ${TOKEN_ENV}")
    parser.add_argument("--cafile", default=None, metavar="PEM",
                        help="for wss://: trust the certificates in this file instead of the system's trust store")
    parser.add_argument("--drain-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="on SIGTERM, how long to wait for the jobs held before leaving anyway (their daemon then "
                             "gives them to another node; default 60)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus /metrics, /healthz and /readyz (200 while registered) on this port "
                             "(0: any free one; default: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default 127.0.0.1)")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error (default info)")


def from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`Node` keyword arguments from :func:`add_arguments`' flags: only those given (a
    URL list or token the node's code passes stays unless a flag or the environment names
    one). The token is read here: an unreadable --token-file exits with code 2 and the reason."""
    kwargs: dict[str, Any] = {"max_jobs": args.max_jobs, "drain_timeout_s": args.drain_timeout}
    urls = args.url or [u.strip() for u in os.environ.get(URLS_ENV, "").split(",") if u.strip()]
    if urls:
        kwargs["urls"] = urls
    try:
        token = read_token(args.token, args.token_file)
    except OSError as exc:
        _exit(f"cannot read --token-file: {exc.strerror}")
    except ValueError as exc:  # (secrets.SecretError: the systemd credential is unreadable or empty)
        _exit(str(exc))
    if token:
        kwargs["token"] = token
    if args.cafile:
        kwargs["ssl_context"] = ssl.create_default_context(cafile=args.cafile)
    if args.node_id:
        kwargs["node_id"] = args.node_id
    if args.metrics_port is not None:
        kwargs["metrics_port"], kwargs["metrics_host"] = args.metrics_port, args.metrics_host
    return kwargs


def run_node(handler: Handler, *, lang_pairs: Sequence[tuple[str, str]], max_jobs: int = 1, argv: Sequence[str] | None = None,
             description: str | None = None, **node_kwargs: Any) -> int:
    """Parse the node flags (``--url``, ``--token-file``, ``--max-jobs`` ...), log as the
    daemon does, run a :class:`Node` around ``handler`` until SIGTERM; the exit code."""
    parser = argparse.ArgumentParser(description=description or (handler.__doc__ or "").strip() or None, epilog=EPILOG)
    add_arguments(parser, max_jobs=max_jobs)
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    try:
        node = Node(handler, lang_pairs=lang_pairs, **{**node_kwargs, **from_arguments(args)})
    except ValueError as exc:
        _exit(f"bad node settings: {exc}")
    return node.main()


def _exit(message: str) -> None:
    """A setting the node cannot start with: the reason on stderr, exit code 2."""
    print(f"node: {message}", file=sys.stderr)
    raise SystemExit(2)
