"""The `meraudiod` command. Admin commands read the database, never start the daemon's threads."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from . import jobs as jobqueue
from . import models as modelstore
from .commands import CommandContext, CommandError, execute
from .config import ConfigError, Settings, load_settings
from .db import open_db
from .recordings import export_recording, recording_details
from .sources import SourceError, input_devices, open_source

F = TypeVar("F", bound=Callable[..., Any])
_LOGGER = logging.getLogger("meraudiod")


def config_option(func: F) -> F:
    """Every command takes --config."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Config file (default: $MERAUDIOD_CONFIG, then /etc/meraudiod/config.toml).",
    )(func)


def json_option(func: F) -> F:
    """Every listing takes --json."""
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


def _settings(config_path: Path | None) -> Settings:
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    _setup_logging(settings.logging.level)
    return settings


def _setup_logging(level: str) -> None:
    # journald stamps lines itself; elsewhere a timestamp helps.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("faster_whisper").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _db(settings: Settings) -> sqlite3.Connection:
    return open_db(settings.storage.db_path)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, default=str))


def _fmt_time(wall_s: float | None) -> str:
    if wall_s is None:
        return "-"
    return datetime.fromtimestamp(wall_s).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_span(start_s: float, end_s: float) -> str:
    return f"[{start_s:7.2f} - {end_s:7.2f}]"


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


# --- run -----------------------------------------------------------------------------------


@main.command()
@config_option
@click.option(
    "--source", default=None, help="mic, file:PATH, stdin (16 kHz s16le) or demo [audio.source]"
)
@click.option("--realtime/--fast", default=None, help="Pace file replay at real time.")
@click.option("--print", "print_", is_flag=True, help="Print each transcript on stdout.")
def run(config_path: Path | None, source: str | None, realtime: bool | None, print_: bool) -> None:
    """Run the daemon (systemd runs this). With a file it exits once the file is transcribed.

    \b
    Examples:
      meraudiod run --source mic
      arecord -f S16_LE -r 16000 -c 1 | meraudiod run --source stdin
    """
    from .daemon import Daemon

    settings = _settings(config_path)
    if source is not None:
        settings.audio.source = _checked_source(source)
    if realtime is not None:
        settings.audio.realtime = realtime
    stop = threading.Event()
    count = [0]

    def printer(result: Any) -> None:
        count[0] += 1
        flag = "  (suspect: not speech)" if result.suspect else ""
        click.echo(f"{_fmt_span(result.start_s, result.end_s)} {result.text}{flag}")

    daemon = Daemon(
        settings,
        open_source(settings.audio.source, settings.audio),
        stop,
        on_transcribed=printer if print_ else None,
    )
    daemon.config_path = str(config_path) if config_path else None
    if source is not None:
        daemon.cli_overrides[("audio", "source")] = settings.audio.source
    if realtime is not None:
        daemon.cli_overrides[("audio", "realtime")] = realtime
    _install_signal_handlers(stop, daemon.reload_requested)
    t0 = time.monotonic()
    try:
        daemon.start()
        code = daemon.run()
    except (SourceError, modelstore.ModelError) as exc:
        daemon.stop()
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # a failed start must say why and exit non-zero
        daemon.stop()
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    daemon.stop()
    if daemon.listener is not None and daemon.listener.error:
        raise click.ClickException(daemon.listener.error)
    if print_:
        n = len(daemon.listener.recordings) if daemon.listener else 0
        click.echo(f"{n} recordings, {count[0]} transcribed, in {time.monotonic() - t0:.1f} s")
    sys.exit(code)


def _checked_source(spec: str) -> str:
    from .config import AudioSettings

    try:
        return AudioSettings(source=spec).source
    except Exception as exc:
        raise click.BadParameter(f"{spec!r}: use mic, file:PATH, stdin or demo") from exc


def _install_signal_handlers(stop: threading.Event, reload: threading.Event | None = None) -> None:
    def handler(signum: int, frame: object) -> None:
        stop.set()  # signal handlers only set a flag

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())


# --- analyze -------------------------------------------------------------------------------


@main.command()
@config_option
@json_option
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def analyze(config_path: Path | None, as_json: bool, files: tuple[Path, ...]) -> None:
    """Run files through the daemon's pipeline, store the results and print them.

    \b
    Examples:
      meraudiod analyze meeting.mp3
      meraudiod analyze *.wav --json | jq .recordings[].text
    """
    from .daemon import Pipeline
    from .sources import FileSource

    settings = _settings(config_path)
    stop = threading.Event()
    _install_signal_handlers(stop)
    pipeline = Pipeline(settings, stop)
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
        listener = pipeline.listener(source)
        listener.finished.wait()
        source.stop()
        duration_s = round(listener.frames_read * 512 / 16000, 3)
        results.append((path, duration_s, [r.id for r in listener.recordings], listener.error))
        if stop.is_set():
            break
    pipeline.drain()
    pipeline.close()
    conn = _db(settings)
    failed = False
    for path, duration_s, rec_ids, error in results:
        if error:
            failed = True
            click.echo(f"error: {error}", err=True)
            if as_json:
                _echo_json({"file": str(path), "error": error})
            continue
        recs = [_analysis_record(conn, rec_id) for rec_id in rec_ids]
        if as_json:
            _echo_json({"file": str(path), "duration_s": duration_s, "recordings": recs})
            continue
        click.echo(f"{path} ({duration_s:.1f} s, {len(recs)} recordings)")
        for rec in recs:
            click.echo(f"  {_fmt_span(rec['start_s'], rec['end_s'])} {rec['text'] or ''}")
    if failed:
        sys.exit(1)


def _analysis_record(conn: sqlite3.Connection, rec_id: str) -> dict[str, Any]:
    data = recording_details(conn, rec_id) or {}
    offset = data.get("start_s", 0.0)
    return {
        "id": rec_id,
        "start_s": round(data.get("start_s", 0.0), 3),
        "end_s": round(data.get("end_s", 0.0), 3),
        "text": data.get("text"),
        "state": data.get("status"),
        "segments": [
            {
                "start_s": round(offset + s["start_s"], 3),
                "end_s": round(offset + s["end_s"], 3),
                "text": s["text"],
                "suspect": s["suspect"],
                "speaker": s["speaker"],
            }
            for s in data.get("segments", [])
        ],
    }


# --- recordings ----------------------------------------------------------------------------


@main.group()
def recordings() -> None:
    """Browse, search, export and delete recordings."""


@recordings.command("list")
@config_option
@json_option
@click.option("--search", help="Full-text search in transcripts.")
@click.option("--since", help="Only newer than this: 2h, 3d, or an ISO date/time.")
@click.option("--speaker", help="Only recordings where this speaker talks.")
@click.option("--limit", default=100, show_default=True, help="Most rows shown.")
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
    settings = _settings(config_path)
    args = {"search": search, "since": since, "speaker": speaker, "limit": limit}
    rows = _command(settings, "recordings/list", args)
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        text = (r["text"] or "")[:70]
        click.echo(
            f"{r['id']}  {_fmt_time(r['started_at'])}  {r['duration_s']:5.1f} s"
            f"  {r['state']:<8} {text}"
        )


def _command(settings: Settings, name: str, args: dict[str, Any]) -> Any:
    """Run an entry of the command table, as MQTT does, with the admin's rights."""
    context = CommandContext(_db(settings), settings, admin=True)
    try:
        return execute(context, name, {k: v for k, v in args.items() if v is not None})
    except CommandError as exc:
        raise click.ClickException(str(exc)) from exc


@recordings.command("show")
@config_option
@json_option
@click.argument("rec_id")
def recordings_show(config_path: Path | None, as_json: bool, rec_id: str) -> None:
    """Show one recording with its segments and their times."""
    settings = _settings(config_path)
    data = recording_details(_db(settings), rec_id)
    if data is None:
        raise click.ClickException(f"no recording {rec_id}")
    if as_json:
        _echo_json(data)
        return
    click.echo(f"recording {data['id']}  {data['status']}")
    click.echo(f"  started  {_fmt_time(data['started_at'])}  ({data['duration_s']:.2f} s)")
    click.echo(f"  source   {data['source']} at {data['start_s']:.2f} s")
    click.echo(f"  audio    {data['audio_path'] or '(deleted)'}  {data['rms_dbfs']:.1f} dBFS")
    if data["model"]:
        rtf, latency_ms = data["rtf"], data["latency_ms"]
        click.echo(f"  model    {data['model']}  rtf {rtf:.2f}  latency {latency_ms:.0f} ms")
    names = {m["label"]: m["name"] or "unknown" for m in data.get("speakers", [])}
    for m in data.get("speakers", []):
        score = "-" if m["score"] is None else f"{m['score']:.2f}"
        margin = "-" if m["margin"] is None else f"{m['margin']:.2f}"
        click.echo(
            f"  speaker  {m['label']} = {names[m['label']]}  score {score}  margin {margin}"
            f"  ({m['speech_s']:.1f} s of speech)"
        )
    for seg in data["segments"]:
        flag = f"  (suspect: {seg['suspect']})" if seg["suspect"] else ""
        who = ""
        if seg.get("speaker_label"):
            score = seg.get("speaker_score")
            who = names.get(seg["speaker_label"], "unknown")
            who = f"{who} ({score:.2f}): " if score is not None else f"{who}: "
        click.echo(f"  {_fmt_span(seg['start_s'], seg['end_s'])} {who}{seg['text']}{flag}")


@recordings.command("delete")
@config_option
@click.argument("rec_ids", nargs=-1, required=True)
def recordings_delete(config_path: Path | None, rec_ids: tuple[str, ...]) -> None:
    """Delete recordings: audio, text and search index alike."""
    settings = _settings(config_path)
    result = _command(settings, "recordings/delete", {"ids": list(rec_ids)})
    click.echo(f"deleted {result['deleted']} recordings")
    if result["missing"]:
        raise click.ClickException(f"{result['missing']} of them did not exist")


@recordings.command("export")
@config_option
@click.argument("rec_ids", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def recordings_export(config_path: Path | None, rec_ids: tuple[str, ...], out_dir: Path) -> None:
    """Write each recording's audio and a JSON file with its transcript into --out."""
    settings = _settings(config_path)
    conn = _db(settings)
    for rec_id in rec_ids:
        try:
            for path in export_recording(conn, rec_id, out_dir):
                click.echo(str(path))
        except KeyError as exc:
            raise click.ClickException(f"no recording {rec_id}") from exc


# --- speakers ------------------------------------------------------------------------------


@main.group("speakers")
def speakers_group() -> None:
    """Voice profiles: enrol people, name or merge unknown voices, delete, opt out."""


def _profiles_call(func: Callable[[], Any]) -> Any:
    from .profiles import ProfileError

    try:
        return func()
    except ProfileError as exc:
        raise click.ClickException(str(exc)) from exc


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

    settings = _settings(config_path)
    rows = list_profiles(_db(settings), current_model(settings))
    if as_json:
        _echo_json([asdict(r) for r in rows])
        return
    for r in rows:
        flags = ", ".join(
            f
            for f in (
                "provisional" if r.provisional else "",
                "do not keep" if r.opt_out else "",
                f"{r.stale} stale (re-enrol)" if r.stale else "",
            )
            if f
        )
        click.echo(
            f"{r.name:<20} {r.embeddings:3d} embeddings {r.speech_s:6.1f} s  heard in"
            f" {r.recordings:4d} recordings, last {_fmt_time(r.last_heard_at)}"
            + (f"  [{flags}]" if flags else "")
        )
    if not rows:
        click.echo("no speakers yet: meraudiod speakers enroll NAME FILE...", err=True)


@speakers_group.command("enroll")
@config_option
@click.argument("name")
@click.argument("sources", nargs=-1, required=True)
@click.option("--do-not-keep", is_flag=True, help="Recognise this person only to delete them.")
def speakers_enroll(
    config_path: Path | None, name: str, sources: tuple[str, ...], do_not_keep: bool
) -> None:
    """Enrol NAME from audio files or stored recordings (one embedding each).

    Each source needs at least speakers.min_speech_s of speech; three clips of a few
    seconds each, in different sessions, work well.

    \b
    Examples:
      meraudiod speakers enroll Alice alice1.wav alice2.m4a alice3.flac
      meraudiod speakers enroll Bob 01JD2X9K8M7Q6R5S4T3V2W1X0Y   # a stored recording
    """
    from .profiles import enroll
    from .speakers import SpeakerError, SpeakerStage

    settings = _settings(config_path)
    try:
        stage = SpeakerStage(settings)
    except SpeakerError as exc:
        raise click.ClickException(str(exc)) from exc
    conn = _db(settings)
    results = _profiles_call(lambda: enroll(conn, stage, name, sources, do_not_keep))
    for r in results:
        state = "ok" if r.stored else f"skipped: {r.reason}"
        click.echo(f"{r.source}: {r.speech_s:.1f} s of speech, {state}")
    stored = sum(r.stored for r in results)
    if not stored:
        raise click.ClickException(f"nothing enrolled for {name}")
    click.echo(f"{name}: {stored} embeddings added")
    if not settings.speakers.enabled:
        click.echo("note: identification is off; set speakers.enabled = true to use it", err=True)


@speakers_group.command("rename")
@config_option
@click.argument("old")
@click.argument("new")
def speakers_rename(config_path: Path | None, old: str, new: str) -> None:
    """Rename a profile; naming a provisional "unknown-N" makes it a known person.

    \b
    Example:
      meraudiod speakers rename unknown-3 Carol
    """
    from .profiles import rename

    settings = _settings(config_path)
    conn = _db(settings)
    _profiles_call(lambda: rename(conn, old, new))
    click.echo(f"{old} is now {new}")


@speakers_group.command("merge")
@config_option
@click.argument("source")
@click.argument("target")
def speakers_merge(config_path: Path | None, source: str, target: str) -> None:
    """Fold SOURCE into TARGET: embeddings and past attributions move, SOURCE goes.

    \b
    Example:
      meraudiod speakers merge unknown-5 Carol
    """
    from .profiles import merge

    settings = _settings(config_path)
    conn = _db(settings)
    moved = _profiles_call(lambda: merge(conn, source, target))
    click.echo(f"merged {source} into {target} ({moved} embeddings moved)")


@speakers_group.command("delete")
@config_option
@click.argument("name")
@click.option("--recordings", "with_recordings", is_flag=True, help="Also every recording of them.")
def speakers_delete(config_path: Path | None, name: str, with_recordings: bool) -> None:
    """Delete a profile and its embeddings (and, with --recordings, what they said).

    \b
    Examples:
      meraudiod speakers delete unknown-2
      meraudiod speakers delete Dave --recordings
    """
    from .profiles import delete

    settings = _settings(config_path)
    conn = _db(settings)
    done = _profiles_call(lambda: delete(conn, name, with_recordings))
    click.echo(
        f"deleted {name}: {done.embeddings} embeddings"
        + (f", {done.recordings} recordings" if with_recordings else "")
    )


@speakers_group.command("opt-out")
@config_option
@click.argument("name")
@click.option("--undo", is_flag=True, help="Keep this person's recordings again.")
def speakers_opt_out(config_path: Path | None, name: str, undo: bool) -> None:
    """Mark a person "do not keep": recordings matched to them are deleted once processed.

    \b
    Example:
      meraudiod speakers opt-out Dave
    """
    from .profiles import set_opt_out

    settings = _settings(config_path)
    conn = _db(settings)
    _profiles_call(lambda: set_opt_out(conn, name, not undo))
    click.echo(f"{name}: {'kept again' if undo else 'do not keep'}")


# --- jobs ----------------------------------------------------------------------------------


@main.command("jobs")
@config_option
@json_option
@click.option("--retry-failed", is_flag=True, help="Give failed jobs a fresh set of attempts.")
def jobs_cmd(config_path: Path | None, as_json: bool, retry_failed: bool) -> None:
    """The processing backlog: pending, running and failed jobs with their errors."""
    settings = _settings(config_path)
    conn = _db(settings)
    if retry_failed:
        click.echo(f"requeued {jobqueue.retry_failed(conn)} failed jobs", err=True)
    counts = jobqueue.counts(conn)
    backlog = jobqueue.backlog(conn)
    if as_json:
        _echo_json({"counts": counts, "jobs": backlog})
        return
    click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
    for job in backlog:
        error = f"  {job['error']}" if job["error"] else ""
        due = ""
        if job["state"] == "pending" and job["not_before"]:
            due = f" retry={_fmt_time(job['not_before'])}"
        click.echo(
            f"{job['id']:6d} {job['state']:<8} {job['recording_id']} "
            f"attempts={job['attempts']}{due}{error}"
        )


# --- models --------------------------------------------------------------------------------


@main.group("models")
def models_group() -> None:
    """Model files: list, install, verify against the manifest's checksums."""


@models_group.command("list")
@config_option
@json_option
def models_list(config_path: Path | None, as_json: bool) -> None:
    """Supported models and whether each is installed."""
    settings = _settings(config_path)
    models_dir = settings.storage.resolved_models_dir
    used = set(modelstore.configured(settings))
    rows = [
        {
            "name": m.name,
            "role": m.role,
            "licence": m.licence,
            "source": m.source,
            "installed": modelstore.is_installed(m.name, models_dir),
            "configured": m.name in used,
            "description": m.description,
        }
        for m in modelstore.manifest().values()
    ]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        mark = "installed" if r["installed"] else "-"
        used_mark = "*" if r["configured"] else " "
        click.echo(f"{used_mark} {r['name']:<18} {r['role']:<8} {mark:<10} {r['description']}")


@models_group.command("install")
@config_option
@click.argument("names", nargs=-1)
@click.option("--default", "defaults", is_flag=True, help="The models the configuration uses.")
def models_install(config_path: Path | None, names: tuple[str, ...], defaults: bool) -> None:
    """Install models into the models directory and check their checksums."""
    settings = _settings(config_path)
    wanted = list(names) + (modelstore.configured(settings) if defaults or not names else [])
    for name in dict.fromkeys(wanted):
        try:
            path = modelstore.install(name, settings.storage.resolved_models_dir)
        except modelstore.ModelError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{name}: {path}")


@models_group.command("verify")
@config_option
@click.argument("names", nargs=-1)
def models_verify(config_path: Path | None, names: tuple[str, ...]) -> None:
    """Check installed models against the manifest (default: the configured ones)."""
    settings = _settings(config_path)
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
    """Configuration."""


@config_group.command("check")
@config_option
@json_option
def config_check(config_path: Path | None, as_json: bool) -> None:
    """Validate the configuration (file and environment) and say what is wrong."""
    settings = _settings(config_path)
    if as_json:
        _echo_json(settings.model_dump(mode="json", exclude={"mqtt": {"password"}}))
        return
    click.echo(f"configuration ok (data in {settings.storage.data_dir})")


@main.command()
@json_option
@click.option("--check", is_flag=True, help="Exit 1 when there is no input device.")
def devices(as_json: bool, check: bool) -> None:
    """List microphones (input devices)."""
    found = input_devices()
    if as_json:
        _echo_json(found)
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
    settings = _settings(config_path)
    data = _command(settings, "status", {})
    if as_json:
        _echo_json(data)
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
            + (f" (pid {data['pid']}, up {data['uptime_s']:.0f} s)" if data["running"] else ""),
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
        (
            "microphone",
            f"{data['microphone']}  level {data['audio_level_dbfs']} dBFS,"
            f" dropped frames {data['dropped_frames']}"
            if data["running"]
            else "-",
        ),
        (
            "backlog",
            mark(data["backlog"] < 10, str(data["backlog"]))
            + (
                f" (oldest from {_fmt_time(data['oldest_pending_at'])})"
                if data["oldest_pending_at"]
                else ""
            )
            + (f", {data['jobs']['failed']} failed" if data["jobs"]["failed"] else ""),
        ),
        (
            "last transcript",
            f"{_fmt_time(last.get('started_at'))}  {(last.get('text') or '')[:60]}",
        ),
        ("last speaker", data["last_speaker"] or "-"),
        (
            "today",
            f"{data['recordings_today']} recordings, {data['transcripts_today']} transcribed",
        ),
        ("models", ", ".join(f"{k} {v}" for k, v in data["models"].items() if v)),
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
    ]
    for label, value in rows:
        click.echo(f"{label:<16} {value}")


@main.command()
@config_option
@click.option("--older-than", "older_than_days", type=float, help="Days: older recordings.")
@click.option("--start", help="ISO date/time: from.")
@click.option("--end", help="ISO date/time: until.")
@click.option("--speaker", help="Everything this speaker said.")
@click.option("--audio-only", is_flag=True, help="Delete the audio, keep the text.")
def purge(
    config_path: Path | None,
    older_than_days: float | None,
    start: str | None,
    end: str | None,
    speaker: str | None,
    audio_only: bool,
) -> None:
    """Delete recordings by age, time range or speaker: audio, text, index and embeddings.

    \b
    Examples:
      meraudiod purge --older-than 30
      meraudiod purge --start 2026-11-24T09:00 --end 2026-11-24T12:00
      meraudiod purge --speaker "Guest 3"
    """
    settings = _settings(config_path)
    args = {
        "older_than_days": older_than_days,
        "start": start,
        "end": end,
        "speaker": speaker,
        "audio_only": audio_only,
    }
    result = _command(settings, "purge", args)
    click.echo(
        f"deleted {result['recordings_deleted']} recordings"
        f" and {result['audio_files_deleted']} audio files"
    )


@main.command()
@config_option
@click.argument("rec_ids", nargs=-1)
@click.option("--failed", is_flag=True, help="Every recording whose transcription failed.")
def reprocess(config_path: Path | None, rec_ids: tuple[str, ...], failed: bool) -> None:
    """Queue recordings to be transcribed again (by the running daemon or the next run)."""
    settings = _settings(config_path)
    result = _command(settings, "reprocess", {"ids": list(rec_ids), "failed": failed})
    click.echo(f"queued {result['queued']} recordings")


@main.group("mqtt")
def mqtt_group() -> None:
    """The MQTT connection."""


@mqtt_group.command("test")
@config_option
def mqtt_test(config_path: Path | None) -> None:
    """Check DNS, TCP, TLS, CONNECT and a publish/subscribe round trip; say which step failed."""
    from .mqtt import check_connection

    settings = _settings(config_path)
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
    """
    from .bench import run_bench

    settings = _settings(config_path)
    logging.getLogger().setLevel(logging.WARNING)
    figures = run_bench(
        settings,
        str(config_path) if config_path else None,
        lambda stage: click.echo(f"measuring {stage} ...", err=True),
    )
    if as_json:
        _echo_json(figures)
        return
    for key, value in figures.items():
        click.echo(f"{key:<36} {value}")
