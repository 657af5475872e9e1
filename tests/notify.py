"""systemd's side of the service, for the watchdog tests: the receiving end of sd_notify (a
datagram socket that records every message with the time it arrived) and the environment
the unit gives the daemon."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .conftest import wait_for


def service_env(env: dict[str, str], notify: NotifySocket, **extra: str) -> dict[str, str]:
    """The environment systemd gives the unit: the notify socket and a 2 s watchdog."""
    return {**env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000", **extra}


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

    def wait_ready(self, proc: subprocess.Popen[Any], timeout_s: float = 90) -> str:
        """Wait for READY=1 from a daemon that must stay up; the READY message."""
        wait_for(lambda: self.times("READY=1") or proc.poll() is not None, timeout_s, "READY=1")
        if proc.poll() is not None:
            _, stderr = proc.communicate(timeout=10)
            raise AssertionError(f"the daemon exited {proc.returncode} before READY=1: {stderr}")
        return next(m for _, m in self.messages if "READY=1" in m)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
