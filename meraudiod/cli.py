"""The `meraudiod` command. Admin commands read the database, never start the daemon's threads."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Final

import click
from ulid import ULID

from . import jobs
from . import models as modelstore
from .audio import FRAME_S
from .checks import MayPassError, StartError, check_writable, files_in_use
from .cli_checks import config_group, devices, mqtt_group
from .cli_common import (
    config_option,
    echo_json,
    fmt_span,
    json_option,
    open_store,
    refuse_unmounted,
    settings_from,
    verbose_option,
)
from .cli_jobs import jobs_cmd, reprocess
from .cli_models import models_group
from .cli_recordings import purge, recordings
from .cli_speakers import speakers_group
from .cli_status import status_cmd
from .db import DamagedDatabaseError, DatabaseError
from .mounts import NotMounted, models_dir, store_dirs
from .recording_views import analysis_record
from .signals import Stopped, command_handlers, run_handlers
from .sources import SourceError, open_source, printable
from .wording import counted

# What `bench --only` can pick (bench.py's sections, in the order they run).
BENCH_SECTIONS: Final = ("vad", "listening", "asr", "speakers", "pipeline", "memory", "http")
_UMASK: Final = 0o027  # group may read (an admin in the service's group), others nothing
# sysexits.h's EX_CONFIG. The unit does not restart on it (RestartPreventExitStatus=78): with
# Restart=on-failure and RestartSec=5 a bad key was a start every 5 s for ever, too slow for
# systemd's start limit to end it.
EXIT_NEEDS_A_PERSON: Final = 78
_STOP_POLL_S: Final = 0.2  # how soon `analyze` sees a stop while a file is read


class NeedsAPerson(click.ClickException):
    """A start refused on what only a person can fix: configuration, models, directories."""

    exit_code = EXIT_NEEDS_A_PERSON


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


for _command in (
    config_group,
    devices,
    jobs_cmd,
    models_group,
    mqtt_group,
    purge,
    recordings,
    reprocess,
    speakers_group,
    status_cmd,
):
    main.add_command(_command)


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
    try:
        settings = settings_from(config_path, verbosity, daemon=not on_terminal)
    except click.ClickException as exc:  # the configuration: unreadable, a bad key or value
        raise NeedsAPerson(exc.message) from exc
    if source is not None:
        settings.audio.source = _checked_source(source)
    if realtime is not None:
        settings.audio.realtime = realtime
    count = [0, 0]  # transcripts of this run's recordings, and of those an earlier run left
    # A recording's id holds when it was made (a ULID): this run's are from after this.
    run_started_ms = int(time.time() * 1000)

    def printer(result: Any) -> None:
        # The backlog an earlier run left (an `analyze` stopped half way, a `reprocess`) is
        # transcribed too: named by its source, not taken for this one's; so is what this run
        # heard from elsewhere (an upload, a live socket).
        earlier = ULID.from_str(result.recording_id).milliseconds < run_started_ms
        count[1 if earlier else 0] += 1
        flag = "  (suspect: not speech)" if result.suspect else ""
        if earlier:
            flag += f"  ({result.source}, left by an earlier run)"
        elif result.source != audio_source.name:
            flag += f"  ({result.source})"
        try:
            click.echo(f"{fmt_span(result.start_s, result.end_s)} {result.text}{flag}")
        except BrokenPipeError:  # `run --print | head -1`: not a reason for the worker to die
            _discard_stdout()

    try:
        audio_source = open_source(settings.audio.source, settings.audio)
    except SourceError as exc:  # standard input closed: one line, exit 1
        raise click.ClickException(str(exc)) from exc
    daemon = Daemon(
        settings,
        audio_source,
        stop,
        on_transcribed=printer if print_ else None,
    )
    daemon.reload_requested = reload
    daemon.config_path = str(config_path) if config_path else None
    if source is not None:
        daemon.cli_overrides[("audio", "source")] = settings.audio.source
    if realtime is not None:
        daemon.cli_overrides[("audio", "realtime")] = realtime
    if verbosity:  # the level -v set outlives a reload of the logging too
        level = logging.getLevelName(logging.getLogger().level)
        settings.logging = settings.logging.model_copy(update={"level": level})
        daemon.cli_overrides[("logging", "level")] = level
    t0 = time.monotonic()
    try:
        code = daemon.run() if daemon.start() else 0
    except _needs_a_person() as exc:
        daemon.stop()
        raise NeedsAPerson(str(exc)) from exc
    except (SourceError, DatabaseError, NotMounted, MayPassError) as exc:  # exit 1, restarted
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
        left = f", and {count[1]} left by an earlier run" if count[1] else ""
        took_s = time.monotonic() - t0
        click.echo(f"{counted(n, 'recording')}, {count[0]} transcribed{left}, in {took_s:.1f} s")
    sys.exit(code)


def _discard_stdout() -> None:
    """The reader of stdout went away: what is printed from now on goes nowhere, quietly
    (Python's documented remedy for a broken pipe), and the run goes on to its end."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _needs_a_person() -> tuple[type[Exception], ...]:
    """Errors at start whose message is the whole story (the file, the reason, the fix) and
    that no restart can cure: a model missing or damaged, a directory not writable, a
    database damaged or from a newer meraudiod."""
    from .asr import AsrError
    from .diarization import DiarizationError
    from .vad import VadError
    from .voiceprints import SpeakerError

    return (
        modelstore.ModelError,
        AsrError,
        DiarizationError,
        VadError,
        SpeakerError,
        StartError,
        DamagedDatabaseError,
    )


def _checked_source(spec: str) -> str:
    from .config_sections import AudioSettings

    try:
        return AudioSettings(source=spec).source
    except Exception as exc:
        raise click.BadParameter(f"{spec!r}: use mic, file:PATH, stdin or demo") from exc


# --- analyze -------------------------------------------------------------------------------


def _readable(given: Path) -> tuple[Path, str | None]:
    """The file's whole path (as `run --source file:` stores it: `sub/a.flac` said nothing of
    where it was) and why it cannot be read, or None: its first block decoded."""
    from .sources import FileSource, file_path

    try:
        path = file_path(str(given))
    except SourceError as exc:
        return given, str(exc)
    probe = FileSource(path)
    try:
        probe.start()
    except SourceError as exc:
        return path, str(exc)
    probe.stop()
    return path, None


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
    stop = command_handlers()  # SIGTERM, Ctrl-C (installed before the imports: signals.py)
    from .pipeline import Pipeline
    from .sources import FileSource

    settings = settings_from(config_path, verbosity)
    refuse_unmounted(store_dirs(settings) | models_dir(settings))  # no heartbeat written
    checked = [_readable(given) for given in files]
    if all(error for _, error in checked):  # said at once, no model loaded for nothing
        for path, error in checked:
            if as_json:
                found = {"file": printable(str(path)), "duration_s": 0.0, "recordings": []}
                echo_json({**found, "error": error})
            click.echo(f"error: {error}", err=True)
        sys.exit(1)
    pipeline = Pipeline(settings, stop, serves_store=False)  # a live daemon's store is its own
    try:
        check_writable(settings)  # naming the key: it said `[Errno 20] Not a directory: ...`
        pipeline.open()
    except Exception as exc:  # a missing model or a bad config: say why
        raise click.ClickException(str(exc)) from exc
    pipeline.start_worker()
    results: list[tuple[Path, float, list[str], str | None]] = []
    cut: str | None = None  # where a stop left a file read in part
    for path, refused in checked:
        if stop.is_set():
            break
        if refused:
            results.append((path, 0.0, [], refused))
            continue
        source = FileSource(path)
        try:
            source.start()
        except SourceError as exc:  # gone or changed since it was checked
            results.append((path, 0.0, [], str(exc)))
            continue
        listener = pipeline.listener(source, keep_ids=True, error_said_by_caller=True)
        stopped_in_file = False
        while not listener.finished.wait(_STOP_POLL_S):
            if stop.is_set():  # what is being said is saved; the rest is not read
                listener.stop()
                stopped_in_file = True
        source.stop()
        duration_s = round(listener.frames_read * FRAME_S, 3)
        if stopped_in_file:
            cut = f"{printable(str(path))} read to {duration_s:.1f} s only"
        results.append((path, duration_s, listener.recording_ids or [], listener.error))
    try:
        pipeline.drain()
        stopped = pipeline.worker.died if pipeline.worker is not None else None
    except sqlite3.Error as exc:  # its disk full: the transcripts left are not waited for
        stopped = f"{type(exc).__name__}: {exc}"
    interrupted = stop.is_set()  # by a signal (closing the pipeline sets it too)
    pipeline.close()
    conn = open_store(settings, create=True)
    failed = False
    pending = 0  # recordings not transcribed (a stop)
    given_up: list[str] = []  # recordings whose transcription failed for good
    stored = 0
    for path, duration_s, rec_ids, error in results:
        # A file cut part of the way in has recordings from before the cut and an error.
        recs = [analysis_record(conn, settings.storage.audio_dir, r) for r in rec_ids]
        pending += sum(rec["state"] == "pending" for rec in recs)
        given_up += [rec["id"] for rec in recs if rec["state"] == "failed"]
        stored += len(recs)
        if as_json:
            found = {"file": printable(str(path)), "duration_s": duration_s, "recordings": recs}
            echo_json({**found, "error": error} if error else found)
        elif duration_s or not error:
            click.echo(
                f"{printable(str(path))} ({duration_s:.1f} s, {counted(len(recs), 'recording')})"
            )
            for rec in recs:
                click.echo(f"  {fmt_span(rec['start_s'], rec['end_s'])} {rec['text'] or ''}")
        if error:
            failed = True
            click.echo(f"error: {error}", err=True)
    if given_up:  # the worker logged each; a script reading the output must know too
        failed = True
        why = jobs.error_of(conn, given_up[0])
        not_done = f"{len(given_up)} of {counted(stored, 'recording')} not transcribed"
        click.echo(f"error: {not_done}: {why}", err=True)
    if stopped:  # the transcripts not stored (a full disk): printed without their text
        failed = True
        click.echo(f"error: transcription stopped: {stopped}", err=True)
    elif interrupted:  # SIGTERM or Ctrl-C: what it left undone, in one line
        undone = [cut] if cut else []
        if len(files) > len(results):
            undone.append(f"{len(files) - len(results)} of {counted(len(files), 'file')} not read")
        if pending:  # whole and pending: a daemon on this data directory takes them over
            undone.append(f"{counted(pending, 'recording')} not transcribed (left for the daemon)")
        if undone:
            failed = True
            click.echo(f"error: interrupted: {', '.join(undone)}", err=True)
    if failed:
        sys.exit(1)


@main.command()
@config_option
@json_option
@click.option(
    "--only",
    "sections",
    multiple=True,
    type=click.Choice(BENCH_SECTIONS),
    help="Measure this part only (repeatable); the verdict needs asr, speakers and pipeline.",
)
@click.option(
    "--clip-s",
    type=click.FloatRange(5.0, 35.0),
    default=20.0,
    show_default=True,
    help="Seconds of the sample the daemon runs on at real time (pipeline): shorter is quicker.",
)
def bench(
    config_path: Path | None, as_json: bool, sections: tuple[str, ...], clip_s: float
) -> None:
    """Measure this device with the configured models on the bundled sample (under 2 minutes):
    VAD cost and listening CPU, ASR real-time factor and latency (each against the bare
    library), speaker-embedding cost, the daemon's peak memory, disk writes per recorded hour,
    and whether it keeps up with continuous speech. Listening CPU and disk writes are also
    measured with MQTT on, against a throwaway local mosquitto (when it is installed).

    \b
    Examples:
      meraudiod bench
      MERAUDIOD_ASR__CPU_THREADS=1 meraudiod bench --json
      meraudiod bench --only pipeline --only memory
    """
    from .bench import run_bench, unmeasurable

    settings = settings_from(config_path)
    # Its daemons' scratch directories are in the data directory (their audio and heartbeat
    # too); they load the configured models, and its HTTP stage the token file.
    http_files = {k: v for k, v in files_in_use(settings).items() if k.startswith("http.")}
    refuse_unmounted(
        {"storage.data_dir": settings.storage.data_dir} | models_dir(settings) | http_files
    )
    if off := unmeasurable(settings, sections):
        raise click.ClickException(f"bench --only: nothing to measure for {', '.join(off)}")
    logging.getLogger().setLevel(logging.WARNING)
    try:
        figures = run_bench(
            settings,
            str(config_path) if config_path else None,
            lambda stage: click.echo(f"measuring {stage} ...", err=True),
            only=sections or None,
            clip_s=clip_s,
        )
    except Stopped as exc:  # SIGTERM or Ctrl-C: unwound through every cleanup (signals.py)
        click.echo(
            f"error: bench stopped by {exc.signal_name}: nothing measured, its scratch files"
            " and processes removed",
            err=True,
        )
        sys.exit(1)
    if as_json:
        echo_json(figures)
        return
    for key, value in figures.items():
        click.echo(f"{key:<36} {value}")
