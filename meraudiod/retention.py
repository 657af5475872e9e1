"""Retention and privacy: purge by age, speaker or time range; the periodic sweep; disk guard."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .config import Settings
from .db import now, open_db
from .deletion import batches, delete_recordings, finish_forgetting, remove_audio_first
from .recordings import HELD_MARK, audio_file, forget_held
from .stage import StageThread
from .wall_clock import follow_step
from .wording import counted

_LOGGER = logging.getLogger(__name__)
_DAY_S = 86400.0
# Not transcribed yet, or queued to be again (reprocess): retention keeps them whatever their
# time stamp says (a clock that was wrong when they were recorded, a backlog older than the
# limit), so none is lost untranscribed and no queued job finds its audio gone.
_FINISHED = (
    "r.status != 'pending' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.recording_id = r.id"
    " AND j.state IN ('pending', 'running'))"
)


@dataclass(frozen=True)
class PurgeResult:
    """What a purge or sweep removed."""

    recordings_deleted: int = 0
    audio_files_deleted: int = 0


def purge(
    conn: sqlite3.Connection,
    audio_dir: Path,
    *,
    before: float | None = None,
    after: float | None = None,
    speaker_id: str | None = None,
    audio_only: bool = False,
    dry_run: bool = False,
    finished_only: bool = False,
    stop: threading.Event | None = None,
) -> PurgeResult:
    """Delete recordings started in [after, before) and/or attributed to a speaker.

    With audio_only the text stays and only the audio files go. At least one criterion is
    required, so a purge never deletes everything by accident. The counts are of what
    really was there (an audio file already gone is not counted); with dry_run nothing is
    deleted and the counts say what would be. With finished_only recordings not yet
    transcribed are kept. Once `stop` is set no further batch of DELETE_BATCH starts (the
    sweep of a daemon that is stopping): the rest stays whole for the next time.
    """
    if before is None and after is None and speaker_id is None:
        raise ValueError("purge needs an age, a time range or a speaker")
    where: list[str] = ["1=1"]
    args: list[object] = []
    if before is not None:
        where.append("r.started_at < ?")
        args.append(before)
    if after is not None:
        where.append("r.started_at >= ?")
        args.append(after)
    if speaker_id is not None:
        where.append(
            "(r.id IN (SELECT recording_id FROM segments WHERE speaker_id = ?)"
            " OR r.id IN (SELECT recording_id FROM speaker_mappings WHERE speaker_id = ?))"
        )
        args += [speaker_id, speaker_id]
    if audio_only:  # a file, or audio held in memory to be written (held_audio.py)
        where.append(
            "(r.audio_path IS NOT NULL OR EXISTS (SELECT 1 FROM kv WHERE kv.key = ? || r.id))"
        )
        args.append(HELD_MARK)
    if finished_only:
        where.append(_FINISHED)
    rows = conn.execute(
        f"SELECT r.id, r.audio_path FROM recordings r WHERE {' AND '.join(where)}",
        args,
    ).fetchall()
    if dry_run:
        files = sum(
            1 for r in rows if r["audio_path"] and audio_file(audio_dir, r["audio_path"]).is_file()
        )
        return PurgeResult(0 if audio_only else len(rows), files)
    if audio_only:
        dropped = drop_audio(conn, audio_dir, rows, stop=stop)
        return PurgeResult(audio_files_deleted=dropped)
    deleted = delete_recordings(conn, audio_dir, [str(r["id"]) for r in rows], stop)
    return PurgeResult(deleted.recordings, deleted.audio_files)


def drop_audio(
    conn: sqlite3.Connection,
    audio_dir: Path,
    rows: Sequence[sqlite3.Row],
    durable: bool = True,
    stop: threading.Event | None = None,
) -> int:
    """Delete audio files (rows of `id`, `audio_path`) but keep their transcripts; returns
    how many files were there. The files go first (see remove_audio_first), in transactions
    of DELETE_BATCH (a year of audio in one held the write lock for seconds); once `stop` is
    set no further one starts."""
    return sum(
        remove_audio_first(conn, audio_dir, batch, _forget_audio, durable)
        for batch in batches(rows, stop)
    )


def _forget_audio(conn: sqlite3.Connection, rec_id: str) -> None:
    conn.execute("UPDATE recordings SET audio_path=NULL WHERE id=?", (rec_id,))
    forget_held(conn, rec_id)  # held: never written


def sweep(
    conn: sqlite3.Connection, settings: Settings, stop: threading.Event | None = None
) -> PurgeResult:
    """Apply the configured limits: audio older than audio_days, text older than text_days.

    Recordings not transcribed yet keep their text and audio. A `stop` set meanwhile (the
    daemon stopping) ends it between two batches of deletes: the rest, whole, is the next
    sweep's.
    """
    r = settings.retention
    total = PurgeResult()
    if r.text_days is not None:
        total = purge(
            conn,
            settings.storage.audio_dir,
            before=now() - r.text_days * _DAY_S,
            finished_only=True,
            stop=stop,
        )
    if r.audio_days is not None and not (stop is not None and stop.is_set()):
        rows = conn.execute(
            "SELECT r.id, r.audio_path FROM recordings r WHERE r.audio_path IS NOT NULL"
            f" AND r.started_at < ? AND {_FINISHED}",
            (now() - r.audio_days * _DAY_S,),
        ).fetchall()
        dropped = drop_audio(conn, settings.storage.audio_dir, rows, stop=stop)
        total = PurgeResult(total.recordings_deleted, total.audio_files_deleted + dropped)
    if r.text_days is None and not (stop is not None and stop.is_set()):
        finish_forgetting(conn)  # a delete's checkpoint a backup's read kept from finishing
    if total.recordings_deleted or total.audio_files_deleted:
        _LOGGER.info(
            "retention: deleted %s and %s%s",
            counted(total.recordings_deleted, "recording"),
            counted(total.audio_files_deleted, "audio file"),
            "; stopping, the rest at the next sweep" if stop is not None and stop.is_set() else "",
        )
    return total


def _existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (a directory not made yet is on its disk)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free_mb(path: Path) -> float:
    """Free space where the data lives."""
    return shutil.disk_usage(_existing(path)).free / 1e6


# A disk that refused a write is taken to have room again with this much free, or this much
# more than when it refused (a small disk, a few MB in all, may never have 1 MB free).
_ROOM_MB: Final = 1.0
_MORE_ROOM_MB: Final = 0.064


def room_again(path: Path, free_when_refused_mb: float) -> bool:
    """The disk of `path`, which refused a write for want of room with
    `free_when_refused_mb` free, has room again: worth another try."""
    free_mb = disk_free_mb(path)
    return free_mb >= _ROOM_MB or free_mb >= free_when_refused_mb + _MORE_ROOM_MB


def writable(path: Path) -> bool:
    """A file can be made in directory `path`, or in its nearest parent that exists when it
    is gone (made and gone at once: for a look now and then while it could not be written,
    not a poll)."""
    try:
        with tempfile.TemporaryFile(dir=_existing(path)):
            return True
    except OSError:
        return False


def read_only_dirs(settings: Settings) -> list[Path]:
    """The data and audio directories whose file system is mounted read-only (an SD card
    the kernel remounted read-only after errors, a bind mount made read-only): one statvfs
    each, cheap to poll. (A file system the kernel stops after an error without marking the
    mount read-only, as ext4 on Linux 6.x does, only shows in the writes it refuses.)"""
    dirs = dict.fromkeys((settings.storage.data_dir, settings.storage.audio_dir))
    return [path for path in dirs if os.statvfs(_existing(path)).f_flag & os.ST_RDONLY]


def disk_low(settings: Settings) -> bool:
    """Below the free-disk threshold where the audio is written (tmp_audio_dir, when set, is
    not the data directory's disk): stop writing audio."""
    return disk_free_mb(settings.storage.audio_dir) < settings.retention.min_free_disk_mb


class Retention(StageThread):
    """The periodic sweep on a named thread."""

    thread_name = "retention"

    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self.settings = settings
        self.stop_event = stop
        self.last_result = PurgeResult()
        # Set by a reload that changed the limits, and on the way out: the sweep does not
        # wait out the interval in hand (an hour, by default) to follow them.
        self._wake = threading.Event()

    def sweep_now(self) -> None:
        """Sweep at once with the settings as they are now (a reload changed them)."""
        self._wake.set()

    def join(self, timeout_s: float | None = None) -> None:
        """Wake the thread (its stop event is set) and wait for it to end."""
        self._wake.set()
        super().join(timeout_s)

    def _run(self) -> None:
        conn = open_db(self.settings.storage.db_path, stop=self.stop_event)
        try:
            while not self.stop_event.is_set():
                try:
                    # The recordings stamped before a step of the clock are moved first.
                    if follow_step(conn):
                        self.last_result = sweep(conn, self.settings, self.stop_event)
                except Exception:  # one failed sweep must not end the daemon
                    _LOGGER.exception("retention sweep failed")
                self._wake.wait(self.settings.retention.sweep_interval_s)
                self._wake.clear()
        finally:
            conn.close()
