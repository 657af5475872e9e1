"""The receiving end of sd_notify, as systemd holds it: a datagram socket that records
every message with the time it arrived, for the watchdog tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """The receiving end of sd_notify, as systemd would hold it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, word: str) -> list[float]:
        return [t for t, m in self.messages if word in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
