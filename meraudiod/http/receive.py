"""Uploaded files, received straight into the data directory while they arrive.

FastAPI's `UploadFile` has the whole form parsed before the route runs, each file held in
memory and past 1 MB in the system's temporary directory (memory again where /tmp is a
tmpfs). Here the request's body is parsed as it arrives and each file's bytes are written, a
chunk at a time, to `<data_dir>/uploads/<ulid>.part` by a worker thread (the event loop
never waits on the disk). The size limit and the body's deadline stay the Guard's, on the
same stream; the files are removed however the request ends: done with, refused, over a
limit, too slow, malformed, or the client gone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

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
_MAX_PART_HEADERS_BYTES: Final = 16384  # as h11 allows for a request's own headers
_MAX_FIELD_BYTES: Final = 4096  # a text field (a name, a flag)
_MAX_FIELDS: Final = 16


@dataclass(frozen=True)
class ReceivedFile:
    """An uploaded file on disk, and what the client called it."""

    path: Path
    name: str  # printable: control characters are spaces


@dataclass
class ReceivedForm:
    """A form's files (of the one field that carries them) and its text fields."""

    files: list[ReceivedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


class _FormParts:
    """python-multipart's callbacks: the bytes of each file of `file_field` queued for
    writing (up to `max_files`; one more is refused), text fields kept (small)."""

    def __init__(self, folder: Path, file_field: str, max_files: int) -> None:
        self.form = ReceivedForm()
        self.complete = 0  # files whose closing boundary was seen
        self.pending: list[tuple[Path, bytes]] = []  # file bytes parsed, not yet written
        self._folder = folder
        self._file_field = file_field
        self._max_files = max_files
        self._part: ReceivedFile | str | None = None  # a file, a text field's name, or dropped
        self._text = b""
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
        self._part, self._text = None, b""
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
        name = options.get(b"name", b"").decode("utf-8", "replace")
        # The file field's part is a file with or without a filename (a client may not name
        # it): read as a text field, it was refused as "over 4 KiB".
        if b"filename" not in options and name != self._file_field:
            if len(self.form.fields) >= _MAX_FIELDS:
                raise ApiError(400, "bad_request", f"more than {_MAX_FIELDS} form fields")
            self._part = name
        elif name == self._file_field:
            if len(self.form.files) >= self._max_files:  # were dropped unsaid
                many = "one file" if self._max_files == 1 else f"at most {self._max_files} files"
                raise ApiError(422, "invalid_request", f"body.{name}: {many}")
            received = ReceivedFile(
                self._folder / f"{ULID()}.part", _printable(options.get(b"filename", b""))
            )
            self.form.files.append(received)
            self.pending.append((received.path, b""))  # an empty file is a file too
            self._part = received

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if isinstance(self._part, ReceivedFile):
            self.pending.append((self._part.path, data[start:end]))
        elif self._part is not None:
            self._text += data[start:end]
            if len(self._text) > _MAX_FIELD_BYTES:
                raise ApiError(422, "invalid_request", f"body.{self._part}: over 4 KiB")

    def _part_end(self) -> None:
        if isinstance(self._part, ReceivedFile):
            self.complete += 1
        elif self._part is not None:
            self.form.fields[self._part] = self._text.decode("utf-8", "replace")
        self._part = None


def _printable(name: bytes) -> str:
    """A client's file name as text with no control characters (each one a space): it is
    logged and shown, and a line feed in it wrote a log line of the client's choosing."""
    return "".join(c if c.isprintable() else " " for c in name.decode("utf-8", "replace"))


BINARY: Final = {"type": "string", "format": "binary"}  # a file field's OpenAPI schema


def openapi_form(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """The `openapi_extra` of a route that reads its form itself (FastAPI cannot see it):
    its fields in the API's documentation."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


@asynccontextmanager
async def received_form(
    request: Request, folder: Path, file_field: str, max_files: int = 1
) -> AsyncIterator[ReceivedForm]:
    """The form, its files (of `file_field`, at most `max_files`, at least one) received
    into new files in `folder` (on the data directory's filesystem), which are removed when
    the block ends."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    if b"boundary" not in params:
        raise ApiError(
            422, "invalid_request", f"body: a multipart form with a `{file_field}` field"
        )
    parts = _FormParts(folder, file_field, max_files)
    try:  # the parser refuses a boundary over 256 bytes as it is made
        parser = MultipartParser(params[b"boundary"], parts.callbacks())
    except FormParserError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    try:
        await _receive(request, parser, parts)
        if not parts.form.files or parts.complete < len(parts.form.files):
            raise ApiError(422, "invalid_request", f"body.{file_field}: Field required")
        yield parts.form
    finally:
        for received in parts.form.files:
            received.path.unlink(missing_ok=True)


async def _receive(request: Request, parser: MultipartParser, parts: _FormParts) -> None:
    """Parse the body as it comes, writing each file's bytes to its file."""
    written = 0
    try:
        with ExitStack() as files:
            handles: dict[Path, IO[bytes]] = {}
            async for chunk in request.stream():
                parser.write(chunk)
                for path, data in parts.pending:
                    if path not in handles:
                        handles[path] = files.enter_context(path.open("wb"))
                    await run_in_threadpool(handles[path].write, data)
                    written += len(data)
                parts.pending.clear()
            parser.finalize()
    except ClientDisconnect:
        _LOGGER.info(
            "upload: the client closed the connection after %d bytes; the partial files are"
            " removed",
            written,
        )
        raise ApiError(400, "bad_request", "the client closed the connection") from None
    except FormParserError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from exc
