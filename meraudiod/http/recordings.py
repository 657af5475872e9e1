"""/api/v1/recordings: search, details, playback (with range requests) and delete."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Final

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from ..recordings import audio_file
from .common import ApiError, HttpContext, check_id, run_command
from .protocol import ABORT, AbortConnection

_LOGGER = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/recordings", tags=["recordings"])
_MEDIA_TYPES = {".flac": "audio/flac", ".wav": "audio/wav"}
# How often a download looks whether its audio was deleted meanwhile: a stat of a path whose
# directory entries are cached, microseconds.
_WATCH_S: Final = 0.2
_WATCHERS: set[asyncio.Task[None]] = set()  # strong references to the watches under way


class AudioDeletedError(Exception):
    """The audio being downloaded was deleted: the response stops half way."""


class AudioResponse(FileResponse):
    """A file with range requests whose refusals have the API's one error shape: starlette
    answers a Range it cannot serve itself, in plain text (400) or with no body (416).

    A download stops once its audio is deleted (the recording, or only its audio: every
    delete removes the file before it commits), within _WATCH_S: the file already open would
    otherwise be delivered whole after the delete, to a slow reader minutes later. The
    connection is reset (protocol.ABORT), so what the kernel still held to send is dropped
    too; the client sees a response cut short of its Content-Length."""

    def __init__(self, path: Path, rec_id: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.rec_id = rec_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        served = Path(self.path)
        identity = _identity(served)
        if identity is None:  # deleted since the route looked: before a byte is sent
            raise ApiError(410, "gone", f"recording {self.rec_id} has no audio any more")
        abort: AbortConnection | None = scope.get("extensions", {}).get(ABORT)
        deleted = False
        with anyio.CancelScope() as sending:

            async def watch() -> None:
                nonlocal deleted
                while _identity(served) == identity:
                    await asyncio.sleep(_WATCH_S)
                deleted = True
                _LOGGER.info(
                    "recording %s: download of its audio stopped: the audio was deleted",
                    self.rec_id,
                )
                if abort is not None:
                    abort()
                sending.cancel()

            # A task of its own, not a task group's: an error of the response (an ApiError
            # for a Range) reaches the route's handlers as it is, not in an ExceptionGroup.
            watcher = asyncio.get_running_loop().create_task(watch())
            _WATCHERS.add(watcher)
            watcher.add_done_callback(_WATCHERS.discard)
            try:
                await super().__call__(scope, receive, send)
            finally:
                watcher.cancel()  # sent whole, or failed: the watch ends
        if deleted and abort is None:  # no reset to hand (not our protocol): uvicorn closes
            raise AudioDeletedError(f"recording {self.rec_id}: its audio was deleted")
        if deleted:
            await asyncio.sleep(0)  # the reset's connection_lost first: uvicorn says nothing

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # Raised before a byte is sent: the route's error handlers answer it.
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as exc:
            why = exc.content.removeprefix("Range header: ")
            raise ApiError(400, "bad_request", f"Range {http_range[:40]!r}: {why}") from exc
        except RangeNotSatisfiable as exc:
            raise ApiError(
                416,
                "range_not_satisfiable",
                f"Range {http_range[:40]!r}: the audio has {exc.max_size} bytes",
                headers={"Content-Range": f"bytes */{exc.max_size}"},
            ) from exc


def context(request: Request) -> HttpContext:
    """The stage's context, for the routes."""
    ctx: HttpContext = request.app.state.ctx
    return ctx


@router.get("")
def list_recordings(
    ctx: HttpContext = Depends(context),
    search: str | None = Query(None, max_length=200, description="Full-text search"),
    since: str | None = Query(None, description="2h, 3d, 45m or an ISO date/time"),
    speaker: str | None = Query(None, max_length=100, description="Speaker name"),
    limit: int = Query(20, ge=1, le=1000, description="Most rows returned"),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
) -> dict[str, Any]:
    """Recordings, newest first (the `recordings/list` command)."""
    rows = run_command(
        ctx,
        "recordings/list",
        {
            "search": search,
            "since": since,
            "speaker": speaker,
            "limit": limit,
            "cursor": cursor or None,
        },
    )
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return {"recordings": rows, "next_cursor": next_cursor}


@router.get("/{rec_id}")
def get_recording(rec_id: str, ctx: HttpContext = Depends(context)) -> Any:
    """One recording with its segments and speakers (the `recordings/get` command)."""
    rec_id = check_id(rec_id)
    data = run_command(ctx, "recordings/get", {"id": rec_id})
    data.pop("audio_path", None)  # where the file lives is the device's business
    data["audio_url"] = f"/api/v1/recordings/{rec_id}/audio"
    return data


@router.get("/{rec_id}/audio", response_class=FileResponse)
def get_audio(rec_id: str, ctx: HttpContext = Depends(context)) -> AudioResponse:
    """The recording's audio; HTTP range requests let a player seek."""
    rec_id = check_id(rec_id)
    with ctx.connect() as conn:
        row = conn.execute("SELECT audio_path FROM recordings WHERE id=?", (rec_id,)).fetchone()
    if row is None:
        raise ApiError(404, "not_found", f"no recording {rec_id}")
    audio_dir = ctx.settings.storage.audio_dir
    path = audio_file(audio_dir, row["audio_path"]) if row["audio_path"] else None
    if path is None or not (path.exists() or path.is_symlink()):
        raise ApiError(410, "gone", f"recording {rec_id} has no audio any more")
    # A link put in the audio directory would have the API serve whatever it points at (any
    # file the daemon can read): only a regular file whose real path is inside it is served.
    path = path.resolve()
    if not path.is_file() or not path.is_relative_to(audio_dir.resolve()):
        raise ApiError(404, "not_found", f"recording {rec_id} has no audio file here")
    media_type = _MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    return AudioResponse(
        path,
        rec_id,
        media_type=media_type,
        filename=f"{rec_id}{path.suffix}",
        content_disposition_type="inline",  # played in the page, not downloaded
    )


@router.delete("/{rec_id}")
def delete_recording(rec_id: str, ctx: HttpContext = Depends(context)) -> Any:
    """Audio, text, index rows and embeddings (the `recordings/delete` command)."""
    data = run_command(ctx, "recordings/delete", {"ids": [check_id(rec_id)]})
    if not data["deleted"]:
        raise ApiError(404, "not_found", f"no recording {rec_id}")
    return data


def _identity(path: Path) -> tuple[int, int] | None:
    """The file a path names (device, inode); None once it is gone. Every delete of audio
    removes its file (another process's too): gone, or another file, is deleted."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino
