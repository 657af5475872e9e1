"""What every route shares: the stage's context, database connections, the error shape,
and running a command of the shared table."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from ..commands import COMMANDS, CommandContext, dispatch
from ..config import Settings
from ..db import open_db

_LOGGER = logging.getLogger(__name__)
ULID_RE: Final = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class ApiError(Exception):
    """A failure answered as `{"error": {"code", "message", "request_id"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, Any]:
    """The one error shape of the API."""
    return {"error": {"code": code, "message": message, "request_id": REQUEST_ID.get()}}


class RequestIdFilter(logging.Filter):
    """Gives every record the id of the request being handled ("-" outside one), which the
    daemon's formatters print: the request's own line and the work it causes (the
    recording an upload stored) can be found by it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keep the record."""
        record.request_id = REQUEST_ID.get()
        return True


@dataclass
class HttpContext:
    """What the routes reach: settings and, inside the daemon, the running daemon."""

    settings: Settings
    daemon: Any = None  # the running Daemon (None when the app is served alone)
    hub: Any = None  # live.EventHub

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for this request's thread (connections are per thread)."""
        conn = open_db(self.settings.storage.db_path)
        try:
            yield conn
        finally:
            conn.close()

    def wake_worker(self) -> None:
        """A new job: the worker looks now instead of at its next poll."""
        worker = self.daemon.pipeline.worker if self.daemon is not None else None
        if worker is not None:
            worker.wake()


def check_id(rec_id: str, what: str = "recording") -> str:
    """A ULID, or a 404 before it goes anywhere near a query or a path."""
    if not ULID_RE.fullmatch(rec_id):
        raise ApiError(404, "not_found", f"no {what} {rec_id[:40]!r}: ids are 26-character ULIDs")
    return rec_id


def _status_of(message: str) -> tuple[int, str]:
    """The HTTP status of a command's error message."""
    # What is missing is a recording or a speaker ("no audio stream in clip.txt" is a bad
    # file, not a missing one).
    if message.startswith(("no recording ", "no speaker ")) or " no such " in message:
        return 404, "not_found"
    if message.startswith("invalid arguments"):
        return 422, "invalid_request"
    if message.startswith("internal error"):
        return 500, "internal"
    return 400, "bad_request"


def run_command(ctx: HttpContext, name: str, args: dict[str, Any]) -> Any:
    """One operation of the shared command table; its error becomes an ApiError."""
    command = COMMANDS[name]
    if command.admin and not ctx.settings.http.allow_admin_commands:
        raise ApiError(
            403, "forbidden", f"{name} changes or deletes data: set http.allow_admin_commands"
        )
    payload = json.dumps({k: v for k, v in args.items() if v is not None}).encode()
    with ctx.connect() as conn:
        response = dispatch(CommandContext(conn, ctx.settings, admin=True), name, payload)
    if response.status != "ok":
        status, code = _status_of(response.error or "")
        raise ApiError(status, code, response.error or "failed")
    return response.data
