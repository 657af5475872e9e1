"""Reading a Wyoming server's events with bounds: the server is configured by the owner, but
it may be broken, another program on that port (an HTTP server, sshd), or hostile. The
`wyoming` library's reader takes a header's `data_length` and `payload_length` at their word
(a header announcing 1 GB made the daemon buffer 1 GB, past its deadline), and a header that
is JSON but not an object, or a field of the wrong type, raised errors nobody expected (one
in an `Info` killed the worker, and so the daemon, at every start). Here every reply is one
header line of at most 64 KiB with at most 1 MiB of data and 1 MiB of payload, and whatever
breaks the protocol is one WyomingError saying what the server sent."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from wyoming.event import Event

from .asr import ServerError

MAX_LINE_BYTES: Final = 64 * 1024  # a header; wyoming-faster-whisper's are under 200 bytes
# A transcript's text or a server's Info: a minute of speech is about 1 KB of text, and Home
# Assistant's add-ons describe themselves in a few KB.
MAX_DATA_BYTES: Final = 1024 * 1024
MAX_PAYLOAD_BYTES: Final = 1024 * 1024  # nothing the daemon asks for has a payload at all
_QUOTE_CHARS: Final = 40


class WyomingError(ServerError):
    """A server refused, closed the connection, answered nonsense or missed its deadline."""


def quote(raw: bytes) -> str:
    """The start of what a server sent, on one line: quoted, with its control characters and
    any byte outside ASCII escaped."""
    cut = raw.strip()
    return repr(cut[:_QUOTE_CHARS])[1:] + ("..." if len(cut) > _QUOTE_CHARS else "")


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, or None once the server has closed the connection; WyomingError for
    anything that is not a Wyoming event within the bounds."""
    try:
        line = await reader.readline()
    except ValueError as exc:  # asyncio's LimitOverrunError: no new line within the limit
        raise WyomingError(
            f"sent a line over {MAX_LINE_BYTES // 1024} KiB: not a Wyoming server"
        ) from exc
    if not line:
        return None
    if not line.endswith(b"\n"):
        raise asyncio.IncompleteReadError(line, None)  # closed in the middle of a header
    header = _header(line)
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise WyomingError(f"sent an event whose data is not an object: {quote(line)}")
    size = _length(header, "data_length", MAX_DATA_BYTES)
    if size:
        more = _object(await reader.readexactly(size))
        data = {**data, **more}
    size = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    payload = await reader.readexactly(size) if size else None
    return Event(type=header["type"], data=data, payload=payload)


def _header(line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except ValueError:  # not UTF-8 is a ValueError too
        raise WyomingError(f"not a Wyoming server: it sent {quote(line)}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WyomingError(f"sent a header that is not a Wyoming event: {quote(line)}")
    return header


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WyomingError(
            f"sent a {key} that is not a byte count: {quote(json.dumps(value).encode())}"
        )
    if value > limit:
        raise WyomingError(
            f"announced a {key} of {value} bytes (more than the {limit // 1024} KiB allowed)"
        )
    return value


def _object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise WyomingError(f"sent event data that is not JSON: {quote(raw)}") from None
    if not isinstance(data, dict):
        raise WyomingError(f"sent event data that is not an object: {quote(raw)}")
    return data
