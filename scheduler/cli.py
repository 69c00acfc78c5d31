"""Command line: ``scheduler serve | status | node | client`` (also ``python -m scheduler``)."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import ssl
import sys
from collections.abc import Sequence

import trio

from scheduler import __version__
from scheduler.ops import config, gcwatch, logs

DESCRIPTION = """\
Real-time speech job scheduler. Clients stream audio over WebSocket (/v1/session); the
daemon cuts it into utterances, dispatches jobs to worker nodes (/v1/node) through Lua
scripts on Redis/Valkey, and streams results back in order.

commands:
  serve    run the daemon (embedded Valkey unless --redis-url is given)
  status   print the cluster (instances, nodes, language pairs) from an admin port
  node     run the reference worker node (fake, or pocketsphinx + Apertium: real speech and MT)
  client   stream a WAV file to the daemon and print the results

Run 'scheduler COMMAND --help' for the options of each command.
"""

SERVE_EPILOG = """\
Every option can also be set by its environment variable (shown in each help line) or in
the TOML config file under its own name (pause_ms = 800). A flag wins over the environment,
which wins over the file, which wins over the default.
Endpoints: ws://WS_HOST:WS_PORT/v1/session (clients), /v1/node (nodes);
http://ADMIN_HOST:ADMIN_PORT/metrics, /healthz, /readyz.
Signals: SIGTERM or SIGINT drains (sessions finish, bounded by --drain-timeout-ms), a second one exits at once.
"""


def _lang_pair(text: str) -> tuple[str, str]:
    src, sep, tgt = text.partition(":")
    if not sep or not src or not tgt:
        raise argparse.ArgumentTypeError(f"expected SRC:TGT like zh:en, got {text!r}")
    return src, tgt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scheduler", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon", description="Run the scheduler daemon.",
                           epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(serve)

    cfg = sub.add_parser("config", help="check a configuration", description="Configuration tools.")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    check = cfg_sub.add_parser("check", help="validate settings and print the effective configuration",
                               description="Validate the config file, environment and flags exactly as 'serve' "
                                           "would, and print the effective settings as TOML with where each came "
                                           "from. Exit code 2 (and the offending key) on a bad configuration.",
                               epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(check)

    _add_node_parser(sub)
    _add_client_parser(sub)
    _add_status_parser(sub)
    return parser


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="print the cluster from an admin port",
                            description="Print the cluster as Redis knows it (GET /cluster on the admin port of any "
                                        "instance or --workers supervisor: every one answers the same): instances "
                                        "with their sessions and jobs, nodes with slots and load scores, per "
                                        "language pair the nodes that can take a job and their free slots, and the "
                                        "balance of jobs over nodes. Exit code 1 when the port cannot be read.",
                            epilog="The admin token (the daemon's --admin-token) is read from SCHEDULER_ADMIN_TOKEN, "
                                   "or from the file named by --admin-token-file / SCHEDULER_ADMIN_TOKEN_FILE; "
                                   "never give it on the command line.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    status.add_argument("--url", default="http://127.0.0.1:8766", metavar="ADMIN",
                        help="the admin URL of an instance or supervisor")
    status.add_argument("--json", action="store_true", help="print the /cluster JSON instead of tables")
    status.add_argument("--admin-token-file", default=None, metavar="FILE", help="read the admin token from FILE")
    status.add_argument("--cafile", default=None, metavar="PEM",
                        help="for https://: trust the certificates in this file instead of the system's trust store")


def _add_client_parser(sub: argparse._SubParsersAction) -> None:
    client = sub.add_parser("client", help="stream a WAV file and print results",
                            description="Stream a mono 16-bit PCM WAV file to the daemon and print every message "
                                        "(finalized utterances, results with latency). Exits 0 when every "
                                        "finalized utterance got its result and the session closed normally.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    client.add_argument("--url", action="append", metavar="URL",
                        help="daemon WebSocket URL (/v1/session is appended); repeat it to name several instances: "
                             "when one goes away (or drains) the session resumes on the next (default ws://127.0.0.1:8765)")
    client.add_argument("--wav", required=True, help="mono 16-bit PCM WAV file")
    client.add_argument("--src", default="zh", help="source language")
    client.add_argument("--tgt", action="append", metavar="LANG", help="target language, repeatable (default: en)")
    client.add_argument("--chunk-ms", type=int, default=100, help="audio per binary frame")
    client.add_argument("--fast", action="store_true", help="send as fast as possible instead of real time")
    client.add_argument("--json", action="store_true", help="print the daemon's messages as raw JSON lines")
    client.add_argument("--api-key", default=None, help="API key (the daemon's --client-api-keys), sent in the handshake")
    client.add_argument("--cafile", default=None, metavar="PEM",
                        help="for wss://: trust the certificates in this file instead of the system's trust store")
    client.add_argument("--log-level", default="warning", help="debug, info, warning, error")


def _tls_client(cafile: str | None) -> ssl.SSLContext | None:
    """A client context trusting ``cafile`` (None: trio-websocket's default, the system's store)."""
    return ssl.create_default_context(cafile=cafile) if cafile else None


def _settings(args: argparse.Namespace, sources: dict[str, str] | None = None) -> config.Settings | None:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config_command")}
    try:
        return config.from_sources(flags, sources=sources)
    except (config.ConfigError, ValueError) as exc:
        print(f"scheduler: bad configuration: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from scheduler.ops.redis_policy import UnsafeRedis
    from scheduler.ops.supervisor import supervise, worker_count
    from scheduler.server import serve
    from scheduler.store import layout
    from scheduler.store.keys import KeySpace

    settings = _settings(args)
    if settings is None:
        return 2
    logs.setup(settings.log_level)
    # Everything loaded so far (modules, numpy, redis-py, ...) lives as long as the process:
    # keep it out of the cyclic GC's scans, which otherwise stop the event loop for tens of
    # ms per full collection under load (bench/load.py, docs/performance.md); and collect
    # less often (ops/gcwatch.py: each young collection costs ~2 ms however small).
    gc.collect()
    gc.freeze()
    gcwatch.tune()
    unsafe: UnsafeRedis | None = None
    try:
        if worker_count(settings.workers) > 1:
            preflight = functools.partial(layout.check_url, space=KeySpace(settings.redis_shards))
            trio.run(functools.partial(supervise, preflight=preflight), settings)
        else:
            trio.run(serve, settings)
    except* UnsafeRedis as group:
        unsafe = group.exceptions[0]
    if unsafe is not None:
        print(f"scheduler: {unsafe}", file=sys.stderr)
        return 2
    return 0


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.config_command != "check":
        parser.parse_args(["config", "--help"])
    sources: dict[str, str] = {}
    settings = _settings(args, sources)
    if settings is None:
        return 2
    print(config.render(settings, sources))
    return 0


def _add_node_parser(sub) -> None:
    from scheduler.node import command as node_command

    node = sub.add_parser("node", help="run the reference worker node",
                          description="Reference worker node, built on the node library (scheduler.node, "
                                      "docs/nodes.md) with two plug-ins: speech (--asr) and translation (--mt). "
                                      "Real speech to real Spanish: --asr pocketsphinx --mt apertium --lang-pair "
                                      "en:es. Reconnects with backoff over its --url list; SIGTERM drains.",
                          epilog=node_command.EPILOG)
    node_command.add_arguments(node, max_jobs=4)
    node.add_argument("--lang-pair", action="append", type=_lang_pair, metavar="SRC:TGT",
                      help="a language pair served, repeatable (default: en:es with --asr pocketsphinx or --mt "
                           "apertium, whose models are English and English-Spanish here; zh:en otherwise)")
    node.add_argument("--pool", action="append", metavar="NAME",
                      help="pool to join, repeatable (default: one pool per pair named SRC-TGT)")
    node.add_argument("--asr", "--engine", dest="asr", choices=["fake", "pocketsphinx"], default="fake",
                      help="fake: answer with the audio's duration and CRC-32; pocketsphinx: transcribe English with "
                           "the model bundled in the pocketsphinx package (pip install 'speech-scheduler[asr]') "
                           "(default fake)")
    node.add_argument("--mt", choices=["echo", "apertium"], default="echo",
                      help="echo: the transcript tagged with the target language (a placeholder); apertium: real "
                           "offline translation by Debian's Apertium (apt-get install apertium apertium-eng-spa; "
                           "'apertium -l' lists the pairs installed) (default echo)")
    node.add_argument("--delay-ms", type=int, default=200, help="wait this long before each job (tests, demos; default 200)")
    node.add_argument("--jitter-ms", type=int, default=0, help="random extra wait per job, 0..JITTER (default 0)")
    node.add_argument("--fail-rate", type=float, default=0.0, help="fraction of jobs answered with an error (default 0)")


def _node(args: argparse.Namespace) -> int:
    from scheduler.node import from_arguments
    from scheduler.node.runner import DEFAULT_URL
    from scheduler.reference.node import NodeOptions, ReferenceNode

    logs.setup(args.log_level)
    common = from_arguments(args)
    urls = common.get("urls") or [DEFAULT_URL]
    real = args.asr == "pocketsphinx" or args.mt == "apertium"
    options = NodeOptions(url=urls[0], more_urls=tuple(urls[1:]),
                          lang_pairs=tuple(args.lang_pair or [("en", "es") if real else ("zh", "en")]),
                          pools=tuple(args.pool) if args.pool else None, max_jobs=common["max_jobs"],
                          delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, fail_rate=args.fail_rate,
                          token=common.get("token"), engine=args.asr, mt=args.mt, drain_timeout_s=common["drain_timeout_s"],
                          ssl_context=common.get("ssl_context"),
                          **{k: common[k] for k in ("node_id", "metrics_port", "metrics_host") if k in common})
    try:
        node = ReferenceNode(options)
    except (RuntimeError, ValueError) as exc:
        print(f"scheduler node: {exc}", file=sys.stderr)
        return 2
    code = node.node.main()
    if code == 2:
        print("scheduler node: refused by the daemon (see the node_refused log line)", file=sys.stderr)
    return code


def _client(args: argparse.Namespace) -> int:
    from scheduler.reference.client import WavError, print_line, read_wav, stream_session

    logs.setup(args.log_level)
    urls = args.url or ["ws://127.0.0.1:8765"]
    try:
        pcm, rate = read_wav(args.wav)
    except (OSError, WavError) as exc:
        print(f"scheduler client: {exc}", file=sys.stderr)
        return 2
    try:
        transcript = trio.run(lambda: stream_session(urls, pcm, src_lang=args.src, tgt_langs=args.tgt or ["en"],
                                                     sample_rate=rate, chunk_ms=args.chunk_ms, fast=args.fast,
                                                     out=print_line, as_json=args.json, api_key=args.api_key,
                                                     ssl_context=_tls_client(args.cafile)))
    except OSError as exc:
        print(f"scheduler client: cannot connect to {', '.join(urls)}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0 if transcript.complete and not transcript.errors else 1


def _status(args: argparse.Namespace) -> int:
    from scheduler.ops.status_cli import StatusError, admin_token, fetch_cluster, render

    try:
        cluster = fetch_cluster(args.url, admin_token(args.admin_token_file), args.cafile)
    except StatusError as exc:
        print(f"scheduler status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(cluster, indent=2) if args.json else render(cluster))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "node":
        return _node(args)
    if args.command == "client":
        return _client(args)
    if args.command == "config":
        return _config(args, parser)
    if args.command == "status":
        return _status(args)
    parser.print_help()
    return 2
