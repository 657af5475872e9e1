"""What `meraudiod status` and the `status` command report: the database, and the heartbeat
file the running daemon rewrites every few seconds (so it works with the daemon up or down
and never starts the daemon's threads). Also what the running daemon says about itself: the
heartbeat's snapshot and its retained MQTT state."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import __version__, jobs
from .checks import data_dir_holder
from .config import Settings
from .db import database_id, get_kv, now
from .held_audio import runtime_dir
from .machine import describe as describe_machine
from .messages import State, truncate_state
from .recordings import SPILLED
from .retention import disk_free_mb
from .unsaved import kept_for, unsaved_dir

if TYPE_CHECKING:
    from .daemon import Daemon

HEARTBEAT_FILE: Final = "heartbeat.json"
HEARTBEAT_STALE_S: Final = 20.0


def heartbeat_path(settings: Settings) -> Path:
    """Where the running daemon says how it is (a small file, rewritten every few seconds).

    From the configuration alone, so that `status` in an admin's shell finds what the
    service wrote."""
    return settings.storage.runtime_dir / HEARTBEAT_FILE


def read_heartbeat(settings: Settings) -> dict[str, Any] | None:
    """What the running daemon last wrote about itself."""
    try:
        data = json.loads(heartbeat_path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_heartbeat(settings: Settings, heartbeat: dict[str, Any]) -> None:
    """Replace the heartbeat file. No fsync: it is rewritten every few seconds and losing
    it in a power cut only makes the daemon look stopped, which it then is."""
    path = heartbeat_path(settings)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(heartbeat), encoding="utf-8")
    os.replace(tmp, path)


def configured_models(settings: Settings) -> dict[str, str | None]:
    """The models these settings load, by role (None: that stage is off)."""
    return {
        "vad": settings.vad.model,
        "asr": settings.asr.model,
        "speakers": settings.speakers.model if settings.speakers.enabled else None,
    }


def _files_bytes(folder: Path) -> int:
    """The size of the files under `folder`. A file that goes while it is counted (an
    upload's partial file, a recording's renamed when written) is gone, not an error: it
    made a status request fail under a flood of uploads."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(os.path.join(root, name))
                total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def _kept_files(folder: Path | None, owner: str) -> int | None:
    """Recordings kept over a stop in `folder` for the database `owner` names (a temp file of
    a kill is none); None when this user may not read it (the service's, 0700)."""
    try:
        names = os.listdir(folder) if folder is not None else []
    except (FileNotFoundError, NotADirectoryError):  # none kept, or taken back meanwhile
        return 0
    except OSError:
        return None
    return sum(1 for name in names if kept_for(name, owner))


def _unsaved(
    conn: sqlite3.Connection, settings: Settings, heartbeat: dict[str, Any] | None
) -> dict[str, Any]:
    """What is not in the database or the audio directory yet, for want of a writable disk
    (or the database's write lock): recordings, and recordings' audio. The running daemon
    holds them in memory (its heartbeat counts them); a stopped one kept them in the
    runtime directory for the next start: the recordings in its folder (unsaved.py), and
    the audio its database's rows name (held_audio.py: another data directory's daemon
    may keep its own in the same runtime directory)."""
    if heartbeat is not None:
        return {
            "recordings": int(heartbeat.get("unsaved_recordings") or 0),
            "audio": int(heartbeat.get("held_audio") or 0),
            "kept_in": None,
        }
    runtime = runtime_dir(settings.storage)
    spilled = conn.execute("SELECT COUNT(*) FROM kv WHERE key GLOB ?", (SPILLED + "*",))
    return {
        "recordings": _kept_files(unsaved_dir(settings.storage), database_id(conn)),
        "audio": int(spilled.fetchone()[0]),
        "kept_in": str(runtime) if runtime is not None else None,
    }


def _holder_state(holder: int | None, heartbeat: dict[str, Any]) -> str | None:
    """What the process that holds the data directory does while its heartbeat does not say
    it runs: `starting` (no heartbeat of its own yet: the store, the models, a mount waited
    for; or it cannot write one), `stopping` (its last one says so), `not answering` (its
    heartbeat stale: a wedged daemon, or one whose heartbeat's disk is full)."""
    if holder is None:
        return None
    if heartbeat.get("pid") != holder:
        return "starting"
    return "not answering" if heartbeat.get("at") else "stopping"


def status(
    conn: sqlite3.Connection,
    settings: Settings,
    disk_use: bool = True,
    heartbeat: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything an admin wants at a glance, from the database and the daemon's heartbeat.

    disk_use=False skips walking the data directory (the daemon's frequent state updates);
    the daemon passes its own snapshot as `heartbeat` (the file may be up to 5 s old).
    """
    if heartbeat is None:
        heartbeat = read_heartbeat(settings) or {}
    # abs: a heartbeat from the future was written before the clock was set back, and not
    # since (a running daemon writes one every few seconds).
    age_s = now() - float(heartbeat.get("at", 0))
    # A heartbeat names its data directory: one copied with the directory (`cp -a` while
    # the daemon runs) is another directory's daemon.
    written_for = heartbeat.get("data_dir")
    running = (
        bool(heartbeat)
        and abs(age_s) < HEARTBEAT_STALE_S
        and jobs.pid_alive(int(heartbeat["pid"]))
        and (written_for is None or written_for == str(settings.storage.data_dir.resolve()))
    )
    counts = jobs.counts(conn)
    oldest = conn.execute(
        "SELECT MIN(r.started_at) FROM jobs j JOIN recordings r ON r.id = j.recording_id"
        " WHERE j.state IN ('pending', 'running')"
    ).fetchone()[0]
    last = conn.execute(
        "SELECT id, started_at, text FROM recordings WHERE status='done' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    last_speaker = conn.execute(
        "SELECT p.name, p.provisional FROM segments s JOIN speakers p ON p.id = s.speaker_id"
        " ORDER BY s.id DESC LIMIT 1"
    ).fetchone()
    midnight = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    today = conn.execute(
        "SELECT COUNT(*), SUM(CASE WHEN status='done' THEN 1 ELSE 0 END) FROM recordings"
        " WHERE started_at >= ?",
        (midnight,),
    ).fetchone()
    outbox = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    # The ASR model is the server's when transcribing on Wyoming servers (as the daemon saw it).
    asr: dict[str, Any] = (heartbeat.get("asr") if running else None) or {}
    backend = asr.get("backend") or settings.asr.backend
    asr_model = asr.get("model") or (settings.asr.model if backend == "local" else "wyoming")
    up = [s["uri"] for s in asr.get("servers", ()) if s.get("up")]
    data_dir = settings.storage.data_dir
    used_mb = _files_bytes(data_dir) / 1e6 if disk_use else None
    holder = None if running else data_dir_holder(settings)
    return {
        "running": running,
        "pid": heartbeat.get("pid") if running else None,
        # A daemon that stopped wrote `at` 0: it has no heartbeat to be of an age.
        "heartbeat_age_s": round(age_s, 1) if heartbeat.get("at") else None,
        # Not running by its heartbeat, yet a process holds the data directory: a daemon
        # starting or stopping, one that cannot write its heartbeat (its disk full), or wedged.
        "data_dir_held_by": holder,
        "data_dir_holder_state": _holder_state(holder, heartbeat),
        "listening": heartbeat.get("listening") if running else None,
        "muted": (not heartbeat.get("listening")) if running else None,
        "degraded": heartbeat.get("degraded") if running else None,
        "stopped_because": heartbeat.get("stopped_because") if not running else None,
        "microphone": heartbeat.get("microphone") if running else None,
        "audio_level_dbfs": heartbeat.get("audio_level_dbfs") if running else None,
        "dropped_frames": heartbeat.get("dropped_frames") if running else None,
        "uptime_s": heartbeat.get("uptime_s") if running else None,
        "mqtt": heartbeat.get("mqtt") if running else None,
        # What the last SIGHUP could not apply, or why it was refused.
        "restart_needed": heartbeat.get("restart_needed") if running else None,
        "reload_error": heartbeat.get("reload_error") if running else None,
        "backlog": counts["pending"] + counts["running"],
        "jobs": counts,
        "oldest_pending_at": oldest,
        "last_transcript": dict(zip(last.keys(), tuple(last), strict=True)) if last else None,
        "last_speaker": last_speaker[0] if last_speaker else None,
        "last_speaker_provisional": bool(last_speaker[1]) if last_speaker else None,
        "recordings_today": int(today[0] or 0),
        "transcripts_today": int(today[1] or 0),
        "asr_servers": asr.get("servers") if backend == "wyoming" else None,
        "unsaved": _unsaved(conn, settings, heartbeat if running else None),
        "outbox_pending": int(outbox),
        "outbox_dropped": int(get_kv(conn, "outbox_dropped", "0")),
        # What the running daemon loaded (its config may differ from the one `status` read);
        # with the daemon down, what the configuration would load. On Wyoming servers the ASR
        # model is the server's, as the daemon saw it.
        "models": {
            **(
                heartbeat["models"]
                if running and isinstance(heartbeat.get("models"), dict)
                else configured_models(settings)
            ),
            "asr": asr_model,
            "asr_server": up[0] if up else None,
        },
        "data_dir": str(data_dir),
        "disk_used_mb": round(used_mb, 1) if used_mb is not None else None,
        "disk_free_mb": round(disk_free_mb(data_dir), 1),
        "version": __version__,
        "platform": dict(describe_machine()),
    }


def daemon_snapshot(daemon: Daemon) -> dict[str, Any]:
    """What the running daemon says about itself in the heartbeat (and in its MQTT state)."""
    listener, worker = daemon.listener, daemon.pipeline.worker
    return {
        "pid": os.getpid(),
        "at": time.time(),
        "data_dir": str(daemon.settings.storage.data_dir.resolve()),
        "listening": daemon.listening,
        "degraded": daemon.degraded,
        "stopped_because": daemon.stage_problem,  # what `status` says once it has exited
        "microphone": daemon.source.name,
        "audio_level_dbfs": (
            round(listener.level_dbfs, 1)
            if listener is not None and listener.level_dbfs is not None and daemon.listening
            else None
        ),
        "recording": bool(listener is not None and listener.speaking),
        "unsaved_recordings": daemon.pipeline.waiting_to_save,
        "held_audio": len(daemon.pipeline.memory),
        "dropped_frames": daemon.source.dropped_frames,
        "uptime_s": round(time.monotonic() - daemon.started_at, 1),
        "mqtt": (
            {"connected": bool(daemon.mqtt.online), "error": daemon.mqtt.last_error}
            if daemon.mqtt is not None
            else None
        ),
        "models": daemon.models,
        "restart_needed": daemon.restart_needed,
        "reload_error": daemon.reload_error,
        "version": __version__,
        "asr": worker.transcriber.describe() if worker is not None else None,
    }


def retained_state(conn: sqlite3.Connection, daemon: Daemon) -> State:
    """The daemon's retained MQTT state: the database's figures and its own snapshot."""
    snap = daemon.snapshot()
    info = status(conn, daemon.settings, disk_use=False, heartbeat=snap)
    last = info["last_transcript"] or {}
    text = last.get("text")
    return State(
        listening=daemon.listening,
        recording=snap["recording"],
        queue_depth=info["backlog"],
        failed_jobs=info["jobs"]["failed"],
        outbox_depth=info["outbox_pending"],
        outbox_dropped=info["outbox_dropped"],
        models={k: v for k, v in info["models"].items() if v},
        version=__version__,
        uptime_s=snap["uptime_s"],
        microphone=snap["microphone"],
        audio_level_dbfs=snap["audio_level_dbfs"],
        last_transcript=truncate_state(text) if text is not None else None,
        last_transcript_full=text,
        last_transcript_at=last.get("started_at"),
        last_speaker=info["last_speaker"],
        last_speaker_provisional=info["last_speaker_provisional"],
        disk_free_mb=round(disk_free_mb(daemon.settings.storage.data_dir), 1),
        degraded=daemon.degraded,
    )
