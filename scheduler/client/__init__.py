"""scheduler.client: a Trio client library for ``/v1/session`` that resumes by itself.

    from scheduler.client import connect

    async with connect(["ws://a:8765", "ws://b:8765"], src_lang="zh", tgt_langs=["en"]) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed, session)        # await session.send_audio(frame) ..., then session.close()
            async for result in session.results():   # or `async for msg in session` for every message
                print(result.utterance_index, result.translations)

When the connection breaks, or the daemon closes the session with reason ``shutdown`` (it
is draining), the session connects again to the next URL (round robin, backoff) with
``session_id`` and ``resume_from``, and sends again the audio it sent since the last
``utterance_finalized``; results are delivered once each, in index order, across
connections. ``send_audio`` waits while it reconnects. An API key travels as the
``bearer.`` subprotocol (docs/protocol.md, "Handshake"); ``ssl_context`` is for ``wss://``.
``scheduler client`` (reference/client.py) and the load harness (bench/load.py) use it.
"""

from scheduler.client.session import MESSAGES_BUFFER, Session, SessionFailed, connect

__all__ = ["MESSAGES_BUFFER", "Session", "SessionFailed", "connect"]
