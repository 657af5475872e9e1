"""The commands on voice profiles (`speakers/...`): list, enrol, rename, merge, delete,
opt out and clips, with their argument schemas; a change is announced on event/speaker."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from pydantic import Field

from .command_context import Args, Command, CommandContext, NoArgs, Surface
from .command_errors import CommandError, Conflict, NotFound
from .config import Settings
from .db import Transaction
from .messages import SpeakerEvent, enqueue

if TYPE_CHECKING:
    from .profiles import NameTaken

# A person's name, at most (a longer one given to the CLI could be addressed by no HTTP
# route or MQTT command: the page showed a profile it could not rename or delete).
MAX_NAME_CHARS: Final = 100
# Where the HTTP API's profile routes are (http/speakers.py's router prefix).
_HTTP_SPEAKERS = "/api/v1/persistent-speakers"


class NameArgs(Args):
    """One voice profile."""

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class EnrollArgs(Args):
    """Enrol a person from stored recordings."""

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
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

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    new_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class MergeArgs(Args):
    """Move one profile's voice into another."""

    source: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    target: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class DeleteSpeakerArgs(Args):
    """Delete a profile's embeddings, and with recordings=true what they said."""

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    recordings: bool = False


class OptOutArgs(Args):
    """Mark a profile "do not keep" (what it says is deleted), or undo that."""

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    opt_out: bool = Field(True, description="false undoes it")


def name_taken(exc: NameTaken, surface: Surface, settings: Settings | None = None) -> str:
    """A rename to a name taken, with the way to merge the two in the asking surface's own
    words: a client of the HTTP API or of MQTT may have no shell on the device."""
    merge_args = json.dumps({"source": exc.source, "target": exc.target})
    if surface == "http":
        way = f"POST {merge_args} to {_HTTP_SPEAKERS}/merge"
    elif surface == "mqtt":
        from .mqtt_client import base_topic  # paho: only where MQTT runs

        base = base_topic(settings) if settings is not None else "<base>"
        way = f"publish {merge_args} to {base}/request/speakers/merge"
    else:
        way = f"run `meraudiod speakers merge {shlex.join([exc.source, exc.target])}`"
    return f"{exc}: to make them one voice, {way}"


def _profiles(func: Callable[[], Any], ctx: CommandContext | None = None) -> Any:
    from .profiles import Missing, NameTaken, ProfileError

    try:
        return func()
    except Missing as exc:
        raise NotFound(str(exc)) from exc
    except NameTaken as exc:
        said = name_taken(exc, ctx.surface, ctx.settings) if ctx is not None else str(exc)
        raise Conflict(said) from exc
    except ProfileError as exc:
        raise CommandError(str(exc)) from exc


def _profile(ctx: CommandContext, name: str) -> tuple[str, str]:
    """The named profile's id and stored name (" Alice " is Alice)."""
    from .profiles import profile_row

    row = _profiles(lambda: profile_row(ctx.conn, name))
    return str(row["id"]), str(row["name"])


def _speaker_event(ctx: CommandContext, kind: str, profile: tuple[str, str]) -> None:
    """`enrolled` or `deleted` on event/speaker (with the profile's id and name), whichever
    surface ran the command: queued in the MQTT outbox (delivered by the daemon) and handed
    to the running daemon, if any."""
    m = ctx.settings.mqtt
    speaker_id, name = profile
    event = SpeakerEvent(
        node_id=m.node_id, area=m.area, event_type=kind, speaker_id=speaker_id, name=name
    )
    if m.enabled:
        with Transaction(ctx.conn):
            enqueue(ctx.conn, event, max_rows=m.outbox_max_rows)
    if ctx.runtime is not None:
        ctx.runtime.published(event)


def _speakers_list(ctx: CommandContext, args: NoArgs) -> Any:
    from .profiles import current_model, list_profiles
    from .scoring import calibration_for, uncalibrated

    model = current_model(ctx.settings)
    calibration = calibration_for(model) or uncalibrated(model)  # for each one's consistency
    return [asdict(p) for p in list_profiles(ctx.conn, model, calibration)]


def _speakers_enroll(ctx: CommandContext, args: EnrollArgs) -> Any:
    from .enrolment import enroll
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
    _speaker_event(ctx, "enrolled", _profile(ctx, args.name))
    return {"name": args.name, "sources": [asdict(r) for r in results]}


def _speakers_rename(ctx: CommandContext, args: RenameArgs) -> Any:
    from .profiles import rename

    _, new_name = _profiles(lambda: rename(ctx.conn, args.name, args.new_name), ctx)
    return {"name": new_name}


def _speakers_merge(ctx: CommandContext, args: MergeArgs) -> Any:
    from .profiles import merge

    moved = _profiles(lambda: merge(ctx.conn, args.source, args.target))
    return {"target": args.target, "embeddings_moved": moved}


def _speakers_delete(ctx: CommandContext, args: DeleteSpeakerArgs) -> Any:
    from .profiles import delete

    audio_dir = ctx.settings.storage.audio_dir
    profile = _profile(ctx, args.name)  # its id, before it is gone
    deleted = _profiles(lambda: delete(ctx.conn, audio_dir, args.name, args.recordings))
    _speaker_event(ctx, "deleted", profile)
    return {"name": args.name, **asdict(deleted)}


def _speakers_opt_out(ctx: CommandContext, args: OptOutArgs) -> Any:
    from .profiles import set_opt_out

    _profiles(lambda: set_opt_out(ctx.conn, args.name, args.opt_out))
    return {"name": args.name, "opt_out": args.opt_out}


def _speakers_clips(ctx: CommandContext, args: NameArgs) -> Any:
    from .profiles import voice_clips

    return _profiles(lambda: voice_clips(ctx.conn, args.name))


# The voice-profile part of the table (commands.COMMANDS).
SPEAKER_COMMANDS: dict[str, Command] = {
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
}
