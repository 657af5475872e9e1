"""/api/v1/persistent-speakers: voice profiles, the review of unknown voices. Each request
body is the schema of the command it runs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from ..audio import SAMPLE_RATE_HZ
from ..speaker_commands import EnrollArgs, MergeArgs, OptOutArgs, RenameArgs
from .common import ApiError, HttpContext, run_command
from .recordings import context
from .uploads import upload_blocks

router = APIRouter(prefix="/api/v1/persistent-speakers", tags=["speakers"])


@router.get("")
def list_speakers(ctx: HttpContext = Depends(context)) -> Any:
    """Every profile; provisional ones are unknown voices waiting for a name."""
    return run_command(ctx, "speakers/list", {})


@router.post("", status_code=201)
def enroll(args: EnrollArgs, ctx: HttpContext = Depends(context)) -> Any:
    """Enrol a person from stored recordings (ids only: a file is uploaded to `/upload`)."""
    return run_command(ctx, "speakers/enroll", args.model_dump())


@router.post("/upload", status_code=201)
def enroll_upload(
    name: str = Form(..., min_length=1, max_length=100),
    files: list[UploadFile] = File(..., description="Clips of this person speaking"),
    do_not_keep: bool = Form(False),
    ctx: HttpContext = Depends(context),
) -> Any:
    """Enrol a person from uploaded clips (any common audio format)."""
    uploads = ctx.settings.storage.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=uploads) as tmp:
        paths: list[str] = []
        names = [upload.filename or f"clip {i + 1}" for i, upload in enumerate(files[:20])]
        heard_s = 0.0  # the clips together are held to the upload's audio limit
        for i, upload in enumerate(files[:20]):
            clip = Path(tmp) / f"clip{i}{Path(upload.filename or '').suffix[:8]}"
            with clip.open("wb") as out:
                shutil.copyfileobj(upload.file, out)
            limit_s = ctx.settings.http.max_upload_audio_s
            for block in upload_blocks(clip, names[i], limit_s, heard_s):  # counted, not kept
                heard_s += block.size / SAMPLE_RATE_HZ
            paths.append(str(clip))
        args = {"name": name, "recording_ids": paths, "do_not_keep": do_not_keep}
        try:
            data = run_command(ctx, "speakers/enroll", args, uploaded=tuple(paths))
        except ApiError as exc:  # the client's names, not our temporary paths
            for tmp_path, client_name in zip(paths, names, strict=True):
                exc.message = exc.message.replace(tmp_path, client_name)
            raise
    for source, client_name in zip(data["sources"], names, strict=True):
        source["source"] = client_name
    return data


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


@router.delete("/{name}")
def delete(
    name: str,
    recordings: bool = Query(False, description="Also delete what they said"),
    ctx: HttpContext = Depends(context),
) -> Any:
    """Delete a profile's voice, and asked, its recordings."""
    return run_command(ctx, "speakers/delete", {"name": name, "recordings": recordings})


@router.get("/{name}/clips")
def clips(name: str, ctx: HttpContext = Depends(context)) -> Any:
    """Where this voice was heard, newest first: play `audio_url` from `start_s` to `end_s`."""
    rows = run_command(ctx, "speakers/clips", {"name": name})
    for row in rows:
        row["audio_url"] = f"/api/v1/recordings/{row['recording_id']}/audio"
    return rows
