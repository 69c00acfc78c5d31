"""The load generator of `just bench`: N real-time sessions from one plain process, cheaply.

It runs as its own process (bench/load.py starts it), one thread, one ``epoll``: no event
loop library, no WebSocket library. Every client frame is encoded and masked once at start
(a fixed mask key is legal for a client, RFC 6455 only asks that it be unpredictable to
defeat proxy cache poisoning, which loopback has none of) and written to a non-blocking
socket at its due time; only what comes back is parsed. So the daemon, not the generator,
is what a run measures; at 1,000 sessions it costs a few percent of a core (docs/performance.md).

Modes:
- ``session`` (default): `/v1/session` sessions as bench/load.py describes (speech segments of
  0.6-3 s, ended by ``is_final`` as an ``audio_chunk`` text frame with probability
  ``--final-prob``, otherwise by a pause; then silence). ``--silence-only`` sends silence
  frames only (no utterance is ever cut).
- ``echo``: the same schedule of binary frames to a bare WebSocket server (bench/load.py's
  baseline), counting its answers.

Control, one JSON object per line: the generator prints ``{"event": "idle", ...}`` once every
session is ready or refused, waits for a line ``go`` on stdin, prints ``{"event": "active"}``
as it starts streaming and ``{"event": "streamed", ...}`` once the ``--duration`` is over (its
own CPU seconds in between, and whether it fell behind its schedule), then closes its
sessions, waits for their last results and writes everything it recorded to ``--report``
(JSON) and prints ``{"event": "done"}``. Times are ``time.perf_counter()`` (CLOCK_MONOTONIC,
the same clock in every process of the box).
"""

from __future__ import annotations

import argparse
import base64
import errno
import heapq
import json
import math
import os
import random
import resource
import select
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from scheduler.session.audio import tone

MASK = b"\x5a\x17\xc3\x81"
SPEECH, FINAL, SILENCE, START = 0, 1, 2, 3
OPEN_AT_ONCE = 64  # handshakes in flight while the sessions open
BEHIND_P99_S = 0.020  # a run whose sends were later than this at p99 is invalid: the generator was the limit


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN, masked with :data:`MASK`)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = (MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little") if n else b""
    return head + MASK + masked


def text(obj: dict[str, Any]) -> bytes:
    return ws_frame(0x1, json.dumps(obj).encode())


class Frames:
    """Every frame a client sends, encoded and masked once."""

    def __init__(self, args: argparse.Namespace) -> None:
        pcm = tone(args.chunk_ms, args.rate, amplitude=0.3)
        self.kinds = {
            SPEECH: ws_frame(0x2, pcm),
            FINAL: text({"type": "audio_chunk", "data": base64.b64encode(pcm).decode(), "is_final": True}),
            SILENCE: ws_frame(0x2, bytes(len(pcm))),
        }
        self.init = text({"type": "session_init", "src_lang": args.src, "tgt_langs": [args.tgt], "sample_rate": args.rate})
        self.close_session = text({"type": "close_session"})
        self.close = ws_frame(0x8, (1000).to_bytes(2, "big"))


def plan(rng: random.Random, args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    """(frame kind, utterance index) per tick; START (no frame) before each utterance, where a
    session that is past its duration stops."""
    chunk = args.chunk_ms / 1000
    index = 0
    while True:
        yield START, index
        speech = int(rng.uniform(0.6, 3.0) / chunk)
        final = rng.random() < args.final_prob and not args.silence_only
        for k in range(speech):
            yield (SILENCE if args.silence_only else FINAL if final and k == speech - 1 else SPEECH), index
        index += 1
        gap = rng.uniform(0.2, 1.0) if final else (args.pause_ms / 1000 + rng.uniform(0.3, 1.0))
        for _ in range(max(1, int(gap / chunk))):
            yield SILENCE, index


class Conn:
    """One client connection: its socket, its receive buffer, its schedule."""

    __slots__ = ("sock", "fd", "state", "rbuf", "out", "sid", "plan", "due", "asked", "frag", "closing_sent")

    def __init__(self, sock: socket.socket, plan_: Iterator[tuple[int, int]]) -> None:
        self.sock, self.fd = sock, sock.fileno()
        self.state = "connecting"  # -> handshake -> init -> ready -> closing -> done
        self.rbuf = bytearray()
        self.out = bytearray()
        self.sid = ""
        self.plan = plan_
        self.due = 0.0
        self.asked = time.perf_counter()
        self.frag = bytearray()
        self.closing_sent = False


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.frames = Frames(args)
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.rng = random.Random(args.seed)
        self.key = base64.b64encode(os.urandom(16)).decode()
        host, _, port = args.url.removeprefix("ws://").partition("/")[0].partition(":")
        self.addr = (host, int(port or 80))
        self.path = "/v1/session" if args.mode == "session" else "/"
        # what the report holds
        self.final: dict[tuple[str, int], tuple[float, str]] = {}
        self.result: dict[tuple[str, int], tuple[float, str]] = {}
        self.errors: dict[str, int] = {}
        self.admit_wait: list[float] = []
        self.send_lag: list[float] = []
        self.busy = 0
        self.answers = 0  # echo mode
        self.frames_sent = 0
        self.backpressured = 0  # frames that found the previous one still in the socket's queue
        self.stop_at = math.inf
        self.at_stop: tuple[float, float, int] | None = None  # (CPU s, time, frames sent) when the duration ended

    # ------------------------------------------------------------ sockets

    def open_one(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.error("CONNECT_FAILED")
            return
        conn = Conn(sock, plan(random.Random(self.rng.random()), self.args))
        self.conns[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLOUT | select.EPOLLIN)

    def send(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            self.backpressured += 1
            conn.out += data
            return
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.drop(conn, "CONNECTION_LOST")
            return
        if n < len(data):
            conn.out += data[n:]
            self.ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self, conn: Conn) -> None:
        if conn.state == "connecting":
            conn.state = "handshake"
            request = (f"GET {self.path} HTTP/1.1\r\nHost: {self.addr[0]}:{self.addr[1]}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
            self.ep.modify(conn.fd, select.EPOLLIN)
            self.send(conn, request.encode())
            return
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(conn, "CONNECTION_LOST")
            return
        del conn.out[:n]
        if not conn.out:
            self.ep.modify(conn.fd, select.EPOLLIN)

    def drop(self, conn: Conn, why: str | None) -> None:
        if conn.state == "done":
            return
        if why:
            self.error(why)
        conn.state = "done"
        self.conns.pop(conn.fd, None)
        try:
            self.ep.unregister(conn.fd)
        except OSError:
            pass
        conn.sock.close()

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    # ------------------------------------------------------------ receiving

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn, None if conn.state in ("closing", "done") else "CONNECTION_LOST")
            return
        buf = conn.rbuf
        buf += data
        if conn.state == "handshake":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:12])
            del buf[:end + 4]
            if not status.startswith(b"HTTP/1.1 101"):
                self.drop(conn, "HANDSHAKE_" + status[9:12].decode("ascii", "replace"))
                return
            if self.args.mode == "session":
                conn.state = "init"
                self.send(conn, self.frames.init)
            else:
                conn.state = "ready"
                self.admit_wait.append(time.perf_counter() - conn.asked)
        self.parse(conn, buf)

    def parse(self, conn: Conn, buf: bytearray) -> None:
        off, size = 0, len(buf)
        while size - off >= 2:
            b0, n = buf[off], buf[off + 1] & 0x7F
            head = 2
            if n == 126:
                if size - off < 4:
                    break
                n, head = int.from_bytes(buf[off + 2:off + 4], "big"), 4
            elif n == 127:
                if size - off < 10:
                    break
                n, head = int.from_bytes(buf[off + 2:off + 10], "big"), 10
            if size - off < head + n:
                break
            payload = bytes(buf[off + head:off + head + n])
            off += head + n
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.send(conn, ws_frame(0xA, payload))
            elif opcode == 0x8:
                self.drop(conn, None if conn.state == "closing" else "CLOSED_" + str(int.from_bytes(payload[:2], "big")))
                return
            elif opcode in (0x0, 0x1, 0x2):
                conn.frag += payload
                if b0 & 0x80:
                    message, conn.frag = bytes(conn.frag), bytearray()
                    self.message(conn, opcode, message)
                    if conn.state == "done":
                        return
        del buf[:off]

    def message(self, conn: Conn, opcode: int, payload: bytes) -> None:
        now = time.perf_counter()
        if self.args.mode == "echo":
            self.answers += 1
            return
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "utterance_finalized":
            self.final.setdefault((conn.sid, msg["utterance_index"]), (now, msg["reason"]))
        elif kind == "result":
            self.result[(conn.sid, msg["utterance_index"])] = (now, msg["status"])
        elif kind == "busy":
            self.busy += 1
        elif kind == "session_ready":
            conn.sid, conn.state = msg["session_id"], "ready"
            self.admit_wait.append(now - conn.asked)
        elif kind == "session_closed":
            self.drop(conn, None)
        elif kind == "error":
            self.error(str(msg.get("code"))[:40])
            if msg.get("fatal"):
                self.drop(conn, None)

    # ------------------------------------------------------------ the loop

    def poll(self, timeout: float) -> None:
        for fd, mask in self.ep.poll(max(0.0, timeout)):
            conn = self.conns.get(fd)
            if conn is None:
                continue
            if mask & select.EPOLLOUT:
                self.flush(conn)
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and conn.state != "done":
                self.readable(conn)

    def open_all(self) -> float:
        """Open every session, at most :data:`OPEN_AT_ONCE` handshakes at a time; seconds taken."""
        start = time.perf_counter()
        deadline = start + 120
        opened = 0
        while time.perf_counter() < deadline:
            pending = sum(1 for c in self.conns.values() if c.state not in ("ready", "done"))
            while opened < self.args.sessions and pending < OPEN_AT_ONCE:
                self.open_one()
                opened += 1
                pending += 1
            if opened == self.args.sessions and pending == 0:
                break
            self.poll(0.05)
        return time.perf_counter() - start

    def stream(self) -> None:
        """Every ready session on its real-time schedule until ``stop_at``, then close_session
        at its next utterance boundary."""
        chunk = self.args.chunk_ms / 1000
        now = time.perf_counter()
        self.stop_at = now + self.args.duration
        heap: list[tuple[float, int]] = []
        for conn in self.conns.values():
            if conn.state == "ready":
                conn.due = now + self.rng.random()  # spread the phase of the frames
                heap.append((conn.due, conn.fd))
        heapq.heapify(heap)
        frames = self.frames.kinds
        while heap:
            due = heap[0][0]
            self.poll(due - time.perf_counter())
            now = time.perf_counter()
            if self.at_stop is None and now >= self.stop_at:
                self.at_stop = (cpu_s(), now, self.frames_sent)
            while heap and heap[0][0] <= now:
                due, fd = heapq.heappop(heap)
                conn = self.conns.get(fd)
                if conn is None or conn.state != "ready":
                    continue
                kind, index = next(conn.plan)
                if kind == START:
                    if due >= self.stop_at:
                        self.finish(conn)
                        continue
                    kind, index = next(conn.plan)
                self.send_lag.append(now - due)
                if kind == FINAL:
                    self.final[(conn.sid, index)] = (time.perf_counter(), "is_final")
                self.send(conn, frames[kind])
                self.frames_sent += 1
                conn.due = due + chunk
                heapq.heappush(heap, (conn.due, fd))

    def finish(self, conn: Conn) -> None:
        if self.args.mode == "session":
            conn.state = "closing"
            self.send(conn, self.frames.close_session)
        else:
            conn.state = "closing"
            self.send(conn, self.frames.close)

    def drain(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while self.conns and time.perf_counter() < deadline:
            self.poll(min(0.2, deadline - time.perf_counter()))
        for conn in list(self.conns.values()):
            self.drop(conn, "NOT_CLOSED" if self.args.mode == "session" else None)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the daemon's (or echo server's) ws://HOST:PORT")
    p.add_argument("--mode", choices=("session", "echo"), default="session")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--chunk-ms", type=int, default=200)
    p.add_argument("--pause-ms", type=int, default=800)
    p.add_argument("--final-prob", type=float, default=0.5)
    p.add_argument("--silence-only", action="store_true")
    p.add_argument("--drain-s", type=float, default=16.0, help="how long closing sessions may take to deliver their last results")
    p.add_argument("--rate", type=int, default=16000)
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--report", required=True, help="JSON file for everything recorded")
    args = p.parse_args(argv)
    gen = Generator(args)
    open_s = gen.open_all()
    held = sum(1 for c in gen.conns.values() if c.state == "ready")
    say({"event": "idle", "held": held, "open_seconds": round(open_s, 2), "errors": gen.errors})
    if sys.stdin.readline().strip() != "go":
        return
    say({"event": "active", "t": time.perf_counter()})
    cpu0, t0 = cpu_s(), time.perf_counter()
    gen.stream()  # returns once every session passed its duration (at an utterance boundary)
    cpu1, t1, frames = gen.at_stop or (cpu_s(), time.perf_counter(), gen.frames_sent)
    lag99 = pct(gen.send_lag, 99)
    streamed = {"event": "streamed", "t": t1, "seconds": round(t1 - t0, 2), "cpu_s": round(cpu1 - cpu0, 3),
                "cpu_pct_of_core": round((cpu1 - cpu0) / (t1 - t0) * 100, 1), "frames_sent": frames,
                "send_lag_ms": {"p50": round(1000 * (pct(gen.send_lag, 50) or 0), 2), "p99": round(1000 * (lag99 or 0), 2),
                                "max": round(1000 * max(gen.send_lag, default=0), 2)},
                "behind": lag99 is not None and lag99 > BEHIND_P99_S, "backpressured_frames": gen.backpressured,
                "answers": gen.answers}
    say(streamed)
    gen.drain(args.drain_s)
    report = {"final": [[s, i, t, r] for (s, i), (t, r) in gen.final.items()],
              "result": [[s, i, t, st] for (s, i), (t, st) in gen.result.items()],
              "errors": gen.errors, "busy": gen.busy, "admit_wait": gen.admit_wait, "held": held,
              "streamed": streamed}
    with open(args.report, "w") as f:
        json.dump(report, f)
    say({"event": "done"})


if __name__ == "__main__":
    main()
