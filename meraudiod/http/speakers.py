"""/api/v1/persistent-speakers: voice profiles, the review of unknown voices. Each request
body is the schema of the command it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, Depends, Query, Request
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from ..audio import SAMPLE_RATE_HZ
from ..speaker_commands import EnrollArgs, MergeArgs, OptOutArgs, RenameArgs
from .common import ApiError, HttpContext, run_command
from .receive import BINARY, ReceivedForm, openapi_form, received_form
from .recordings import context
from .uploads import upload_blocks

router = APIRouter(prefix="/api/v1/persistent-speakers", tags=["speakers"])
_MAX_CLIPS: Final = 20  # clips of one enrolment; more are not read
_FLAG: Final = TypeAdapter(bool)  # a form's true/false, on/off, 1/0, yes/no


@router.get("")
def list_speakers(ctx: HttpContext = Depends(context)) -> Any:
    """Every profile; provisional ones are unknown voices waiting for a name."""
    return run_command(ctx, "speakers/list", {})


@router.post("", status_code=201)
def enroll(args: EnrollArgs, ctx: HttpContext = Depends(context)) -> Any:
    """Enrol a person from stored recordings (ids only: a file is uploaded to `/upload`)."""
    return run_command(ctx, "speakers/enroll", args.model_dump())


_CLIPS_FORM: Final = openapi_form(
    {
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "files": {
            "type": "array",
            "items": {**BINARY, "description": "Clips of this person speaking"},
        },
        "do_not_keep": {"type": "boolean", "default": False},
    },
    ["name", "files"],
)


@router.post("/upload", status_code=201, openapi_extra=_CLIPS_FORM)
async def enroll_upload(request: Request, ctx: HttpContext = Depends(context)) -> Any:
    """Enrol a person from uploaded clips (any common audio format)."""
    uploads = ctx.settings.storage.data_dir / "uploads"
    async with (
        received_form(request, uploads, "files", max_files=_MAX_CLIPS) as form,
        request.app.state.decoding,  # see uploads.DECODING_AT_ONCE
    ):
        return await run_in_threadpool(_enroll_clips, ctx, form)


def _enroll_clips(ctx: HttpContext, form: ReceivedForm) -> Any:
    name = form.fields.get("name", "")
    if not 1 <= len(name) <= 100:
        raise ApiError(422, "invalid_request", "body.name: from 1 to 100 characters")
    try:
        do_not_keep = _FLAG.validate_python(form.fields.get("do_not_keep", "false"))
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", "body.do_not_keep: a boolean") from exc
    paths = [str(clip.path) for clip in form.files]
    names = _apart([clip.name or f"clip {i + 1}" for i, clip in enumerate(form.files)])
    heard_s = 0.0  # the clips together are held to the upload's audio limit
    limit_s = ctx.settings.http.max_upload_audio_s
    for path, client_name in zip(paths, names, strict=True):
        for block in upload_blocks(Path(path), client_name, limit_s, heard_s):  # counted only
            heard_s += block.size / SAMPLE_RATE_HZ
    args = {"name": name, "recording_ids": paths, "do_not_keep": do_not_keep}
    clips = dict(zip(paths, names, strict=True))
    try:
        data = run_command(ctx, "speakers/enroll", args, uploaded=clips)
    except ApiError as exc:  # the client's names, not our temporary paths
        for tmp_path, client_name in clips.items():
            exc.message = exc.message.replace(tmp_path, client_name)
        raise
    for source, client_name in zip(data["sources"], names, strict=True):
        source["source"] = client_name
    return data


def _apart(names: list[str]) -> list[str]:
    """The clips' names, one told apart from another of the same name (two "clip.wav" from
    two folders): enrolment knows each clip by its name (stored as its source)."""
    out: list[str] = []
    for name in names:
        n, unique = 1, name
        while unique in out:
            n += 1
            unique = f"{name} ({n})"
        out.append(unique)
    return out


@router.post("/rename")
def rename(args: RenameArgs, ctx: HttpContext = Depends(context)) -> Any:
    """Give a profile (e.g. an unknown voice) a name."""
    return run_command(ctx, "speakers/rename", args.model_dump())


@router.post("/merge")
def merge(args: MergeArgs, ctx: HttpContext = Depends(context)) -> Any:
    """Move one profile's voice into another."""
    return run_command(ctx, "speakers/merge", args.model_dump())


@router.post("/opt-out")
def opt_out(args: OptOutArgs, ctx: HttpContext = Depends(context)) -> Any:
    """Do not keep this voice: what it says is deleted once recognised (opt_out=false undoes)."""
    return run_command(ctx, "speakers/opt-out", args.model_dump())


# `:path`: a name may hold a "/" (AC/DC), which the client's %2F is in the path matched.
@router.delete("/{name:path}")
def delete(
    name: str,
    recordings: bool = Query(False, description="Also delete what they said"),
    ctx: HttpContext = Depends(context),
) -> Any:
    """Delete a profile's voice, and asked, its recordings."""
    return run_command(ctx, "speakers/delete", {"name": name, "recordings": recordings})


@router.get("/{name:path}/clips")
def clips(name: str, ctx: HttpContext = Depends(context)) -> Any:
    """Where this voice was heard, newest first: play `audio_url` from `start_s` to `end_s`."""
    rows = run_command(ctx, "speakers/clips", {"name": name})
    for row in rows:
        row["audio_url"] = f"/api/v1/recordings/{row['recording_id']}/audio"
    return rows
