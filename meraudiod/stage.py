"""The shape every active stage shares: `_run` on its own named daemon thread."""

from __future__ import annotations

import logging
import sys
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

    def stuck_in(self) -> str:
        """The call `_run` is in now: for a thread that does not stop, where it hangs."""
        thread = self._thread
        frame = sys._current_frames().get(thread.ident or 0) if thread is not None else None
        run_code = getattr(type(self)._run, "__code__", None)
        inner = None
        while frame is not None:  # innermost first, out to the thread's bootstrap
            if frame.f_code is run_code:
                if inner is None:
                    return "_run"
                # Python 3.11's co_qualname names the class too (3.10: the function alone);
                # f_locals would copy the locals of a frame another thread runs.
                code = inner.f_code
                return str(getattr(code, "co_qualname", code.co_name))
            inner, frame = frame, frame.f_back
        return "an unknown call"

    def _run(self) -> None:
        raise NotImplementedError
