"""Test helpers: a thin JSON-over-WebSocket peer and audio fixtures."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from scheduler.reference.node import NodeOptions, ReferenceNode
from scheduler.session.audio import silence, tone

RESUME_TOKENS: dict[str, str] = {}
"""session_id -> its resume_token, from every session_ready a :class:`Peer` received."""


def token_of(session_id: str) -> str:
    """The resume token the daemon gave ``session_id`` (a Peer saw its session_ready)."""
    return RESUME_TOKENS[session_id]


SPEECH_100MS = tone(100)
SILENCE_100MS = silence(100)


class Peer:
    def __init__(self, ws):
        self.ws = ws

    async def send(self, **msg: Any) -> None:
        await self.ws.send_message(json.dumps(msg))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def recv(self, timeout: float = 5.0) -> dict:
        with trio.fail_after(timeout):
            msg = json.loads(await self.ws.get_message())
        if msg.get("type") == "session_ready" and msg.get("resume_token"):
            RESUME_TOKENS[msg["session_id"]] = msg["resume_token"]
        return msg

    async def recv_until(self, type_: str, timeout: float = 10.0) -> tuple[dict, list[dict]]:
        """Receive until a message of ``type_``; returns it and everything before it."""
        seen = []
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv(timeout)
                if msg["type"] == type_:
                    return msg, seen
                seen.append(msg)

    async def register(self, node_id: str, max_jobs: int = 1, pair: tuple[str, str] = ("zh", "en")) -> dict:
        """As a raw node: register and return the daemon's ``registered`` answer."""
        await self.send(type="register", node_id=node_id, lang_pairs=[list(pair)], max_jobs=max_jobs)
        reply = await self.recv()
        assert reply["type"] == "registered", reply
        return reply

    @property
    def closed(self):
        return self.ws.closed


@asynccontextmanager
async def peer(url: str):
    async with open_websocket_url(url) as ws:
        yield Peer(ws)


async def init_answer(running, **extra) -> tuple[dict, int | None]:
    """A ``session_init`` (zh -> en, plus ``extra``): the daemon's first answer, and the close
    code that followed an ``error`` (None otherwise; the socket is closed then)."""
    async with peer(running.ws_url + "/v1/session") as p:
        await p.send(type="session_init", src_lang="zh", tgt_langs=["en"], **extra)
        answer = await p.recv()
        if answer["type"] != "error":
            return answer, None
        try:
            await p.recv()
        except ConnectionClosed as closed:
            return answer, closed.reason.code
        raise AssertionError(f"{answer} was not followed by a close")


@asynccontextmanager
async def session(running, src="zh", tgts=("en",), **extra):
    async with peer(running.ws_url + "/v1/session") as p:
        await p.send(type="session_init", src_lang=src, tgt_langs=list(tgts), **extra)
        ready = await p.recv()
        assert ready["type"] == "session_ready", ready
        p.ready = ready
        yield p


async def start_node(nursery, running, **options) -> ReferenceNode:
    node = ReferenceNode(NodeOptions(url=running.ws_url, reconnect=False, **options))
    await nursery.start(node.run)
    return node


async def speak(p: Peer, ms: int = 300) -> None:
    for _ in range(ms // 100):
        await p.send_raw(SPEECH_100MS)


BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
"""Headless Chromium on a closed network: without the background-networking flags it keeps
trying to reach Google's hosts."""


def browser(chromium: str, profile: str, *args: str) -> list[str]:
    """A one-shot headless Chromium command (``--dump-dom``, ``--screenshot``) with a fresh profile."""
    return [chromium, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args]
