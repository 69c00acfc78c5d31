"""The daemon's frame codec against trio-websocket's, on bare servers.

Issue "Half the CPU per session", item 3: the WebSocket layer is most of a frame's cost, and
an alternative frame codec is to be kept only for a large win (>= 1.5x on that layer). This
measured the upper bound of that win before the codec was built, and measures the codec now:
bare servers, each answering every frame with 2 bytes, fed the same real-time schedule by
bench/loadgen.py (its echo mode, in its own process), their frames per CPU-second compared in
interleaved rounds:

- ``trio-websocket``: the baseline of ``just bench`` (bench/load.py, ``ECHO_SERVER``);
- ``own``: a Trio TCP server that answers the upgrade itself and parses client frames with
  a few integer operations per frame (header, 16/64-bit lengths, the mask, unmasking the
  payload as wsproto does, with Python integers), answering each frame with a send of its own,
  as the baseline does. No validation beyond that (no UTF-8 check, no control frames but close): what a real
  codec would add costs more, so the ratio is an upper bound;
- ``daemon``: the daemon's own codec as it serves since 2026-12-07 (scheduler/edge/wsconn.py
  and wscodec.py: the upgrade through wsproto's handshake, every check of docs/security.md),
  the same bare answer to each frame.

    uv run python bench/codec.py --sessions 200 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402

OWN_SERVER = r"""
import base64, hashlib, sys, trio
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REPLY = b"\x82\x02ok"

def unmask(payload, mask):
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")

async def handler(stream):
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    buf = bytearray(rest)
    while True:
        off, n = 0, len(buf)
        while n - off >= 2:
            b0, b1 = buf[off], buf[off + 1]
            length, hdr = b1 & 0x7F, 2
            if length == 126:
                if n - off < 4:
                    break
                length, hdr = int.from_bytes(buf[off + 2:off + 4], "big"), 4
            elif length == 127:
                if n - off < 10:
                    break
                length, hdr = int.from_bytes(buf[off + 2:off + 10], "big"), 10
            mask = b""
            if b1 & 0x80:
                mask, hdr = bytes(buf[off + hdr:off + hdr + 4]), hdr + 4
            if n - off < hdr + length:
                break
            payload = bytes(buf[off + hdr:off + hdr + length])
            if mask:
                payload = unmask(payload, mask)
            off += hdr + length
            if b0 & 0x0F == 8:
                return
            await stream.send_all(REPLY)
        del buf[:off]
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data

trio.run(trio.serve_tcp, handler, int(sys.argv[1]))
"""

DAEMON_SERVER = r"""
import sys, trio
from trio_websocket import ConnectionClosed
from scheduler.edge.frames import FrameGuard
from scheduler.edge.wsconn import read_request

async def handler(stream):
    guard = FrameGuard(stream, "peer")
    request = await read_request(guard, 1 << 20)
    if request is None:
        return
    ws = await request.accept()
    try:
        while True:
            await ws.get_message()
            await ws.send_message(b"ok")
    except ConnectionClosed:
        pass
    finally:
        await guard.aclose()

trio.run(trio.serve_tcp, handler, int(sys.argv[1]))
"""


async def main(args: argparse.Namespace) -> dict:
    load_args = load.parser().parse_args(["--sessions", str(args.sessions), "--chunk-ms", str(args.chunk_ms),
                                          "--out", str(Path(args.out).with_suffix(".load.json"))])
    rounds = []
    with load.off_the_daemon(not args.no_pin) as _:
        cpus = load.DAEMON_CPUS if not args.no_pin else None
        for _ in range(args.rounds):
            row = {}
            for name, code in (("trio-websocket", load.ECHO_SERVER), ("own", OWN_SERVER), ("daemon", DAEMON_SERVER)):
                echo = await load.echo_baseline(load_args, cpus, args.seconds, code)
                row[name] = {"frames_per_cpu_s": echo["echo_frames_per_cpu_s"], "cpu_pct_of_core": echo["echo_cpu_pct_of_core"],
                             "frames_per_s": echo["echo_frames_per_s"], "generator_behind": echo["echo_generator_behind"]}
            base = row["trio-websocket"]["frames_per_cpu_s"]
            row["own_vs_trio_websocket"] = round(row["own"]["frames_per_cpu_s"] / base, 2)
            row["daemon_vs_trio_websocket"] = round(row["daemon"]["frames_per_cpu_s"] / base, 2)
            print(json.dumps(row), file=sys.stderr)
            rounds.append(row)
    return {"sessions": args.sessions, "chunk_ms": args.chunk_ms, "seconds": args.seconds, "rounds": rounds,
            "own_vs_trio_websocket": [r["own_vs_trio_websocket"] for r in rounds],
            "daemon_vs_trio_websocket": [r["daemon_vs_trio_websocket"] for r in rounds]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=200, help="connections (default 200)")
    p.add_argument("--chunk-ms", type=int, default=200, help="audio per frame (default 200 ms)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server per round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the servers to CPU 0 and the generator to CPU 1")
    p.add_argument("--out", default="bench/results/codec.json")
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    result = trio.run(main, a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
