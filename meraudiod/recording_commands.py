"""The commands on recordings: search, details, delete, purge and reprocess, their argument
schemas and the query behind `recordings/list`."""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from . import jobs
from .command_context import Args, Command, CommandContext
from .command_errors import CommandError, InvalidArguments, NotFound
from .db import Transaction, now
from .deletion import delete_recordings
from .recording_views import recording_details
from .recordings import ULID_RE, normalise_id, why_no_audio
from .retention import purge
from .unsaved import purge_unsaved

# A ULID in any case ("01jd2x..." too), as stored: upper case.
RecordingId = Annotated[str, AfterValidator(normalise_id)]


def _ulid(value: str) -> str:
    """A recording id that must be one (a cursor is compared, not looked up: "zzz" or a
    lower-case id compared as text would start again from the newest)."""
    rec_id = normalise_id(value)
    if not ULID_RE.fullmatch(rec_id):
        raise ValueError("not a recording id (a 26-character ULID)")
    return rec_id


class ListArgs(Args):
    """Recording search."""

    search: str | None = Field(None, max_length=200, description="Full-text search")
    since: str | None = Field(None, description="2h, 3d, 45m or an ISO date/time")
    speaker: str | None = Field(None, max_length=100, description="Speaker name")
    limit: int = Field(20, ge=1, le=1000, description="Most rows returned")
    cursor: Annotated[str, AfterValidator(_ulid)] | None = Field(
        None, max_length=26, description="Only recordings older than this id (the next page)"
    )


class IdArgs(Args):
    """One recording."""

    id: RecordingId = Field(min_length=26, max_length=26, description="Recording ULID")


class IdsArgs(Args):
    """Several recordings."""

    ids: list[RecordingId] = Field(min_length=1, max_length=1000, description="Recording ULIDs")


class PurgeArgs(Args):
    """What to purge (at least one criterion)."""

    older_than_days: float | None = Field(None, gt=0, description="Started this long ago")
    start: str | None = Field(None, description="ISO date/time: from")
    end: str | None = Field(None, description="ISO date/time: until")
    speaker: str | None = Field(None, description="Everything this speaker said")
    audio_only: bool = Field(False, description="Delete the audio, keep the text")
    dry_run: bool = Field(False, description="Count what would be deleted, delete nothing")


class ReprocessArgs(Args):
    """Transcribe again: given recordings, or every failed one."""

    ids: list[RecordingId] = Field(default_factory=list, max_length=1000)
    failed: bool = False


# --- queries used by the commands and the CLI ------------------------------------------------


def parse_since(value: str) -> float:
    """'2h', '3d', '45m', '30s' ago, or an ISO date/time, as Unix seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", value.strip())
    if match:
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return time.time() - float(match.group(1)) * seconds
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError as exc:
        raise InvalidArguments(
            f"{value!r} is not a time: use e.g. 2h, 3d or 2026-11-25T08:00"
        ) from exc


def _fts_query(text: str) -> str:
    """Plain words as an FTS5 query that user input cannot break."""
    words = re.findall(r"\w+", text)
    return " ".join(f'"{w}"' for w in words) or '""'


def list_recordings(conn: sqlite3.Connection, args: ListArgs) -> list[dict[str, Any]]:
    """Recordings, newest first, by text, time and speaker."""
    where: list[str] = ["1=1"]
    params: list[Any] = []
    if args.since:
        where.append("r.started_at >= ?")
        params.append(parse_since(args.since))
    if args.search:
        where.append(
            "r.id IN (SELECT s.recording_id FROM segments s JOIN segments_fts f"
            " ON f.rowid = s.id WHERE segments_fts MATCH ?)"
        )
        params.append(_fts_query(args.search))
    if args.cursor:
        where.append("r.id < ?")
        params.append(args.cursor)
    if args.speaker:  # a mistyped name is an error, not "they never said anything"
        where.append("r.id IN (SELECT recording_id FROM segments WHERE speaker_id = ?)")
        params.append(_speaker_id(conn, args.speaker))
    rows = conn.execute(
        "SELECT r.id, ROUND(r.start_s, 3) AS start_s, ROUND(r.end_s, 3) AS end_s,"
        " ROUND(r.duration_s, 3) AS duration_s, ROUND(r.started_at, 3) AS started_at, r.text,"
        " CASE WHEN j.state = 'running' THEN 'running' ELSE r.status END AS state"
        " FROM recordings r LEFT JOIN jobs j ON j.recording_id = r.id AND j.state = 'running'"
        f" WHERE {' AND '.join(where)} ORDER BY r.id DESC LIMIT ?",
        (*params, args.limit),
    )
    return [dict(zip(row.keys(), tuple(row), strict=True)) for row in rows]


# --- handlers ---------------------------------------------------------------------------------


def _recordings_list(ctx: CommandContext, args: ListArgs) -> Any:
    return list_recordings(ctx.conn, args)


def _recordings_get(ctx: CommandContext, args: IdArgs) -> Any:
    data = recording_details(ctx.conn, ctx.settings.storage.audio_dir, args.id)
    if data is None:
        raise NotFound(f"no recording {args.id}")
    if ctx.remote:  # where the file lives is the device's business (paths: admin only)
        data.pop("audio_path", None)
    return data


def _recordings_delete(ctx: CommandContext, args: IdsArgs) -> Any:
    # An id named twice (in either case: the ids are normalised) is one recording, deleted
    # once, not one missing.
    deleted = delete_recordings(ctx.conn, ctx.settings.storage.audio_dir, args.ids)
    absent = [rec_id for rec_id in dict.fromkeys(args.ids) if rec_id not in deleted.ids]
    return {"deleted": deleted.recordings, "missing": len(absent), "missing_ids": absent}


def _speaker_id(conn: sqlite3.Connection, name: str) -> str:
    from .profiles import Missing, profile_row

    try:
        return str(profile_row(conn, name)["id"])  # " Alice" is Alice
    except Missing as exc:
        raise NotFound(str(exc)) from exc


def _purge(ctx: CommandContext, args: PurgeArgs) -> Any:
    before = now() - args.older_than_days * 86400 if args.older_than_days else None
    if (args.start is None) != (args.end is None):
        # "--start T" alone once deleted everything after T: a range is given whole.
        raise InvalidArguments("a time range needs both start and end (end may be 'now')")
    if args.end:
        end = now() if args.end.strip().lower() == "now" else parse_since(args.end)
        before = min(before, end) if before is not None else end
    after = parse_since(args.start) if args.start else None
    if after is not None and args.end and after >= end:  # swapped ends would purge nothing
        raise InvalidArguments(f"the time range ends ({args.end}) before it starts ({args.start})")
    speaker = _speaker_id(ctx.conn, args.speaker) if args.speaker else None
    if before is None and after is None and speaker is None:
        raise InvalidArguments("purge needs older_than_days, start/end or speaker")
    result = purge(
        ctx.conn,
        ctx.settings.storage.audio_dir,
        before=before,
        after=after,
        speaker_id=speaker,
        audio_only=args.audio_only,
        dry_run=args.dry_run,
    )
    # Recordings a stopped daemon kept for its database to take (unsaved.py): no speaker
    # is known of them, and deleting their audio leaves nothing.
    kept = (
        0 if speaker else purge_unsaved(ctx.conn, ctx.settings.storage, before, after, args.dry_run)
    )
    return {
        "recordings_deleted": result.recordings_deleted + (0 if args.audio_only else kept),
        "audio_files_deleted": result.audio_files_deleted + kept,
    }


def _reprocess(ctx: CommandContext, args: ReprocessArgs) -> Any:
    if not (args.ids or args.failed):  # as the CLI says: nothing asked is a mistake
        raise InvalidArguments("reprocess needs ids or failed: true")
    ids = list(args.ids)
    if args.failed:
        ids += [
            str(r[0])
            for r in ctx.conn.execute("SELECT recording_id FROM jobs WHERE state='failed'")
        ]
    queued = 0
    skipped: list[dict[str, str]] = []
    with Transaction(ctx.conn):
        for rec_id in dict.fromkeys(ids):
            row = ctx.conn.execute(
                "SELECT audio_path FROM recordings WHERE id=?", (rec_id,)
            ).fetchone()
            if row is None:  # nothing queued: the transaction is rolled back
                raise NotFound(f"no recording {rec_id}")
            # Queued without its audio, the job would fail at once and take a good transcript
            # with it.
            missing = why_no_audio(ctx.settings.storage.audio_dir, row["audio_path"])
            if missing is not None:
                if rec_id in args.ids:
                    raise CommandError(
                        f"recording {rec_id} has no audio to transcribe again ({missing})"
                    )
                # A failed one among --failed whose audio is gone: it stays failed, said.
                skipped.append({"id": rec_id, "reason": missing})
                continue
            ctx.conn.execute(
                "DELETE FROM jobs WHERE recording_id=? AND state != 'running'", (rec_id,)
            )
            # The old transcript stays (and stays the state's last transcript) until the new
            # one replaces it; the job's kind makes its event `retranscribed`.
            jobs.enqueue(ctx.conn, rec_id, kind=jobs.REPROCESS_KIND)
            queued += 1
    return {"queued": queued, "skipped": skipped}


# The recordings part of the table (commands.COMMANDS).
RECORDING_COMMANDS: dict[str, Command] = {
    "recordings/list": Command(_recordings_list, ListArgs, help="Search recordings"),
    "recordings/get": Command(_recordings_get, IdArgs, help="One recording with segments"),
    "recordings/delete": Command(
        _recordings_delete, IdsArgs, admin=True, help="Delete recordings: audio, text, index"
    ),
    "purge": Command(_purge, PurgeArgs, admin=True, help="Delete by age, time range, speaker"),
    "reprocess": Command(_reprocess, ReprocessArgs, help="Transcribe recordings again"),
}
