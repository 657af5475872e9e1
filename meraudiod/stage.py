"""The shape every active stage shares: `_run` on its own named daemon thread."""

from __future__ import annotations

import logging
import threading
from typing import ClassVar

_LOGGER = logging.getLogger(__name__)


class StageThread:
    """start() runs `_run` on a thread named `thread_name`; is_alive() and join() follow it.

    An exception that ends `_run` is logged with its traceback and kept in `died`, for the
    daemon to report; a stage never dies unseen."""

    thread_name: ClassVar[str] = "stage"
    _thread: threading.Thread | None = None
    died: str | None = None  # why the thread ended by an exception

    def start(self) -> None:
        """Start the stage's thread."""
        self.died = None
        self._thread = threading.Thread(target=self._guarded, name=self.thread_name, daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        """start() was called."""
        return self._thread is not None

    def _guarded(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.died = f"{type(exc).__name__}: {exc}"
            _LOGGER.exception("the %s thread died", self.thread_name)

    def is_alive(self) -> bool:
        """Whether the thread runs (the watchdog is fed only while every stage's does)."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the thread to end."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        raise NotImplementedError
