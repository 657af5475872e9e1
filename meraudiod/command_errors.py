"""The kinds of error a command of the table raises (`commands.py`).

Each has its `code`, which every surface maps to its own answer: an MQTT response carries
it, the HTTP API turns it into a status. A caller branches on the code, never on the
wording of the message.
"""

from __future__ import annotations

from typing import ClassVar, Final

INTERNAL_CODE: Final = "internal"  # a bug: the caller is answered, the daemon stays up


class CommandError(Exception):
    """A request that cannot be carried out; the message goes back to the caller.

    Each kind has its `code`, which every surface maps to its own answer (an MQTT response's
    `code`, an HTTP status): never the wording of the message."""

    code: ClassVar[str] = "bad_request"


class InvalidArguments(CommandError):
    """The arguments do not fit the command's schema, or the command is unknown."""

    code: ClassVar[str] = "invalid_request"


class NotFound(CommandError):
    """What the request names (a recording, a speaker) does not exist."""

    code: ClassVar[str] = "not_found"


class Forbidden(CommandError):
    """An admin command from a caller not allowed admin commands."""

    code: ClassVar[str] = "forbidden"


class Conflict(CommandError):
    """The change clashes with what exists (a name taken)."""

    code: ClassVar[str] = "conflict"
