"""The shape every active stage shares: `_run` on its own named daemon thread."""

from __future__ import annotations

import threading
from typing import ClassVar


class StageThread:
    """start() runs `_run` on a thread named `thread_name`; is_alive() and join() follow it."""

    thread_name: ClassVar[str] = "stage"
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the stage's thread."""
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the thread runs (the watchdog is fed only while every stage's does)."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the thread to end."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        raise NotImplementedError
