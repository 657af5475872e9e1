"""Uploads and their tasks, and the listening switch.

An uploaded file becomes a recording of its own (source `upload:<name>`, or `client:<name>`
for a client's own recording) with a transcription job: the task is that durable job, so a
restart loses none, and its id is the recording's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..audio import (
    SAMPLE_RATE_HZ,
    AudioDecodeError,
    AudioTruncatedError,
    Int16Array,
    iter_file_pcm,
)
from ..config import Settings
from ..db import now
from ..recording_views import analysis_record
from ..recordings import Recording, RecordingStore
from ..retention import disk_free_mb, read_only_dirs
from .common import ApiError, HttpContext, check_id, run_command
from .receive import BINARY, ReceivedFile, openapi_form, received_form
from .recordings import context

_LOGGER = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1")
_TASK_STATES: Final = {"pending": "pending", "running": "running", "done": "completed"}
_SWITCH_WAIT_S: Final = 10.0
FIELD: Final = "file"  # the form field that carries an upload
_Route = TypeVar("_Route", bound=Callable[..., Awaitable[dict[str, Any]]])
# Uploads decoded and stored (or clips enrolled) at once; more wait for their turn without a
# thread. Each held one of the 40 threads every route that is not async runs on: 40 at once
# (a burst of uploads) left none for the others, and /health/ready, status or the listening
# switch waited 10 s and more; on two cores more at once are not done sooner.
DECODING_AT_ONCE: Final = 8


def upload_blocks(
    path: Path, name: str, limit_s: float, before_s: float = 0.0
) -> Generator[Int16Array, None, None]:
    """An uploaded file's audio, a block at a time (the format is judged by decoding it, not
    by its name): 415 when it is not audio, 413 as soon as it (after `before_s` of earlier
    clips of the same request) passes `limit_s`, so nothing beyond the limit is decoded; 422
    when it is cut short (or its header announces more than it holds)."""
    limit_samples = int(limit_s * SAMPLE_RATE_HZ)
    seen = int(before_s * SAMPLE_RATE_HZ)
    try:
        for block in iter_file_pcm(path):
            seen += block.size
            if seen > limit_samples:
                raise ApiError(
                    413,
                    "too_large",
                    f"{name}: the audio lasts over the limit of {limit_s:g} s"
                    " (http.max_upload_audio_s)",
                )
            yield block
    except AudioTruncatedError as exc:  # audio, but not all of it: stored, it would lie
        raise ApiError(
            422, "damaged_audio", f"{name}: cut or damaged ({exc.where}); nothing was stored"
        ) from exc
    except AudioDecodeError as exc:
        raise ApiError(
            415, "unsupported_media", f"{name}: not an audio file this device can decode"
        ) from exc


def refuse_unwritable_storage(settings: Settings) -> None:
    """507 on a read-only file system, where nothing can be stored, and below
    retention.min_free_disk_mb, where no audio is written: an upload could fill the disk to
    its last byte, where the database cannot be written either."""
    read_only = read_only_dirs(settings)
    if read_only:
        raise ApiError(
            507,
            "insufficient_storage",
            f"read-only file system: {read_only[0]}; nothing was stored",
        )
    least_mb = settings.retention.min_free_disk_mb
    for path in (settings.storage.data_dir, settings.storage.audio_dir):
        free_mb = disk_free_mb(path)
        if free_mb < least_mb:
            raise ApiError(
                507,
                "insufficient_storage",
                f"disk almost full: {free_mb:.0f} MB free in {path}, under"
                f" retention.min_free_disk_mb ({least_mb:g}); nothing was stored",
            )


class _Abandoned(Exception):
    """The request gave up on its upload (the daemon is stopping): store nothing more."""


class _Claim:
    """Whether an upload's request still waits for it. A request cancelled as the daemon
    stops (after uvicorn's grace) gives up under the lock its thread holds while committing
    the recording: its client is told "nothing was stored" only if nothing was, and gets
    its 202 if the commit came first. (The thread went on alone: an upload stored after its
    client was told 500 was a recording nobody knew of, sent again.)"""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.stored_id: str | None = None
        self._holding = False

    def blocks(self, blocks: Iterable[Int16Array]) -> Iterator[Int16Array]:
        """The blocks, until the request gives up."""
        for block in blocks:
            if self.abandoned:
                raise _Abandoned
            yield block

    def hold(self, conn: sqlite3.Connection, recording: Recording) -> None:
        """In the recording's transaction: the lock, held until it commits (see release)."""
        self.lock.acquire()
        self._holding = True
        if self.abandoned:
            self.release()
            raise _Abandoned

    def release(self) -> None:
        """After the commit (or its failure)."""
        if self._holding:
            self._holding = False
            self.lock.release()


async def store_upload(request: Request, ctx: HttpContext, kind: str) -> str:
    """Receive an uploaded file into the data directory, then store its audio, decoded and
    written a block at a time, as a recording with a transcription job; returns its id."""
    refuse_unwritable_storage(ctx.settings)  # before a byte is received
    async with received_form(request, ctx.settings.storage.data_dir / "uploads", FIELD) as form:
        claim = _Claim()
        try:
            async with request.app.state.decoding:
                return await run_in_threadpool(_store, ctx, form.files[0], kind, claim)
        except asyncio.CancelledError:
            with claim.lock:  # waits only for a commit under way
                claim.abandoned = claim.stored_id is None
            if claim.stored_id is None:
                raise  # the Guard answers 503: nothing was stored
            return claim.stored_id


def _store(ctx: HttpContext, received: ReceivedFile, kind: str, claim: _Claim) -> str:
    name = Path(received.name or "upload").name[:100] or "upload"
    limit_s = ctx.settings.http.max_upload_audio_s
    with contextlib.closing(upload_blocks(received.path, name, limit_s)) as blocks:
        first = next(blocks, None)
        if first is None:
            raise ApiError(422, "no_audio", f"{name}: the file holds no audio")
        storage, recorder = ctx.settings.storage, ctx.settings.recorder
        with ctx.connect() as conn:
            store = RecordingStore(conn, storage.audio_dir, recorder.audio_format)
            try:
                recording = store.save_blocks(
                    claim.blocks(itertools.chain([first], blocks)),
                    source=f"{kind}:{name}",
                    started_at=now(),
                    transcribe=ctx.settings.asr.enabled,
                    in_transaction=claim.hold,
                )
                claim.stored_id = recording.id
            finally:
                claim.release()
    ctx.wake_worker()
    return recording.id


def _upload_route(path: str, tag: str, description: str) -> Callable[[_Route], _Route]:
    """POST `path`, answering 202, its form (one file) in the API's documentation."""
    form = openapi_form({FIELD: {**BINARY, "description": description}}, [FIELD])
    return router.post(path, status_code=202, tags=[tag], openapi_extra=form)


@_upload_route("/analysis/upload", "analysis", "Audio in any common format")
async def analysis_upload(request: Request, ctx: HttpContext = Depends(context)) -> dict[str, Any]:
    """Transcribe a file: poll `/api/v1/tasks/{task_id}` for the result."""
    task_id = await store_upload(request, ctx, "upload")
    return {"task_id": task_id, "status": "pending", "status_url": f"/api/v1/tasks/{task_id}"}


@_upload_route("/vad/upload_recording", "listening", "A client's own recording of speech")
async def upload_recording(request: Request, ctx: HttpContext = Depends(context)) -> dict[str, Any]:
    """A client's own recording into the queue, transcribed like the microphone's."""
    rec_id = await store_upload(request, ctx, "client")
    return {"recording_id": rec_id, "task_id": rec_id, "status_url": f"/api/v1/tasks/{rec_id}"}


@router.get("/tasks/{task_id}", tags=["analysis"])
def task(task_id: str, ctx: HttpContext = Depends(context)) -> dict[str, Any]:
    """pending, running, completed or failed; completed carries what `analyze --json` prints.
    `attempts` counts failed tries, `crashes` the tries the process died in (a restart)."""
    task_id = check_id(task_id, "task")
    with ctx.connect() as conn:
        row = conn.execute(
            "SELECT source, duration_s FROM recordings WHERE id=?"
            " AND (source LIKE 'upload:%' OR source LIKE 'client:%')",
            (task_id,),
        ).fetchone()
        if row is None:
            raise ApiError(404, "not_found", f"no task {task_id}")
        job = conn.execute(
            "SELECT state, attempts, crashes, error FROM jobs WHERE recording_id=?"
            " ORDER BY id DESC LIMIT 1",
            (task_id,),
        ).fetchone()
        state = _TASK_STATES.get(job["state"], "failed") if job is not None else "completed"
        result = None
        if state == "completed":
            result = {
                "file": str(row["source"]).split(":", 1)[1],
                "duration_s": round(float(row["duration_s"]), 3),
                "recordings": [analysis_record(conn, ctx.settings.storage.audio_dir, task_id)],
            }
    return {
        "task_id": task_id,
        "status": state,
        "progress": {"pending": 0.0, "completed": 1.0}.get(state),
        "attempts": job["attempts"] if job is not None else 0,  # failed tries
        "crashes": job["crashes"] if job is not None else 0,  # tries the process died in
        # Failed, why; waiting to be tried again, why the last try failed (it said null).
        "error": job["error"] if job is not None and state != "completed" else None,
        "result": result,
    }


def _switch(ctx: HttpContext, on: bool) -> dict[str, Any]:
    """The listening switch runs on the daemon's main thread, as MQTT's does."""
    from ..mqtt import Inbound

    daemon = ctx.daemon
    if daemon is None:
        raise ApiError(503, "unavailable", "no daemon to switch")
    daemon.inbound.put(Inbound("listening", "listening/set", b"ON" if on else b"OFF"), timeout=5)
    deadline = time.monotonic() + _SWITCH_WAIT_S
    while daemon.listening != on and time.monotonic() < deadline:
        time.sleep(0.05)
    if daemon.listening != on:
        raise ApiError(503, "unavailable", "the daemon did not switch in time")
    return {"listening": daemon.listening}


@router.post("/vad/start", tags=["listening"])
def vad_start(ctx: HttpContext = Depends(context)) -> dict[str, Any]:
    """Listen (open the microphone); persisted across restarts."""
    return _switch(ctx, True)


@router.post("/vad/stop", tags=["listening"])
def vad_stop(ctx: HttpContext = Depends(context)) -> dict[str, Any]:
    """Stop listening (close the microphone); persisted across restarts."""
    return _switch(ctx, False)


@router.get("/status", tags=["listening"])
def status(ctx: HttpContext = Depends(context)) -> Any:
    """Listening, backlog, disk, MQTT (the `status` command)."""
    data = run_command(ctx, "status", {})
    if ctx.daemon is not None:  # the heartbeat is up to 5 s old; the switch is live
        data["listening"] = ctx.daemon.listening
        data["muted"] = not ctx.daemon.listening
    return data
