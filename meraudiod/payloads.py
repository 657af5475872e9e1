"""Decoding a request payload from MQTT, bounded: size, nesting depth and number length are
checked before the JSON parser runs, so no message (`[` x 5000, a 5,000-digit number) can
make it recurse or convert without limit."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

MAX_PAYLOAD_BYTES: Final = 16 * 1024
MAX_DEPTH: Final = 16  # arrays and objects inside each other; no command needs more than 2
MAX_NUMBER_CHARS: Final = 30  # a limit or a transaction number; Python refuses 4,300+ digits


class PayloadError(Exception):
    """A request payload that cannot be read; the message goes back to the caller."""


@dataclass
class Request:
    """A decoded request, before validation of its arguments."""

    command: str
    transaction: str | int | None = None
    args: dict[str, Any] = field(default_factory=dict)


def _check_shape(text: str) -> None:
    """Refuse deep nesting and long numbers with one pass over the text (strings skipped)."""
    depth = number_chars = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char in "0123456789+-.eE":
            number_chars += 1
            if number_chars > MAX_NUMBER_CHARS:
                raise PayloadError(f"payload has a number over {MAX_NUMBER_CHARS} characters")
            continue
        number_chars = 0
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise PayloadError(f"payload is nested deeper than {MAX_DEPTH} levels")
        elif char in "]}":
            depth -= 1


def _no_constant(name: str) -> Any:
    raise PayloadError(f"payload is not valid JSON: {name} is not a number")


def loads_bounded(payload: bytes) -> Any:
    """Parse a JSON payload within the limits above; PayloadError says what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload too large ({len(payload)} bytes, at most {MAX_PAYLOAD_BYTES})")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc
    _check_shape(text)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:  # limits make these rare
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc


def decode_request(command: str, payload: bytes) -> Request:
    """A request's command, transaction and arguments; PayloadError says what is wrong."""
    if not payload.strip() and len(payload) <= MAX_PAYLOAD_BYTES:
        return Request(command)
    body = loads_bounded(payload)
    if not isinstance(body, dict):
        raise PayloadError("payload must be a JSON object")
    transaction = body.pop("transaction", None)
    if transaction is not None and (
        isinstance(transaction, bool) or not isinstance(transaction, str | int)
    ):
        raise PayloadError("transaction must be a string or a number")
    return Request(command, transaction, body)
