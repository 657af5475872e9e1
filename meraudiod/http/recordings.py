"""/api/v1/recordings: search, details, playback (with range requests) and delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from ..recordings import audio_file
from .common import ApiError, HttpContext, check_id, run_command

router = APIRouter(prefix="/api/v1/recordings", tags=["recordings"])
_MEDIA_TYPES = {".flac": "audio/flac", ".wav": "audio/wav"}


class AudioResponse(FileResponse):
    """A file with range requests whose refusals have the API's one error shape: starlette
    answers a Range it cannot serve itself, in plain text (400) or with no body (416)."""

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
        {"search": search, "since": since, "speaker": speaker, "limit": limit, "cursor": cursor},
    )
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return {"recordings": rows, "next_cursor": next_cursor}


@router.get("/{rec_id}")
def get_recording(rec_id: str, ctx: HttpContext = Depends(context)) -> Any:
    """One recording with its segments and speakers (the `recordings/get` command)."""
    data = run_command(ctx, "recordings/get", {"id": check_id(rec_id)})
    data.pop("audio_path", None)  # where the file lives is the device's business
    data["audio_url"] = f"/api/v1/recordings/{rec_id}/audio"
    return data


@router.get("/{rec_id}/audio", response_class=FileResponse)
def get_audio(rec_id: str, ctx: HttpContext = Depends(context)) -> AudioResponse:
    """The recording's audio; HTTP range requests let a player seek."""
    check_id(rec_id)
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
