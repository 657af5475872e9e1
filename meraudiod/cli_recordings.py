"""`meraudiod recordings` (list, show, delete, export what was recorded) and `meraudiod purge`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_common import (
    TEXT,
    config_option,
    echo_json,
    fmt_span,
    fmt_time,
    json_option,
    open_store,
    run_command,
    settings_from,
)
from .recording_views import export_recording, recording_details, voice_matches
from .wording import counted


@click.group()
def recordings() -> None:
    """Browse, search, export and delete recordings.

    \b
    Examples:
      meraudiod recordings list --since 2h
      meraudiod recordings show 01JD2X9K8M7Q6R5S4T3V2W1X0Y
    """


@recordings.command("list")
@config_option
@json_option
@click.option("--search", help="Full-text search in transcripts.")
@click.option("--since", help="Only newer than this: 2h, 3d, or an ISO date/time.")
@click.option("--speaker", help="Only recordings where this speaker talks.")
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(1, 1000), help="Most rows shown."
)
def recordings_list(
    config_path: Path | None,
    as_json: bool,
    search: str | None,
    since: str | None,
    speaker: str | None,
    limit: int,
) -> None:
    """List recordings, newest first.

    \b
    Examples:
      meraudiod recordings list --since 2h
      meraudiod recordings list --search "turn off the lights" --json
    """
    settings = settings_from(config_path)
    args = {"search": search, "since": since, "speaker": speaker, "limit": limit}
    rows = run_command(settings, "recordings/list", args)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        text = (r["text"] or "")[:70]
        click.echo(
            f"{r['id']}  {fmt_time(r['started_at'])}  {r['duration_s']:5.1f} s"
            f"  {r['state']:<8} {text}"
        )


@recordings.command("show")
@config_option
@json_option
@click.argument("rec_id", type=TEXT)
def recordings_show(config_path: Path | None, as_json: bool, rec_id: str) -> None:
    """Show one recording with its segments and their times (the id in either case).

    \b
    Examples:
      meraudiod recordings show 01JD2X9K8M7Q6R5S4T3V2W1X0Y
      meraudiod recordings show 01jd2x9k8m7q6r5s4t3v2w1x0y --json | jq .segments
    """
    settings = settings_from(config_path)
    conn = open_store(settings)
    data = recording_details(conn, settings.storage.audio_dir, rec_id)
    if data is None:
        raise click.ClickException(f"no recording {rec_id}")
    if as_json:
        echo_json(data)
        return
    click.echo(f"recording {data['id']}  {data['state']}")
    click.echo(f"  started  {fmt_time(data['started_at'])}  ({data['duration_s']:.2f} s)")
    click.echo(f"  source   {data['source']} at {data['start_s']:.2f} s")
    click.echo(f"  audio    {data['audio_path'] or '(deleted)'}  {data['rms_dbfs']:.1f} dBFS")
    if data["model"]:
        rtf, latency_ms = data["rtf"], data["latency_ms"]
        click.echo(f"  model    {data['model']}  rtf {rtf:.2f}  latency {latency_ms:.0f} ms")
    # As stored: an unknown voice's best score and margin are shown too (not in the JSON).
    matches = voice_matches(conn, data["id"])
    names = {m["label"]: m["name"] or "unknown" for m in matches}
    scores = {m["label"]: m["score"] for m in matches}
    for m in matches:
        score = "-" if m["score"] is None else f"{m['score']:.2f}"
        margin = "-" if m["margin"] is None else f"{m['margin']:.2f}"
        click.echo(
            f"  speaker  {m['label']} = {names[m['label']]}  score {score}  margin {margin}"
            f"  ({m['speech_s']:.1f} s of speech)"
        )
    for seg in data["segments"]:
        flag = f"  (suspect: {seg['suspect']})" if seg["suspect"] else ""
        who = ""
        label = seg["speaker"]["label"] if seg["speaker"] else None
        if label:
            voice_score = scores.get(label)
            who = names.get(label, "unknown")
            who = f"{who} ({voice_score:.2f}): " if voice_score is not None else f"{who}: "
        click.echo(f"  {fmt_span(seg['start_s'], seg['end_s'])} {who}{seg['text']}{flag}")


@recordings.command("delete")
@config_option
@click.argument("rec_ids", nargs=-1, required=True, type=TEXT)
def recordings_delete(config_path: Path | None, rec_ids: tuple[str, ...]) -> None:
    """Delete recordings: audio, text and search index alike.

    \b
    Example:
      meraudiod recordings delete 01JD2X9K8M7Q6R5S4T3V2W1X0Y 01JD2XA0B1C2D3E4F5G6H7J8K9
    """
    settings = settings_from(config_path)
    result = run_command(settings, "recordings/delete", {"ids": list(rec_ids)})
    click.echo(f"deleted {counted(result['deleted'], 'recording')}")
    if result["missing"]:
        raise click.ClickException(f"no such recording: {', '.join(result['missing_ids'])}")


@recordings.command("export")
@config_option
@click.argument("rec_ids", nargs=-1, required=True, type=TEXT)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def recordings_export(config_path: Path | None, rec_ids: tuple[str, ...], out_dir: Path) -> None:
    """Write each recording's audio and a JSON file with its transcript into --out (a
    directory, made if missing).

    \b
    Example:
      meraudiod recordings export 01JD2X9K8M7Q6R5S4T3V2W1X0Y --out ~/exports
    """
    settings = settings_from(config_path)
    conn = open_store(settings)
    for rec_id in rec_ids:
        try:
            for path in export_recording(conn, settings.storage.audio_dir, rec_id, out_dir):
                click.echo(str(path))
        except KeyError as exc:
            raise click.ClickException(f"no recording {rec_id}") from exc
        except OSError as exc:  # --out is a file, read-only, /proc, a full disk ...
            where = exc.filename or out_dir
            raise click.ClickException(
                f"cannot export to {where}: {exc.strerror or exc}"
                " (--out must be a directory you can write to)"
            ) from exc


@click.command()
@config_option
@click.option(
    "--older-than",
    "older_than_days",
    type=click.FloatRange(min=0, min_open=True),
    help="Days: older recordings.",
)
@click.option("--start", help="ISO date/time: from (with --end).")
@click.option("--end", help="ISO date/time, or 'now': until (with --start).")
@click.option("--speaker", help="Everything this speaker said.")
@click.option("--audio-only", is_flag=True, help="Delete the audio, keep the text.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask (needed when not on a terminal).")
def purge(
    config_path: Path | None,
    older_than_days: float | None,
    start: str | None,
    end: str | None,
    speaker: str | None,
    audio_only: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete recordings by age, time range or speaker: audio, text, index and embeddings.

    Says what it would delete and asks first (--yes for scripts, --dry-run to only look).

    \b
    Examples:
      meraudiod purge --older-than 30
      meraudiod purge --start 2026-11-24T09:00 --end 2026-11-24T12:00 --dry-run
      meraudiod purge --start 2026-11-24T09:00 --end now --yes
      meraudiod purge --speaker "Guest 3"
    """
    from datetime import datetime

    # Said here in the options typed: the command table speaks of its MQTT arguments.
    if older_than_days is None and start is None and end is None and speaker is None:
        raise click.UsageError("purge needs --older-than DAYS, --start and --end, or --speaker")
    if (start is None) != (end is None):
        raise click.UsageError("a time range needs both --start and --end (--end may be 'now')")
    settings = settings_from(config_path)
    if end is not None and end.strip().lower() == "now":  # one "now" for the count and the act
        end = datetime.now().isoformat()
    args = {
        "older_than_days": older_than_days,
        "start": start,
        "end": end,
        "speaker": speaker,
        "audio_only": audio_only,
    }
    found = run_command(settings, "purge", {**args, "dry_run": True})
    what = _what(found)
    if dry_run:
        click.echo(f"would delete {what}")
        return
    if not (found["recordings_deleted"] or found["audio_files_deleted"]):
        # Run all the same: it deletes nothing that is there, and finishes what a purge
        # killed half way left (rows naming audio files it had deleted, deleted words not
        # yet merged out of the index).
        run_command(settings, "purge", args)
        click.echo("nothing to delete")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(f"would delete {what}: add --yes to do it without asking")
        click.confirm(f"Delete {what}?", abort=True)
    result = run_command(settings, "purge", args)
    click.echo(f"deleted {_what(result)}")


def _what(counts: dict[str, int]) -> str:
    """A purge's counts, as its lines say them."""
    recordings = counted(counts["recordings_deleted"], "recording")
    return f"{recordings} and {counted(counts['audio_files_deleted'], 'audio file')}"
