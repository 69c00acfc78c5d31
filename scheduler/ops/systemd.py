"""systemd service notifications (``sd_notify``), without a dependency.

When systemd starts the daemon with ``Type=notify`` it sets ``NOTIFY_SOCKET`` (a unix
datagram socket; a leading ``@`` means the abstract namespace) and, with ``WatchdogSec=``,
``WATCHDOG_USEC``. The daemon sends ``READY=1`` once it listens and Redis answers,
``WATCHDOG=1`` from its event loop at half the watchdog interval (a stuck loop stops the
pings and systemd restarts the service), ``STATUS=...`` lines, and ``STOPPING=1`` when it
begins to drain. Without ``NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

from scheduler.ops.logs import event

log = logging.getLogger("scheduler.systemd")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when not under systemd or it failed."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:
            event(log, "sd_notify_failed", logging.WARNING, error=exc)
            return False

    async def watchdog(self) -> None:
        """Ping the watchdog from the event loop until cancelled (returns at once without one)."""
        if self.watchdog_interval is None or not self.enabled:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)
