"""An uploaded file, received straight into the data directory while it arrives.

FastAPI's `UploadFile` has the whole form parsed before the route runs, each file held in
memory and past 1 MB in the system's temporary directory (memory again where /tmp is a
tmpfs). Here the request's body is parsed as it arrives and the file's bytes are written, a
chunk at a time, to `<data_dir>/uploads/<ulid>.part` by a worker thread (the event loop
never waits on the disk). The size limit and the body's deadline stay the Guard's, on the
same stream; the file is removed however the request ends: stored, refused, over a limit,
too slow, malformed, or the client gone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from ulid import ULID

from .common import ApiError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_LOGGER = logging.getLogger(__name__)
FIELD: Final = "file"  # the form field that carries the file
_MAX_PART_HEADERS_BYTES: Final = 16384  # as h11 allows for a request's own headers


@dataclass(frozen=True)
class ReceivedFile:
    """An upload on disk, and what the client called it."""

    path: Path
    name: str


class _FormParts:
    """python-multipart's callbacks: the bytes of the first `file` part queued for writing,
    every other part dropped as it passes."""

    def __init__(self) -> None:
        self.name: str | None = None  # the file part's filename, once its headers are read
        self.complete = False  # the file part ended (its closing boundary was seen)
        self.pending: list[bytes] = []  # file bytes parsed but not yet written
        self._in_file = False
        self._header = [b"", b""]  # the part header being read: name, value
        self._header_bytes = 0
        self._disposition = b""

    def callbacks(self) -> MultipartCallbacks:
        """What MultipartParser calls."""
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._in_file = False
        self._header_bytes = 0
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]
        self._count_header(end - start)

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]
        self._count_header(end - start)

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > _MAX_PART_HEADERS_BYTES:
            raise ApiError(400, "bad_request", "a form part's headers are over 16 KiB")

    def _header_end(self) -> None:
        if self._header[0].strip().lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if field == FIELD and b"filename" in options and self.name is None:
            self.name = options[b"filename"].decode("utf-8", "replace")
            self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending.append(data[start:end])

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self.complete = True


@asynccontextmanager
async def received_file(request: Request, folder: Path) -> AsyncIterator[ReceivedFile]:
    """The form's `file` field, received into a new file in `folder` (which must be on the
    data directory's filesystem); the file is removed when the block ends."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    if b"boundary" not in params:
        raise ApiError(422, "invalid_request", f"body: a multipart form with a `{FIELD}` field")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ULID()}.part"
    try:
        name = await _receive(request, params[b"boundary"], path)
        yield ReceivedFile(path, name)
    finally:
        path.unlink(missing_ok=True)


async def _receive(request: Request, boundary: bytes, path: Path) -> str:
    """Parse the body as it comes, writing the file part to `path`; the client's filename."""
    parts = _FormParts()
    parser = MultipartParser(boundary, parts.callbacks())
    written = 0
    try:
        with path.open("wb") as handle:
            async for chunk in request.stream():
                parser.write(chunk)
                if parts.pending:
                    data = b"".join(parts.pending)
                    parts.pending.clear()
                    await run_in_threadpool(handle.write, data)
                    written += len(data)
            parser.finalize()
    except ClientDisconnect:
        _LOGGER.info(
            "upload: the client closed the connection after %d bytes; the partial file is removed",
            written,
        )
        raise ApiError(400, "bad_request", "the client closed the connection") from None
    except FormParserError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from exc
    if parts.name is None or not parts.complete:
        raise ApiError(422, "invalid_request", f"body.{FIELD}: Field required")
    return parts.name
