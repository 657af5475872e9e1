"""The `meraudiod` command. Admin commands read the database, never start the daemon's threads."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

import click

from . import jobs as jobqueue
from . import models as modelstore
from .checks import StartError, mqtt_file_problems, unreadable_files
from .cli_common import (
    config_option,
    echo_json,
    fmt_span,
    fmt_time,
    json_option,
    open_store,
    run_command,
    settings_from,
    verbose_option,
)
from .cli_recordings import recordings
from .cli_speakers import speakers_group
from .db import DatabaseError
from .machine import summary_line
from .recordings import analysis_record
from .signals import install as install_signal_handlers
from .signals import run_handlers
from .sources import SourceError, input_devices, open_source

_UMASK: Final = 0o027  # group may read (an admin in the service's group), others nothing


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meraudiod")
def main() -> None:
    """meraudiod: listens, records speech, transcribes it on the device, keeps it in SQLite.

    \b
    Examples:
      meraudiod run                         # the daemon, on the default microphone
      meraudiod run --source file:talk.wav  # replay a file through the same pipeline
      meraudiod analyze a.mp3 b.flac --json # transcribe files, one JSON line per file
      meraudiod recordings list --search kitchen
    """
    # Whatever starts us (a shell with umask 022, cron, a container), what we write (database,
    # audio, heartbeat, exports) is not readable by other users.
    os.umask(_UMASK)


main.add_command(recordings)
main.add_command(speakers_group)


# --- run -----------------------------------------------------------------------------------


@main.command()
@config_option
@click.option(
    "--source", default=None, help="mic, file:PATH, stdin (16 kHz s16le) or demo [audio.source]"
)
@click.option("--realtime/--fast", default=None, help="Pace file replay at real time.")
@click.option("--print", "print_", is_flag=True, help="Print each transcript on stdout.")
@verbose_option
def run(
    config_path: Path | None,
    source: str | None,
    realtime: bool | None,
    print_: bool,
    verbosity: int,
) -> None:
    """Run the daemon (systemd runs this). With a file it exits once the file is transcribed.

    \b
    Logs at logging.level under systemd or into a pipe; on a terminal only warnings (-v: more).

    \b
    Examples:
      meraudiod run --source mic
      arecord -f S16_LE -r 16000 -c 1 | meraudiod run --source stdin
      meraudiod run --source demo --print -v
    """
    stop, reload = run_handlers()  # before the slow imports below (a no-op when done early)
    from .daemon import Daemon

    on_terminal = sys.stderr.isatty() and "INVOCATION_ID" not in os.environ  # not systemd's
    settings = settings_from(config_path, verbosity, daemon=not on_terminal)
    if source is not None:
        settings.audio.source = _checked_source(source)
    if realtime is not None:
        settings.audio.realtime = realtime
    count = [0]

    def printer(result: Any) -> None:
        count[0] += 1
        flag = "  (suspect: not speech)" if result.suspect else ""
        click.echo(f"{fmt_span(result.start_s, result.end_s)} {result.text}{flag}")

    daemon = Daemon(
        settings,
        open_source(settings.audio.source, settings.audio),
        stop,
        on_transcribed=printer if print_ else None,
    )
    daemon.reload_requested = reload
    daemon.config_path = str(config_path) if config_path else None
    if source is not None:
        daemon.cli_overrides[("audio", "source")] = settings.audio.source
    if realtime is not None:
        daemon.cli_overrides[("audio", "realtime")] = realtime
    t0 = time.monotonic()
    try:
        daemon.start()
        code = daemon.run()
    except _clear_errors() as exc:
        daemon.stop()
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # a failed start must say why and exit non-zero
        daemon.stop()
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    daemon.stop()
    if daemon.stage_problem:
        raise click.ClickException(daemon.stage_problem)
    if daemon.listener is not None and daemon.listener.error:
        raise click.ClickException(daemon.listener.error)
    if print_:
        n = daemon.listener.recordings_saved if daemon.listener else 0
        click.echo(f"{n} recordings, {count[0]} transcribed, in {time.monotonic() - t0:.1f} s")
    sys.exit(code)


def _clear_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story (the file, the reason, the fix)."""
    from .asr import AsrError
    from .diarization import DiarizationError
    from .vad import VadError
    from .voiceprints import SpeakerError

    return (
        SourceError,
        modelstore.ModelError,
        AsrError,
        DiarizationError,
        VadError,
        SpeakerError,
        StartError,
        DatabaseError,
    )


def _checked_source(spec: str) -> str:
    from .config import AudioSettings

    try:
        return AudioSettings(source=spec).source
    except Exception as exc:
        raise click.BadParameter(f"{spec!r}: use mic, file:PATH, stdin or demo") from exc


# --- analyze -------------------------------------------------------------------------------


@main.command()
@config_option
@json_option
@verbose_option
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def analyze(
    config_path: Path | None, as_json: bool, verbosity: int, files: tuple[Path, ...]
) -> None:
    """Run files through the daemon's pipeline, store the results and print them.

    \b
    Examples:
      meraudiod analyze meeting.mp3
      meraudiod analyze *.wav --json | jq .recordings[].text
    """
    from .pipeline import Pipeline
    from .sources import FileSource

    settings = settings_from(config_path, verbosity)
    stop = threading.Event()
    install_signal_handlers(stop)
    pipeline = Pipeline(settings, stop, serves_store=False)  # a live daemon's store is its own
    try:
        pipeline.open()
    except Exception as exc:  # a missing model or a bad config: say why
        raise click.ClickException(str(exc)) from exc
    pipeline.start_worker()
    results: list[tuple[Path, float, list[str], str | None]] = []
    for path in files:
        source = FileSource(path)
        try:
            source.start()
        except SourceError as exc:
            results.append((path, 0.0, [], str(exc)))
            continue
        listener = pipeline.listener(source, keep_ids=True)
        listener.finished.wait()
        source.stop()
        duration_s = round(listener.frames_read * 512 / 16000, 3)
        results.append((path, duration_s, listener.recording_ids or [], listener.error))
        if stop.is_set():
            break
    pipeline.drain()
    pipeline.close()
    conn = open_store(settings, create=True)
    failed = False
    for path, duration_s, rec_ids, error in results:
        # A file cut part of the way in has recordings from before the cut and an error.
        recs = [analysis_record(conn, settings.storage.audio_dir, r) for r in rec_ids]
        if as_json:
            found = {"file": str(path), "duration_s": duration_s, "recordings": recs}
            echo_json({**found, "error": error} if error else found)
        elif duration_s or not error:
            click.echo(f"{path} ({duration_s:.1f} s, {len(recs)} recordings)")
            for rec in recs:
                click.echo(f"  {fmt_span(rec['start_s'], rec['end_s'])} {rec['text'] or ''}")
        if error:
            failed = True
            click.echo(f"error: {error}", err=True)
    if failed:
        sys.exit(1)


# --- jobs ----------------------------------------------------------------------------------


@main.command("jobs")
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
        click.echo(f"requeued {jobqueue.retry_failed(conn)} failed jobs", err=True)
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


# --- models --------------------------------------------------------------------------------


@main.group("models")
def models_group() -> None:
    """Model files: list, install, verify against the manifest's checksums.

    \b
    Examples:
      meraudiod models list
      meraudiod models install --default
    """


@models_group.command("list")
@config_option
@json_option
def models_list(config_path: Path | None, as_json: bool) -> None:
    """Supported models, whether each is installed, and the sha256 of each of its files.

    \b
    Examples:
      meraudiod models list                # * marks the models the configuration uses
      meraudiod models list --json | jq '.[] | select(.installed) | .files'
    """
    settings = settings_from(config_path)
    models_dir = settings.storage.resolved_models_dir
    used = set(modelstore.configured(settings))
    rows: list[dict[str, Any]] = [
        {
            "name": m.name,
            "role": m.role,
            "licence": m.licence,
            "source": m.source,
            "installed": modelstore.is_installed(m.name, models_dir),
            "configured": m.name in used,
            "description": m.description,
            "files": m.files,  # file name -> sha256, as the manifest has it
        }
        for m in modelstore.manifest().values()
    ]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        mark = "installed" if r["installed"] else "-"
        used_mark = "*" if r["configured"] else " "
        click.echo(f"{used_mark} {r['name']:<18} {r['role']:<8} {mark:<10} {r['description']}")
        for file_name, sha256 in r["files"].items():
            click.echo(f"    sha256 {sha256}  {file_name}")
        if not r["files"]:
            click.echo("    (no checksums: recorded when installed from the hub)")


@models_group.command("install")
@config_option
@click.argument("names", nargs=-1)
@click.option("--default", "defaults", is_flag=True, help="The models the configuration uses.")
@click.option(
    "--from",
    "from_file",
    type=click.Path(path_type=Path),
    help="Install the one named model from this file (e.g. an ONNX exported on another machine).",
)
def models_install(
    config_path: Path | None, names: tuple[str, ...], defaults: bool, from_file: Path | None
) -> None:
    """Install models into the models directory and check their checksums (or parity).

    \b
    Examples:
      meraudiod models install --default
      meraudiod models install ecapa-voxceleb --from /media/usb/ecapa-voxceleb.onnx
    """
    settings = settings_from(config_path)
    if from_file is not None and (len(names) != 1 or defaults):
        raise click.UsageError("--from installs exactly one named model")
    wanted = list(names) + (modelstore.configured(settings) if defaults or not names else [])
    for name in dict.fromkeys(wanted):
        try:
            path = modelstore.install(name, settings.storage.resolved_models_dir, from_file)
        except modelstore.ModelError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{name}: {path}")


@models_group.command("verify")
@config_option
@click.argument("names", nargs=-1)
def models_verify(config_path: Path | None, names: tuple[str, ...]) -> None:
    """Check installed models against the manifest (default: the configured ones).

    \b
    Examples:
      meraudiod models verify
      meraudiod models verify ecapa-voxceleb
    """
    settings = settings_from(config_path)
    problems = []
    for name in names or modelstore.configured(settings):
        try:
            found = modelstore.verify(name, settings.storage.resolved_models_dir)
        except modelstore.ModelError as exc:
            found = [str(exc)]
        problems += found
        click.echo(f"{name}: {'ok' if not found else 'FAILED'}")
    if problems:
        raise click.ClickException("; ".join(problems))


# --- config, devices -----------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Configuration.

    \b
    Example:
      meraudiod config check --config /etc/meraudiod/config.toml
    """


@config_group.command("check")
@config_option
@json_option
def config_check(config_path: Path | None, as_json: bool) -> None:
    """Validate the configuration (file and environment), check that every file it names is
    readable by this user, and say what is wrong.

    \b
    Examples:
      meraudiod config check --config /etc/meraudiod/config.toml
      MERAUDIOD_ASR__BEAM_SIZE=2 meraudiod config check --json
    """
    settings = settings_from(config_path)
    problems = unreadable_files(settings) or mqtt_file_problems(settings)
    if problems:
        raise click.ClickException("; ".join(problems))
    if as_json:
        echo_json(settings.model_dump(mode="json", exclude={"mqtt": {"password"}}))
        return
    click.echo(f"configuration ok (data in {settings.storage.data_dir})")


@main.command()
@json_option
@click.option("--check", is_flag=True, help="Exit 1 when there is no input device.")
def devices(as_json: bool, check: bool) -> None:
    """List microphones (input devices).

    \b
    Examples:
      meraudiod devices
      meraudiod devices --check || echo "no microphone"
    """
    found = input_devices()
    if as_json:
        echo_json(found)
    else:
        for d in found:
            click.echo(f"{d['index']:3d}  {d['name']}  ({d['default_rate_hz']} Hz)")
        if not found:
            click.echo("no input devices", err=True)
    if check and not found:
        sys.exit(1)


# --- status, purge, reprocess, mqtt ------------------------------------------------------------


@main.command("status")
@config_option
@json_option
def status_cmd(config_path: Path | None, as_json: bool) -> None:
    """Is the daemon running, listening, keeping up? Reads the database and its heartbeat.

    \b
    Examples:
      meraudiod status
      meraudiod status --json | jq .backlog
    """
    settings = settings_from(config_path)
    data = run_command(settings, "status", {})
    if as_json:
        echo_json(data)
        return
    colour = sys.stdout.isatty()

    def mark(ok: bool | None, text: str) -> str:
        if not colour or ok is None:
            return text
        return click.style(text, fg="green" if ok else "red")

    last = data["last_transcript"] or {}
    mqtt = data["mqtt"] or {}
    free_ok = data["disk_free_mb"] > settings.retention.min_free_disk_mb
    disk_free = mark(free_ok, f"{data['disk_free_mb']:.0f} MB free")
    rows = [
        (
            "daemon",
            mark(data["running"], "running" if data["running"] else "not running")
            + (f" (pid {data['pid']}, up {data['uptime_s']:.0f} s)" if data["running"] else "")
            + (f" ({data['stopped_because']})" if data.get("stopped_because") else ""),
        ),
        (
            "listening",
            "-"
            if data["listening"] is None
            else mark(
                data["listening"], "yes" if data["listening"] else "muted (microphone closed)"
            ),
        ),
        ("degraded", mark(False, data["degraded"]) if data["degraded"] else "no"),
        ("microphone", _microphone_line(data)),
        (
            "backlog",
            mark(data["backlog"] < 10, str(data["backlog"]))
            + (
                f" (oldest from {fmt_time(data['oldest_pending_at'])})"
                if data["oldest_pending_at"]
                else ""
            )
            + (f", {data['jobs']['failed']} failed" if data["jobs"]["failed"] else ""),
        ),
        (
            "last transcript",
            f"{fmt_time(last.get('started_at'))}  {(last.get('text') or '')[:60]}",
        ),
        ("last speaker", data["last_speaker"] or "-"),
        (
            "today",
            f"{data['recordings_today']} recordings, {data['transcripts_today']} transcribed",
        ),
        ("models", ", ".join(f"{k} {v}" for k, v in data["models"].items() if v)),
        *(
            (
                "asr server",
                mark(bool(srv["up"]), f"{srv['uri']}  {'up' if srv['up'] else 'down'}")
                + f"  {srv['model'] or ''}"
                + (f"  ({srv['error']})" if srv["error"] and not srv["up"] else ""),
            )
            for srv in data["asr_servers"] or ()
        ),
        (
            "mqtt",
            "disabled"
            if not settings.mqtt.enabled
            else mark(
                mqtt.get("connected"),
                "connected"
                if mqtt.get("connected")
                else f"not connected ({mqtt.get('error') or 'daemon not running'})",
            )
            + f", outbox {data['outbox_pending']}, dropped {data['outbox_dropped']}",
        ),
        (
            "disk",
            f"{data['disk_used_mb']:.0f} MB used in {data['data_dir']}, {disk_free}",
        ),
        ("version", data["version"]),
        ("platform", summary_line(data["platform"])),
    ]
    for label, value in rows:
        click.echo(f"{label:<16} {value}")


def _microphone_line(data: dict[str, Any]) -> str:
    if not data["running"]:
        return "-"
    level_dbfs = data["audio_level_dbfs"]
    if level_dbfs is not None:
        level = f"level {level_dbfs} dBFS"
    else:  # no level while muted (the microphone is closed) or before the first frame
        level = "muted, no level" if data["muted"] else "no level yet"
    return f"{data['microphone']}  {level}, dropped frames {data['dropped_frames']}"


@main.command()
@config_option
@click.option("--older-than", "older_than_days", type=float, help="Days: older recordings.")
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
    what = (
        f"{found['recordings_deleted']} recordings and {found['audio_files_deleted']} audio files"
    )
    if dry_run or not (found["recordings_deleted"] or found["audio_files_deleted"]):
        click.echo(f"would delete {what}" if dry_run else "nothing to delete")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(f"would delete {what}: add --yes to do it without asking")
        click.confirm(f"Delete {what}?", abort=True)
    result = run_command(settings, "purge", args)
    click.echo(
        f"deleted {result['recordings_deleted']} recordings"
        f" and {result['audio_files_deleted']} audio files"
    )


@main.command()
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
    settings = settings_from(config_path)
    result = run_command(settings, "reprocess", {"ids": list(rec_ids), "failed": failed})
    click.echo(f"queued {result['queued']} recordings")


@main.group("mqtt")
def mqtt_group() -> None:
    """The MQTT connection.

    \b
    Example:
      meraudiod mqtt test
    """


@mqtt_group.command("test")
@config_option
def mqtt_test(config_path: Path | None) -> None:
    """Check DNS, TCP, TLS, CONNECT and a publish/subscribe round trip; say which step failed.

    \b
    Example:
      MERAUDIOD_MQTT__ENABLED=true MERAUDIOD_MQTT__HOST=broker.lan meraudiod mqtt test
    """
    from .mqtt import check_connection

    settings = settings_from(config_path)
    problems = mqtt_file_problems(settings)
    if problems:
        click.echo(f"{'files':<10} FAIL {'; '.join(problems)}")
        raise click.ClickException("MQTT check failed at step files")
    steps = check_connection(settings)
    for name, ok, detail in steps:
        click.echo(f"{name:<10} {'ok  ' if ok else 'FAIL'} {detail}")
    if not steps[-1][1] or steps[-1][0] != "roundtrip":
        failed = next(name for name, ok, _ in steps if not ok)
        raise click.ClickException(f"MQTT check failed at step {failed}")


@main.command()
@config_option
@json_option
def bench(config_path: Path | None, as_json: bool) -> None:
    """Measure this device with the configured models on the bundled sample (under 2 minutes):
    VAD cost and listening CPU, ASR real-time factor and latency (each against the bare
    library), speaker-embedding cost, the daemon's peak memory, disk writes per recorded hour,
    and whether it keeps up with continuous speech.

    \b
    Examples:
      meraudiod bench
      MERAUDIOD_ASR__CPU_THREADS=1 meraudiod bench --json
    """
    from .bench import run_bench

    settings = settings_from(config_path)
    logging.getLogger().setLevel(logging.WARNING)
    figures = run_bench(
        settings,
        str(config_path) if config_path else None,
        lambda stage: click.echo(f"measuring {stage} ...", err=True),
    )
    if as_json:
        echo_json(figures)
        return
    for key, value in figures.items():
        click.echo(f"{key:<36} {value}")
