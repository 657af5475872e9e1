"""MQTT requests run here, on their own named thread: never on the main thread that feeds the
watchdog, never on the MQTT thread that delivers events. The queue is bounded; a request that
finds it full is answered "busy" at once and never waits."""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Final

from .commands import CommandContext, Runtime, dispatch
from .config import Settings
from .db import open_db
from .messages import Response
from .payloads import PayloadError, decode_request
from .stage import StageThread

_LOGGER = logging.getLogger(__name__)
QUEUE_SIZE: Final = 32
# Idle, the thread sleeps until a request comes or join() wakes it to stop; at the latest
# after this long, for a stop event set without join().
_IDLE_WAIT_S: Final = 5.0


def refusal(name: str, payload: bytes, code: str, error: str) -> Response:
    """An error response that echoes the caller's transaction when the payload has one."""
    try:
        transaction = decode_request(name, payload).transaction
    except PayloadError:
        transaction = None
    return Response(name, "error", error=error, transaction=transaction, code=code)


class CommandRunner(StageThread):
    """Runs requests in order on the `commands` thread, with a connection of its own."""

    thread_name = "commands"

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        reply: Callable[[Response], None],
        runtime: Runtime | None = None,
        after: Callable[[sqlite3.Connection, Response], None] | None = None,
    ) -> None:
        self.settings = settings
        self.stop_event = stop
        self.reply = reply  # sends the response (the MQTT link's send queue: never blocks)
        self.runtime = runtime
        self.after = after  # e.g. a speaker event after an enrolment, on this thread
        # None is join()'s wake-up, not a request.
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=QUEUE_SIZE)

    def submit(self, name: str, payload: bytes) -> None:
        """Queue a request (called on the MQTT thread): answered "busy" when the queue is full."""
        if self.stop_event.is_set():
            self.reply(refusal(name, payload, "stopping", "stopping: the daemon is shutting down"))
            return
        try:
            self._queue.put_nowait((name, payload))
        except queue.Full:
            self.reply(
                refusal(
                    name,
                    payload,
                    "busy",
                    f"busy: {QUEUE_SIZE} requests are waiting; try again later",
                )
            )

    def join(self, timeout_s: float | None = None) -> None:
        """Wake the thread (its stop event is set) and wait for it to end, after the request
        it is running."""
        # Full: busy with requests, it looks at the stop event before the next one.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        super().join(timeout_s)

    def _run(self) -> None:
        conn = open_db(self.settings.storage.db_path, stop=self.stop_event)
        try:
            while not self.stop_event.is_set():
                try:
                    request = self._queue.get(timeout=_IDLE_WAIT_S)
                except queue.Empty:
                    continue
                if request is None:
                    continue  # woken to look at the stop event
                name, payload = request
                context = CommandContext(
                    conn,
                    self.settings,
                    admin=self.settings.mqtt.allow_admin_commands,  # live: SIGHUP may change it
                    runtime=self.runtime,
                    remote=True,
                    surface="mqtt",
                )
                response = dispatch(context, name, payload)  # never raises
                if self.after is not None and response.status == "ok":
                    try:
                        self.after(conn, response)
                    except Exception:  # an event that could not be queued: the reply still goes
                        _LOGGER.exception("after command %s", name)
                self.reply(response)
        finally:
            conn.close()
