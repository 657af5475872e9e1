"""What every route shares: the stage's context, database connections, the error shape,
and running a command of the shared table."""

from __future__ import annotations

import contextvars
import logging
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from ..commands import (
    COMMANDS,
    CommandContext,
    CommandError,
    Conflict,
    Forbidden,
    InvalidArguments,
    NotFound,
    execute,
)
from ..config import Settings
from ..db import open_db
from ..recordings import ULID_RE

_LOGGER = logging.getLogger(__name__)
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# A request's scope["extensions"][BEYOND_LIMIT]: its connection came when http.max_connections
# (the value) were open (protocol.py); it is answered 503.
BEYOND_LIMIT: Final = "meraudiod.beyond_limit"


class ApiError(Exception):
    """A failure answered as `{"error": {"code", "message", "request_id"}}`."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict[str, Any]:
    """The one error shape of the API."""
    return {"error": {"code": code, "message": message, "request_id": REQUEST_ID.get()}}


class RequestIdFilter(logging.Filter):
    """Gives every record the id of the request being handled ("-" outside one), which the
    daemon's formatters print: the request's own line and the work it causes (the
    recording an upload stored) can be found by it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keep the record (one logged with its own request id keeps it)."""
        if not hasattr(record, "request_id"):
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
    """A ULID as stored (upper case: typed in either case, as the CLI and a cursor take it),
    or a 404 before it goes anywhere near a query or a path."""
    stored = rec_id.upper()
    if not ULID_RE.fullmatch(stored):
        raise ApiError(404, "not_found", f"no {what} {rec_id[:40]!r}: ids are 26-character ULIDs")
    return stored


# The HTTP status of each kind of command error (commands.CommandError.code).
_STATUS_OF: Final = {
    NotFound.code: 404,
    InvalidArguments.code: 422,
    Forbidden.code: 403,
    Conflict.code: 409,
    CommandError.code: 400,
}


def run_command(
    ctx: HttpContext, name: str, args: dict[str, Any], uploaded: Mapping[str, str] | None = None
) -> Any:
    """One operation of the shared command table; its typed error becomes an ApiError.
    `uploaded`: the files this request itself received, by the client's names for them,
    which the command may read (a client can name no other file on the device)."""
    command = COMMANDS[name]
    if command.admin and not ctx.settings.http.allow_admin_commands:
        raise ApiError(
            403, "forbidden", f"{name} changes or deletes data: set http.allow_admin_commands"
        )
    with ctx.connect() as conn:
        context = CommandContext(
            conn,
            ctx.settings,
            admin=True,
            runtime=ctx.daemon,
            readable_files=uploaded or {},
            surface="http",
        )
        try:
            return execute(context, name, {k: v for k, v in args.items() if v is not None})
        except CommandError as exc:
            raise ApiError(_STATUS_OF.get(exc.code, 400), exc.code, str(exc)) from exc
