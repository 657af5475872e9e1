"""`meraudiod jobs` and `meraudiod reprocess`: the processing backlog."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import click

from . import jobs as jobqueue
from .cli_common import (
    config_option,
    database_error,
    echo_json,
    fmt_time,
    json_option,
    open_store,
    run_command,
    settings_from,
)
from .recordings import why_no_audio
from .wording import counted


@click.command("jobs")
@config_option
@json_option
@click.option("--retry-failed", is_flag=True, help="Give failed jobs a fresh set of attempts.")
def jobs_cmd(config_path: Path | None, as_json: bool, retry_failed: bool) -> None:
    """The processing backlog: pending, running and failed jobs with their errors.

    \b
    Examples:
      meraudiod jobs
      meraudiod jobs --retry-failed
    """
    settings = settings_from(config_path)
    conn = open_store(settings)
    if retry_failed:
        try:
            retried = jobqueue.retry_failed(
                conn, functools.partial(why_no_audio, settings.storage.audio_dir)
            )
        except sqlite3.Error as exc:
            raise database_error(conn, exc) from exc
        for rec_id, reason in retried.skipped.items():
            click.echo(f"skipped {rec_id}: {reason}", err=True)
        click.echo(f"requeued {counted(retried.requeued, 'failed job')}", err=True)
    counts = jobqueue.counts(conn)
    backlog = jobqueue.backlog(conn)
    if as_json:
        echo_json({"counts": counts, "jobs": backlog})
        return
    click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
    for job in backlog:
        error = f"  {job['error']}" if job["error"] else ""
        due = ""
        if job["state"] == "pending" and job["not_before"]:
            due = f" retry={fmt_time(job['not_before'])}"
        click.echo(
            f"{job['id']:6d} {job['state']:<8} {job['recording_id']} "
            f"attempts={job['attempts']}{due}{error}"
        )


@click.command()
@config_option
@click.argument("rec_ids", nargs=-1)
@click.option("--failed", is_flag=True, help="Every recording whose transcription failed.")
def reprocess(config_path: Path | None, rec_ids: tuple[str, ...], failed: bool) -> None:
    """Queue recordings to be transcribed again (by the running daemon or the next run).

    \b
    Examples:
      meraudiod reprocess 01JD2X9K8M7Q6R5S4T3V2W1X0Y
      meraudiod reprocess --failed
    """
    if not rec_ids and not failed:  # it queued nothing and said so, exit 0
        raise click.UsageError("reprocess needs recording ids (ID...) or --failed")
    settings = settings_from(config_path)
    result = run_command(settings, "reprocess", {"ids": list(rec_ids), "failed": failed})
    for skipped in result["skipped"]:
        click.echo(f"skipped {skipped['id']}: {skipped['reason']}", err=True)
    click.echo(f"queued {counted(result['queued'], 'recording')}")
