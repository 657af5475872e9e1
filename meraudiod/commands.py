"""The command table, shared by MQTT (`request/<command>`), the HTTP API and the CLI.

Every request is validated before anything changes: malformed JSON, a wrong type, an unknown
command, an unknown argument or an oversized payload each get an error response.
Destructive commands run only when the caller is allowed admin commands. The commands
themselves live by noun: `recording_commands.py`, `speaker_commands.py`; the two small ones
about the daemon itself (`status`, `config/get`) are here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError

from .command_context import Command, CommandContext, NoArgs, Runtime
from .command_errors import (
    INTERNAL_CODE,
    CommandError,
    Conflict,
    Forbidden,
    InvalidArguments,
    NotFound,
)
from .messages import Response
from .payloads import PayloadError, decode_request
from .recording_commands import RECORDING_COMMANDS
from .speaker_commands import SPEAKER_COMMANDS
from .status import status

_LOGGER = logging.getLogger(__name__)
# What the surfaces import from here: the table, how to run it, and its context and errors.
__all__ = [
    "COMMANDS",
    "CommandContext",
    "CommandError",
    "Conflict",
    "Forbidden",
    "InvalidArguments",
    "NotFound",
    "Runtime",
    "dispatch",
    "execute",
]


def _status(ctx: CommandContext, args: NoArgs) -> Any:
    snapshot = ctx.runtime.snapshot() if ctx.runtime is not None else None
    return status(ctx.conn, ctx.settings, disk_use=not ctx.remote, heartbeat=snapshot)


def _config_get(ctx: CommandContext, args: NoArgs) -> Any:
    return ctx.settings.without_secrets()


COMMANDS: dict[str, Command] = {
    "status": Command(_status, help="Daemon, backlog, last transcript, disk"),
    **RECORDING_COMMANDS,
    **SPEAKER_COMMANDS,
    "config/get": Command(
        _config_get,
        admin=True,  # broker host, user name and paths are for an admin only
        help="The effective configuration, without secrets",
    ),
}


def _check_text(value: Any, where: str) -> None:
    """InvalidArguments for a string UTF-8 cannot hold: a lone surrogate escape ("\\ud800")
    is valid JSON, but SQLite and the events could not store it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArguments(
                f"invalid arguments: {where}: not valid UTF-8 text (a lone surrogate escape)"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, str(key) if where == "arguments" else where)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)


def execute(ctx: CommandContext, name: str, args: dict[str, Any]) -> Any:
    """Validate and run one command; raises CommandError."""
    command = COMMANDS.get(name)
    if command is None:
        raise InvalidArguments(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
    if command.admin and not ctx.admin:
        raise Forbidden(f"{name} is an admin command: set mqtt.allow_admin_commands")
    _check_text(args, "arguments")
    try:
        parsed = command.args.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArguments(f"invalid arguments: {problems}") from exc
    return command.handler(ctx, parsed)


def dispatch(ctx: CommandContext, name: str, payload: bytes) -> Response:
    """Run a request that came over MQTT and build its response; never raises: everything
    about the message, its parsing included, is inside the error handling."""
    transaction: str | int | None = None
    try:
        request = decode_request(name, payload)
        transaction = request.transaction
        data = execute(ctx, request.command, request.args)
        json.dumps(data, default=str)  # fail here, not on the way out
        return Response(name, "ok", data=data, transaction=transaction)
    except CommandError as exc:
        return Response(name, "error", error=str(exc), transaction=transaction, code=exc.code)
    except PayloadError as exc:
        return Response(
            name, "error", error=str(exc), transaction=transaction, code=InvalidArguments.code
        )
    except Exception as exc:  # a bug must still answer the caller and leave the daemon up
        _LOGGER.exception("command %s failed", name)
        return Response(
            name,
            "error",
            error=f"internal error: {exc}",
            transaction=transaction,
            code=INTERNAL_CODE,
        )
