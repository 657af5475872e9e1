"""`meraudiod speakers`: enrol people, list, rename, merge, delete, opt out."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli_common import (
    TEXT,
    config_option,
    database_error,
    echo_json,
    file_error,
    fmt_time,
    json_option,
    open_store,
    refuse_unmounted,
    settings_from,
)
from .mounts import models_dir
from .wording import counted


@click.group("speakers")
def speakers_group() -> None:
    """Voice profiles: enrol people, name or merge unknown voices, delete, opt out.

    \b
    Examples:
      meraudiod speakers enroll Alice alice1.wav alice2.m4a alice3.flac
      meraudiod speakers rename unknown-3 Carol
    """


def _profiles_call(conn: sqlite3.Connection, func: Callable[[], Any]) -> Any:
    from .profiles import NameTaken, ProfileError
    from .speaker_commands import name_taken

    try:
        return func()
    except NameTaken as exc:
        raise click.ClickException(name_taken(exc, "cli")) from exc
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise file_error(exc) from exc
    except sqlite3.Error as exc:
        raise database_error(conn, exc) from exc


@speakers_group.command("list")
@config_option
@json_option
def speakers_list(config_path: Path | None, as_json: bool) -> None:
    """Named people first, then provisional "unknown-N" voices, with what is stored for each.

    \b
    Examples:
      meraudiod speakers list
      meraudiod speakers list --json | jq '.[] | select(.provisional)'
    """
    from dataclasses import asdict

    from .profiles import current_model, list_profiles
    from .scoring import calibration_for, uncalibrated

    settings = settings_from(config_path)
    model = current_model(settings)
    calibration = calibration_for(model) or uncalibrated(model)
    rows = list_profiles(open_store(settings), model, calibration)
    if as_json:
        echo_json([asdict(r) for r in rows])
        return
    for r in rows:
        flags = ", ".join(
            f
            for f in (
                "provisional" if r.provisional else "",
                "do not keep" if r.opt_out else "",
                f"{r.stale} stale (re-enrol)" if r.stale else "",
                "one clip unlike the others (re-enrol it)"
                if r.consistency is not None and r.consistency < settings.speakers.threshold
                else "",
            )
            if f
        )
        click.echo(
            f"{r.name:<20} {counted(r.embeddings, 'embedding'):>14} {r.speech_s:6.1f} s"
            + (f"  consistency {r.consistency:.2f}" if r.consistency is not None else "")
            + "  heard in"
            f" {counted(r.recordings, 'recording'):>15}, last {fmt_time(r.last_heard_at)}"
            + (f"  [{flags}]" if flags else "")
        )
    if not rows:
        click.echo("no speakers yet: meraudiod speakers enroll NAME FILE...", err=True)


@speakers_group.command("enroll")
@config_option
@click.argument("name", type=TEXT)
@click.argument("sources", nargs=-1, required=True)
@click.option("--do-not-keep", is_flag=True, help="Recognise this person only to delete them.")
def speakers_enroll(
    config_path: Path | None, name: str, sources: tuple[str, ...], do_not_keep: bool
) -> None:
    """Enrol NAME from audio files or stored recordings (one embedding each).

    Each source needs at least 1.5 s of speech; three clips of 3-8 s each, in different
    sessions, work well. A clip that is short, clipped, noisy, holds two voices or does not
    sound like the others is stored with a warning.

    \b
    Examples:
      meraudiod speakers enroll Alice alice1.wav alice2.m4a alice3.flac
      meraudiod speakers enroll Bob 01JD2X9K8M7Q6R5S4T3V2W1X0Y   # a stored recording
    """
    from .enrolment import enroll
    from .speakers import SpeakerStage
    from .voiceprints import SpeakerError

    settings = settings_from(config_path)
    refuse_unmounted(models_dir(settings))  # its model, read before the store is opened
    try:
        stage = SpeakerStage(settings)
    except SpeakerError as exc:
        raise click.ClickException(str(exc)) from exc
    conn = open_store(settings, create=True)
    results = _profiles_call(conn, lambda: enroll(conn, stage, name, sources, do_not_keep))
    for r in results:
        state = "ok" if r.stored else f"skipped: {r.reason}"
        click.echo(f"{r.source}: {r.speech_s:.1f} s of speech, {state}")
        for warning in r.warnings:
            click.echo(f"  warning: {warning}")
    stored = sum(r.stored for r in results)
    name = name.strip()  # as enroll stored it (" Alice " is Alice)
    if not stored:
        raise click.ClickException(f"nothing enrolled for {name}")
    click.echo(f"{name}: {counted(stored, 'embedding')} added")
    if not settings.speakers.enabled:
        click.echo("note: identification is off; set speakers.enabled = true to use it", err=True)


@speakers_group.command("test")
@config_option
@json_option
@click.argument("name", type=TEXT)
@click.argument("sources", nargs=-1, required=True)
def speakers_test(
    config_path: Path | None, as_json: bool, name: str, sources: tuple[str, ...]
) -> None:
    """Score audio files or stored recordings against everyone, as identification would:
    why NAME is (not) recognised in them. Nothing is stored.

    \b
    Examples:
      meraudiod speakers test Alice kitchen-command.wav
      meraudiod speakers test Alice 01JD2X9K8M7Q6R5S4T3V2W1X0Y --json
    """
    from dataclasses import asdict

    from .enrolment import test_clips
    from .speakers import SpeakerStage
    from .voiceprints import SpeakerError

    settings = settings_from(config_path)
    refuse_unmounted(models_dir(settings))  # its model, read before the store is opened
    try:
        stage = SpeakerStage(settings)
    except SpeakerError as exc:
        raise click.ClickException(str(exc)) from exc
    conn = open_store(settings)
    name, results = _profiles_call(conn, lambda: test_clips(conn, stage, name, sources))
    if as_json:
        echo_json([asdict(r) for r in results])
        return
    for r in results:
        source = f"{r.source}, voice {r.voice} of {r.voices}" if r.voice else r.source
        if r.reason:
            click.echo(f"{source}: {r.speech_s:.1f} s of speech, no score: {r.reason}")
            continue
        verdict = "named " + r.named if r.named else "unknown"
        mark = "ok" if r.named == name else f"not {name}"
        scores = ", ".join(f"{who} {score:.2f}" for who, score in r.scores)
        click.echo(f"{source}: {r.speech_s:.1f} s of speech, {verdict} ({mark}); {scores}")


@speakers_group.command("rename")
@config_option
@click.argument("old", type=TEXT)
@click.argument("new", type=TEXT)
def speakers_rename(config_path: Path | None, old: str, new: str) -> None:
    """Rename a profile; naming a provisional "unknown-N" makes it a known person.

    \b
    Example:
      meraudiod speakers rename unknown-3 Carol
    """
    from .profiles import rename

    settings = settings_from(config_path)
    conn = open_store(settings)
    was, now_named = _profiles_call(conn, lambda: rename(conn, old, new))
    click.echo(f"{was} is now {now_named}")


@speakers_group.command("merge")
@config_option
@click.argument("source", type=TEXT)
@click.argument("target", type=TEXT)
def speakers_merge(config_path: Path | None, source: str, target: str) -> None:
    """Fold SOURCE into TARGET: embeddings and past attributions move, SOURCE goes.

    \b
    Example:
      meraudiod speakers merge unknown-5 Carol
    """
    from .profiles import merge

    settings = settings_from(config_path)
    conn = open_store(settings)
    moved = _profiles_call(conn, lambda: merge(conn, source, target))
    click.echo(f"merged {source} into {target} ({counted(moved, 'embedding')} moved)")


@speakers_group.command("delete")
@config_option
@click.argument("name", type=TEXT)
@click.option("--recordings", "with_recordings", is_flag=True, help="Also every recording of them.")
def speakers_delete(config_path: Path | None, name: str, with_recordings: bool) -> None:
    """Delete a profile and its embeddings (and, with --recordings, what they said).

    \b
    Examples:
      meraudiod speakers delete unknown-2
      meraudiod speakers delete Dave --recordings
    """
    from .profiles import delete

    settings = settings_from(config_path)
    conn = open_store(settings)
    audio_dir = settings.storage.audio_dir
    done = _profiles_call(conn, lambda: delete(conn, audio_dir, name, with_recordings))
    click.echo(
        f"deleted {name}: {counted(done.embeddings, 'embedding')}"
        + (f", {counted(done.recordings, 'recording')}" if with_recordings else "")
    )


@speakers_group.command("opt-out")
@config_option
@click.argument("name", type=TEXT)
@click.option("--undo", is_flag=True, help="Keep this person's recordings again.")
def speakers_opt_out(config_path: Path | None, name: str, undo: bool) -> None:
    """Mark a person "do not keep": recordings matched to them are deleted once processed.

    \b
    Example:
      meraudiod speakers opt-out Dave
    """
    from .profiles import set_opt_out

    settings = settings_from(config_path)
    conn = open_store(settings)
    _profiles_call(conn, lambda: set_opt_out(conn, name, not undo))
    click.echo(f"{name}: {'kept again' if undo else 'do not keep'}")
