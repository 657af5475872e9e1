"""The command table, shared by MQTT (`request/<command>`) and the CLI.

Every request is validated before anything changes: malformed JSON, a wrong type, an unknown
command, an unknown argument or an oversized payload each get an error response.
Destructive commands run only when the caller is allowed admin commands.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from . import jobs
from .command_errors import (
    INTERNAL_CODE,
    CommandError,
    Conflict,
    Forbidden,
    InvalidArguments,
    NotFound,
)
from .config import Settings
from .db import Transaction, now
from .messages import Event, Response, SpeakerEvent, enqueue
from .payloads import PayloadError, decode_request
from .recordings import delete_recordings, normalise_id, recording_details
from .retention import purge
from .status import status

_LOGGER = logging.getLogger(__name__)
__all__ = ["CommandError", "Conflict", "Forbidden", "InvalidArguments", "NotFound"]


class Runtime(Protocol):
    """What a running daemon lets commands change."""

    def set_listening(self, on: bool) -> None:
        """Open or close the microphone."""

    def speaker_stage(self) -> Any:
        """The loaded speaker models (a SpeakerStage), or None."""

    def published(self, event: Event) -> None:
        """A command queued an event in the outbox: deliver it now, and to the live sockets."""


@dataclass
class CommandContext:
    """Where a command runs: its database connection, settings, and who asks."""

    conn: sqlite3.Connection
    settings: Settings
    admin: bool = True
    runtime: Runtime | None = None
    # Over MQTT a request must be cheap: `status` then reads counters, never the disk tree.
    remote: bool = False
    # Files a command may read (enrolment clips). None: any path (the CLI, run on the device
    # by its admin). A remote surface gives only the files it received itself (an HTTP
    # upload's clips), so no client can make the daemon read a path of its choosing.
    readable_files: tuple[str, ...] | None = ()


# A ULID in any case ("01jd2x..." too), as stored: upper case.
RecordingId = Annotated[str, AfterValidator(normalise_id)]


class Args(BaseModel):
    """Base of command arguments: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not a number


class NoArgs(Args):
    """A command without arguments."""


class ListArgs(Args):
    """Recording search."""

    search: str | None = Field(None, max_length=200, description="Full-text search")
    since: str | None = Field(None, description="2h, 3d, 45m or an ISO date/time")
    speaker: str | None = Field(None, max_length=100, description="Speaker name")
    limit: int = Field(20, ge=1, le=1000, description="Most rows returned")
    cursor: str | None = Field(
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


class NameArgs(Args):
    """One voice profile."""

    name: str = Field(min_length=1, max_length=100)


class EnrollArgs(Args):
    """Enrol a person from stored recordings."""

    name: str = Field(min_length=1, max_length=100)
    # Not RecordingId: a file path (the HTTP upload's clips) must keep its case; profiles
    # normalises what is not a file as an id. Files only from the caller's own upload or the
    # CLI (CommandContext.readable_files).
    recording_ids: list[str] = Field(
        min_length=1,
        max_length=20,
        description="Recording ULIDs (any case); audio files only from the CLI on the device",
    )
    do_not_keep: bool = Field(False, description="Recognise this person only to delete them")


class RenameArgs(Args):
    """Give a profile (e.g. a provisional "unknown-3") a name."""

    name: str = Field(min_length=1, max_length=100)
    new_name: str = Field(min_length=1, max_length=100)


class MergeArgs(Args):
    """Move one profile's voice into another."""

    source: str = Field(min_length=1, max_length=100)
    target: str = Field(min_length=1, max_length=100)


class DeleteSpeakerArgs(Args):
    """Delete a profile's embeddings, and with recordings=true what they said."""

    name: str = Field(min_length=1, max_length=100)
    recordings: bool = False


class OptOutArgs(Args):
    """Mark a profile "do not keep" (what it says is deleted), or undo that."""

    name: str = Field(min_length=1, max_length=100)
    opt_out: bool = Field(True, description="false undoes it")


class ReprocessArgs(Args):
    """Transcribe again: given recordings, or every failed one."""

    ids: list[RecordingId] = Field(default_factory=list, max_length=1000)
    failed: bool = False


@dataclass(frozen=True)
class Command:
    """One entry of the table."""

    handler: Callable[[CommandContext, Any], Any]
    args: type[Args] = NoArgs
    admin: bool = False
    help: str = ""


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
    if args.speaker:
        where.append(
            "r.id IN (SELECT s.recording_id FROM segments s JOIN speakers p"
            " ON p.id = s.speaker_id WHERE p.name = ?)"
        )
        params.append(args.speaker)
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


def _status(ctx: CommandContext, args: NoArgs) -> Any:
    return status(ctx.conn, ctx.settings, disk_use=not ctx.remote)


def _recordings_list(ctx: CommandContext, args: ListArgs) -> Any:
    return list_recordings(ctx.conn, args)


def _recordings_get(ctx: CommandContext, args: IdArgs) -> Any:
    data = recording_details(ctx.conn, ctx.settings.storage.audio_dir, args.id)
    if data is None:
        raise NotFound(f"no recording {args.id}")
    return data


def _recordings_delete(ctx: CommandContext, args: IdsArgs) -> Any:
    deleted = delete_recordings(ctx.conn, ctx.settings.storage.audio_dir, args.ids).recordings
    return {"deleted": deleted, "missing": len(args.ids) - deleted}


def _speaker_id(conn: sqlite3.Connection, name: str) -> str:
    row = conn.execute("SELECT id FROM speakers WHERE name=?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no speaker named {name!r}")
    return str(row["id"])


def _purge(ctx: CommandContext, args: PurgeArgs) -> Any:
    before = now() - args.older_than_days * 86400 if args.older_than_days else None
    if (args.start is None) != (args.end is None):
        # "--start T" alone once deleted everything after T: a range is given whole.
        raise InvalidArguments("a time range needs both start and end (end may be 'now')")
    if args.end:
        end = now() if args.end.strip().lower() == "now" else parse_since(args.end)
        before = min(before, end) if before is not None else end
    after = parse_since(args.start) if args.start else None
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
    return {
        "recordings_deleted": result.recordings_deleted,
        "audio_files_deleted": result.audio_files_deleted,
    }


def _reprocess(ctx: CommandContext, args: ReprocessArgs) -> Any:
    ids = list(args.ids)
    if args.failed:
        ids += [
            str(r[0])
            for r in ctx.conn.execute("SELECT recording_id FROM jobs WHERE state='failed'")
        ]
    queued = 0
    with Transaction(ctx.conn):
        for rec_id in dict.fromkeys(ids):
            row = ctx.conn.execute(
                "SELECT audio_path FROM recordings WHERE id=?", (rec_id,)
            ).fetchone()
            if row is None:  # nothing queued: the transaction is rolled back
                raise NotFound(f"no recording {rec_id}")
            if not row["audio_path"]:
                if rec_id in args.ids:
                    raise CommandError(f"recording {rec_id} has no audio to transcribe again")
                continue  # a failed one among --failed whose audio is gone
            ctx.conn.execute(
                "DELETE FROM jobs WHERE recording_id=? AND state != 'running'", (rec_id,)
            )
            # The old transcript stays (and stays the state's last transcript) until the new
            # one replaces it; the job's kind makes its event `retranscribed`.
            jobs.enqueue(ctx.conn, rec_id, kind=jobs.REPROCESS_KIND)
            queued += 1
    return {"queued": queued}


def _profiles(func: Callable[[], Any]) -> Any:
    from .profiles import Missing, NameTaken, ProfileError

    try:
        return func()
    except Missing as exc:
        raise NotFound(str(exc)) from exc
    except NameTaken as exc:
        raise Conflict(str(exc)) from exc
    except ProfileError as exc:
        raise CommandError(str(exc)) from exc


def _speaker_event(ctx: CommandContext, kind: str, name: str) -> None:
    """`enrolled` or `deleted` on event/speaker, whichever surface ran the command: queued in
    the MQTT outbox (delivered by the daemon) and handed to the running daemon, if any."""
    m = ctx.settings.mqtt
    event = SpeakerEvent(node_id=m.node_id, area=m.area, event_type=kind, name=name)
    if m.enabled:
        with Transaction(ctx.conn):
            enqueue(ctx.conn, event, max_rows=m.outbox_max_rows)
    if ctx.runtime is not None:
        ctx.runtime.published(event)


def _speakers_list(ctx: CommandContext, args: NoArgs) -> Any:
    from .profiles import current_model, list_profiles

    return [asdict(p) for p in list_profiles(ctx.conn, current_model(ctx.settings))]


def _speakers_enroll(ctx: CommandContext, args: EnrollArgs) -> Any:
    from .profiles import enroll
    from .speakers import SpeakerStage
    from .voiceprints import SpeakerError

    stage = ctx.runtime.speaker_stage() if ctx.runtime is not None else None
    if stage is None:
        try:
            stage = SpeakerStage(ctx.settings)
        except SpeakerError as exc:
            raise CommandError(str(exc)) from exc
    results = _profiles(
        lambda: enroll(
            ctx.conn,
            stage,
            args.name,
            args.recording_ids,
            args.do_not_keep,
            files=ctx.readable_files,
        )
    )
    if not any(r.stored for r in results):
        raise CommandError(
            f"nothing enrolled for {args.name}: "
            + "; ".join(f"{r.source}: {r.reason}" for r in results)
        )
    _speaker_event(ctx, "enrolled", args.name)
    return {"name": args.name, "sources": [asdict(r) for r in results]}


def _speakers_rename(ctx: CommandContext, args: RenameArgs) -> Any:
    from .profiles import rename

    _profiles(lambda: rename(ctx.conn, args.name, args.new_name))
    return {"name": args.new_name}


def _speakers_merge(ctx: CommandContext, args: MergeArgs) -> Any:
    from .profiles import merge

    moved = _profiles(lambda: merge(ctx.conn, args.source, args.target))
    return {"target": args.target, "embeddings_moved": moved}


def _speakers_delete(ctx: CommandContext, args: DeleteSpeakerArgs) -> Any:
    from .profiles import delete

    audio_dir = ctx.settings.storage.audio_dir
    deleted = _profiles(lambda: delete(ctx.conn, audio_dir, args.name, args.recordings))
    _speaker_event(ctx, "deleted", args.name)
    return {"name": args.name, **asdict(deleted)}


def _speakers_opt_out(ctx: CommandContext, args: OptOutArgs) -> Any:
    from .profiles import set_opt_out

    _profiles(lambda: set_opt_out(ctx.conn, args.name, args.opt_out))
    return {"name": args.name, "opt_out": args.opt_out}


def _speakers_clips(ctx: CommandContext, args: NameArgs) -> Any:
    from .profiles import voice_clips

    return _profiles(lambda: voice_clips(ctx.conn, args.name))


def _config_get(ctx: CommandContext, args: NoArgs) -> Any:
    return ctx.settings.model_dump(mode="json", exclude={"mqtt": {"password"}})


COMMANDS: dict[str, Command] = {
    "status": Command(_status, help="Daemon, backlog, last transcript, disk"),
    "recordings/list": Command(_recordings_list, ListArgs, help="Search recordings"),
    "recordings/get": Command(_recordings_get, IdArgs, help="One recording with segments"),
    "recordings/delete": Command(
        _recordings_delete, IdsArgs, admin=True, help="Delete recordings: audio, text, index"
    ),
    "speakers/list": Command(_speakers_list, help="Voice profiles"),
    "speakers/enroll": Command(
        _speakers_enroll, EnrollArgs, admin=True, help="Enrol a person from stored recordings"
    ),
    "speakers/rename": Command(_speakers_rename, RenameArgs, admin=True, help="Rename a profile"),
    "speakers/merge": Command(_speakers_merge, MergeArgs, admin=True, help="Merge two profiles"),
    "speakers/delete": Command(
        _speakers_delete,
        DeleteSpeakerArgs,
        admin=True,
        help="Delete a profile's voice (and, asked, its recordings)",
    ),
    "speakers/opt-out": Command(
        _speakers_opt_out, OptOutArgs, admin=True, help="Do not keep a voice (or undo that)"
    ),
    "speakers/clips": Command(
        _speakers_clips, NameArgs, help="Where a voice was heard: recordings and times"
    ),
    "purge": Command(_purge, PurgeArgs, admin=True, help="Delete by age, time range, speaker"),
    "reprocess": Command(_reprocess, ReprocessArgs, help="Transcribe recordings again"),
    "config/get": Command(
        _config_get,
        admin=True,  # broker host, user name and paths are for an admin only
        help="The effective configuration, without secrets",
    ),
}


def execute(ctx: CommandContext, name: str, args: dict[str, Any]) -> Any:
    """Validate and run one command; raises CommandError."""
    command = COMMANDS.get(name)
    if command is None:
        raise InvalidArguments(f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}")
    if command.admin and not ctx.admin:
        raise Forbidden(f"{name} changes or deletes data: set mqtt.allow_admin_commands")
    try:
        parsed = command.args.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArguments(f"invalid arguments: {problems}") from exc
    return command.handler(ctx, parsed)


def dispatch(ctx: CommandContext, name: str, payload: bytes) -> Response:
    """Run a request that came over MQTT and build its response; never raises: everything
    about the message, its parsing included, is inside the error handling."""
    transaction: str | int | None = None
    try:
        request = decode_request(name, payload)
        transaction = request.transaction
        data = execute(ctx, request.command, request.args)
        json.dumps(data, default=str)  # fail here, not on the way out
        return Response(name, "ok", data=data, transaction=transaction)
    except CommandError as exc:
        return Response(name, "error", error=str(exc), transaction=transaction, code=exc.code)
    except PayloadError as exc:
        return Response(
            name, "error", error=str(exc), transaction=transaction, code=InvalidArguments.code
        )
    except Exception as exc:  # a bug must still answer the caller and leave the daemon up
        _LOGGER.exception("command %s failed", name)
        return Response(
            name,
            "error",
            error=f"internal error: {exc}",
            transaction=transaction,
            code=INTERNAL_CODE,
        )
