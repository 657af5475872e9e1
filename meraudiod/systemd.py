"""sd_notify without a dependency: READY, STATUS, WATCHDOG, STOPPING. A no-op outside systemd."""

from __future__ import annotations

import logging
import os
import socket

_LOGGER = logging.getLogger(__name__)


class Notifier:
    """Talks to $NOTIFY_SOCKET; knows the watchdog interval from $WATCHDOG_USEC."""

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET") or None
        if self._address and self._address.startswith("@"):
            self._address = "\0" + self._address[1:]  # abstract namespace
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = usec and usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s = int(usec) / 1e6 / 2 if enabled and usec else None

    @property
    def enabled(self) -> bool:
        """Running under systemd with Type=notify."""
        return self._address is not None

    def notify(self, message: str) -> None:
        """Send one datagram; failures are logged, never raised."""
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode())
        except OSError as exc:
            _LOGGER.warning("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        """Models loaded, database migrated, audio flowing."""
        self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        """A one-line state shown by `systemctl status`."""
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """All is well: audio is arriving and every thread is alive."""
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        """On the way out."""
        self.notify("STOPPING=1\nSTATUS=stopping")
