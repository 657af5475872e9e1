"""Audio held in memory while the audio directory could not be written (full, or read-only),
written to its file once it can be, as any recording's audio is: nothing the owner keeps is
lost to a disk that filled for a while.

A write is announced in `kv` (committed before the file appears), written atomically (a temp
file, fsync, rename: write_audio_atomically), then named in the recording's row in the
commit that removes the announcement. Only audio whose mark (recordings.HELD_MARK, committed
with the recording's row) is still there is written: a recording deleted meanwhile, or only
its audio (purge --audio-only), gets no file (one written is removed before that commit).
A process killed at any moment leaves no file a row names that is not whole: the next start
(finish_held_writes) names a whole file that its recording still lacks, and removes any
other.

Audio still held when the daemon stops is kept over the stop in the runtime directory (a tmpfs,
another file system than the full one: spill_held), the same way: announced in `kv`
(recordings.SPILLED), written atomically, kept only if its mark is still there, and taken back
into memory at the next start (take_back_spilled). Deleting the recording, or its audio,
removes that file too (recordings.forget_held).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Final

import soundfile

from .config import Settings
from .config_sections import StorageSettings
from .db import Transaction, open_db, put_kv
from .deletion import remove_file
from .jobs import pid_alive
from .recordings import (
    HELD_MARK,
    SPILLED,
    MemoryAudio,
    audio_file,
    audio_name,
    forget_held,
    part_file,
    write_audio_atomically,
)
from .wording import counted

_LOGGER = logging.getLogger(__name__)
# kv key of a write under way: value "<pid> <audio path relative to the audio directory>".
_WRITING: Final = "held_audio_write:"
_DAY_S: Final = 86400.0


def write_held(
    conn: sqlite3.Connection, settings: Settings, memory: MemoryAudio, rec_id: str
) -> bool:
    """Write one recording's held audio to its file and name it in its row; True if written.
    Audio that is not to be kept (its recording deleted, already written, keep_audio = false
    and transcribed, older than audio_days) is dropped from memory instead. The storage
    refusing it (OSError, sqlite3.OperationalError) is raised, and the audio stays held."""
    samples = memory.get(rec_id)
    if samples is None:
        return False
    key = _WRITING + rec_id
    with Transaction(conn):
        row = conn.execute(_HELD_ROW, (HELD_MARK + rec_id, rec_id)).fetchone()
        why = _not_kept(row, settings)
        if why is not None:
            forget_held(conn, rec_id)
        else:
            stored = audio_name(rec_id, float(row["started_at"]), settings.recorder.audio_format)
            put_kv(conn, key, f"{os.getpid()} {stored}")
    if why is not None:
        memory.pop(rec_id)
        _LOGGER.info("recording %s: its audio held in memory is not written (%s)", rec_id, why)
        return False
    path = audio_file(settings.storage.audio_dir, stored)
    named = committed = False
    try:
        write_audio_atomically(path, samples, settings.recorder.audio_format)
        with Transaction(conn):
            # Its mark gone meanwhile: the recording, or its audio, deleted (purge
            # --audio-only) by another process.
            named = (
                conn.execute(
                    "UPDATE recordings SET audio_path=? WHERE id=? AND audio_path IS NULL"
                    " AND EXISTS (SELECT 1 FROM kv WHERE kv.key = ?)",
                    (stored, rec_id, HELD_MARK + rec_id),
                ).rowcount
                == 1
            )
            if not named:  # deleted meanwhile (by another process): delete means delete
                remove_file(path)
            conn.execute("DELETE FROM kv WHERE key IN (?, ?)", (key, HELD_MARK + rec_id))
        committed = True
    except BaseException:
        if not committed:  # no row names it: it goes (if it cannot, the next start sees to it)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        with contextlib.suppress(sqlite3.Error), Transaction(conn):
            conn.execute("DELETE FROM kv WHERE key=?", (key,))
        raise
    memory.pop(rec_id)
    if named:
        _LOGGER.info("recording %s: its audio held in memory written to %s", rec_id, path)
    return named


# What decides whether a recording's held audio is kept: `transcribed` (a job done), not only
# finished, as a recording never to be transcribed (asr.enabled = false) is finished when saved
# and keep_audio = false deletes audio once transcribed, never audio that never will be.
_HELD_ROW: Final = (
    "SELECT r.started_at, r.audio_path, r.status, EXISTS (SELECT 1 FROM jobs j WHERE"
    " j.recording_id = r.id AND j.state IN ('pending', 'running')) AS queued,"
    " EXISTS (SELECT 1 FROM jobs j WHERE j.recording_id = r.id AND j.state = 'done')"
    " AS transcribed, EXISTS (SELECT 1 FROM kv WHERE kv.key = ?) AS marked"
    " FROM recordings r WHERE r.id=?"
)


def _not_kept(row: sqlite3.Row | None, settings: Settings) -> str | None:
    """Why a recording's held audio is not to be written (None: it is)."""
    if row is None:
        return "the recording was deleted"
    if row["audio_path"] is not None:
        return "already written"
    if not row["marked"]:
        return "its audio was deleted"
    finished = row["status"] != "pending" and not row["queued"]
    retention = settings.retention
    if finished and row["transcribed"] and row["status"] != "failed" and not retention.keep_audio:
        return "retention.keep_audio = false"
    if (
        finished
        and retention.audio_days is not None
        and float(row["started_at"]) < time.time() - retention.audio_days * _DAY_S
    ):
        return "older than retention.audio_days"
    return None


def _left_by_the_stopped(conn: sqlite3.Connection, prefix: str) -> list[tuple[str, int, str]]:
    """The writes announced under `prefix` (kv rows `prefix + recording id` = "PID path")
    whose process has gone, or is this one: (recording id, pid, path). Another live
    process's are still being written."""
    rows = conn.execute(
        "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
    ).fetchall()
    left = []
    for row in rows:
        pid_text, _, path = str(row["value"]).partition(" ")
        pid = int(pid_text)
        if pid == os.getpid() or not pid_alive(pid):
            left.append((str(row["key"])[len(prefix) :], pid, path))
    return left


def finish_held_writes(conn: sqlite3.Connection, audio_dir: Path) -> int:
    """At start-up: the writes of held audio whose process died half way. A whole file (the
    rename comes after its fsync) that its recording, still there, does not name yet is
    named; a temp file, or a file of a recording (or audio) deleted meanwhile, is removed.
    Returns how many were named."""
    named = 0
    for rec_id, pid, stored in _left_by_the_stopped(conn, _WRITING):
        path = audio_file(audio_dir, stored)
        with Transaction(conn):
            part_file(path, pid).unlink(missing_ok=True)
            found = conn.execute(
                "SELECT audio_path, EXISTS (SELECT 1 FROM kv WHERE kv.key = ?) AS marked"
                " FROM recordings WHERE id=?",
                (HELD_MARK + rec_id, rec_id),
            ).fetchone()
            if (
                found is not None
                and found["audio_path"] is None
                and found["marked"]  # not deleted by purge --audio-only since
                and path.is_file()
            ):
                conn.execute("UPDATE recordings SET audio_path=? WHERE id=?", (stored, rec_id))
                named += 1
            elif found is None or found["audio_path"] != stored:
                remove_file(path)
            conn.execute("DELETE FROM kv WHERE key=?", (_WRITING + rec_id,))
    # The audio that stopped processes held is gone with them, but for what one kept in the
    # runtime directory over its stop, not yet taken back (take_back_spilled).
    for row in conn.execute(
        "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (HELD_MARK, HELD_MARK + "\uffff")
    ).fetchall():
        pid = int(row["value"])
        if pid == os.getpid() or not pid_alive(pid):
            with Transaction(conn):
                conn.execute(
                    "DELETE FROM kv WHERE key=? AND NOT EXISTS (SELECT 1 FROM kv s"
                    " WHERE s.key = ? || substr(?, ?))",
                    (row["key"], SPILLED, row["key"], len(HELD_MARK) + 1),
                )
    if named:
        _LOGGER.warning("named %d audio files written from memory by a stopped process", named)
    return named


def runtime_dir(storage: StorageSettings) -> Path | None:
    """Where what a stop must not lose is kept until the next start: `storage.run_dir` (the
    unit's /run/meraudiod as installed), else the RuntimeDirectory ($RUNTIME_DIRECTORY), else
    $XDG_RUNTIME_DIR/meraudiod/<data directory's key>; each a tmpfs, another file system than
    the full or read-only one. None: none is set.

    The user's $XDG_RUNTIME_DIR is shared by every daemon that user runs (two rooms, two
    data directories): each keeps its own there, under a key of its data directory."""
    if storage.run_dir is not None:
        return storage.run_dir
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime and Path(runtime).is_absolute():
        return Path(runtime)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and Path(xdg).is_absolute():
        data_dir = str(storage.data_dir.resolve()).encode()
        return Path(xdg) / "meraudiod" / hashlib.sha256(data_dir).hexdigest()[:16]
    return None


def spill_dir(storage: StorageSettings) -> Path | None:
    """Where audio still held at a stop is kept until the next start (runtime_dir)."""
    runtime = runtime_dir(storage)
    return runtime / "held-audio" if runtime is not None else None


def keep_held_on_stop(settings: Settings, memory: MemoryAudio) -> None:
    """The daemon stops with audio held: each recording's is kept in spill_dir() until the
    next start (what is not to be kept is dropped); what cannot be (no runtime directory,
    it too cannot be written, the database cannot take the announcement) is lost, said in
    one line."""
    folder = spill_dir(settings.storage)
    kept = 0
    why = ""
    if folder is not None:
        try:
            conn = open_db(settings.storage.db_path)
            try:
                for rec_id in memory.ids():
                    kept += spill_held(conn, settings, memory, rec_id, folder)
            finally:
                conn.close()
        except OSError as exc:
            why = f", nor {folder} ({exc.strerror})"
        except sqlite3.Error as exc:
            why = f", nor the database ({exc})"
    if kept:
        _LOGGER.warning(
            "audio of %s held in memory kept in %s until the next start: the"
            " audio directory could not be written",
            counted(kept, "recording"),
            folder,
        )
    if len(memory):  # nowhere else to keep it
        _LOGGER.warning(
            "audio of %s held in memory lost on stopping: the audio directory"
            " could not be written%s",
            counted(len(memory), "recording"),
            why,
        )


def spill_held(
    conn: sqlite3.Connection,
    settings: Settings,
    memory: MemoryAudio,
    rec_id: str,
    folder: Path,
) -> bool:
    """Keep one recording's held audio in `folder` over a stop; True if kept. Announced in
    kv before the file appears (a kill leaves nothing the next start does not find), kept
    only if its mark is still there once the file is whole (a delete meanwhile, by another
    process: the file goes). The folder refusing it (OSError) is raised, the audio still
    held."""
    samples = memory.get(rec_id)
    if samples is None:
        return False
    path = folder / f"{rec_id}.{settings.recorder.audio_format}"
    with Transaction(conn):
        why = _not_kept(conn.execute(_HELD_ROW, (HELD_MARK + rec_id, rec_id)).fetchone(), settings)
        if why is not None:
            forget_held(conn, rec_id)
        else:
            put_kv(conn, SPILLED + rec_id, f"{os.getpid()} {path}")
    if why is not None:
        memory.pop(rec_id)
        _LOGGER.info("recording %s: its audio held in memory is not kept (%s)", rec_id, why)
        return False
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_audio_atomically(path, samples, settings.recorder.audio_format)
        with Transaction(conn):
            # Its mark gone meanwhile (the recording, or its audio, deleted by another
            # process or thread, whose forget_held found no file yet): the file goes.
            row = conn.execute(_HELD_ROW, (HELD_MARK + rec_id, rec_id)).fetchone()
            kept = row is not None and row["marked"] and row["audio_path"] is None
            if not kept:
                remove_file(path)
                conn.execute("DELETE FROM kv WHERE key=?", (SPILLED + rec_id,))
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        with contextlib.suppress(sqlite3.Error), Transaction(conn):
            conn.execute("DELETE FROM kv WHERE key=?", (SPILLED + rec_id,))
        raise
    memory.pop(rec_id)
    return bool(kept)


def take_back_spilled(conn: sqlite3.Connection, settings: Settings, memory: MemoryAudio) -> int:
    """At start-up (after finish_held_writes, which leaves the marks of what was kept): the
    audio a stopped daemon kept in the runtime directory goes back into memory, to be written
    to its file once the audio directory can take it, and its file goes. A temp file, a file
    of a recording (or audio) deleted meanwhile, is removed; one that is gone (the runtime
    directory emptied by a reboot, or a kill before it was whole) is said. Returns how many
    were taken back."""
    taken = lost = 0
    for rec_id, pid, spilled in _left_by_the_stopped(conn, SPILLED):
        path = Path(spilled)
        if rec_id in memory.ids():
            continue  # taken back by a recovery cut short, run again
        with contextlib.suppress(OSError):
            part_file(path, pid).unlink(missing_ok=True)
        found = conn.execute(_HELD_ROW, (HELD_MARK + rec_id, rec_id)).fetchone()
        samples = None
        if found is not None and found["marked"] and found["audio_path"] is None:
            try:
                samples, _ = soundfile.read(path, dtype="int16")
            except (OSError, soundfile.LibsndfileError):
                lost += 1
        finished = found is not None and found["status"] != "pending" and not found["queued"]
        if samples is not None:
            if memory.room() != (True, None):
                continue  # no free room: it stays where it is, safe, for the next start
            memory.put(rec_id, samples, finished=finished)
        try:
            with Transaction(conn):
                # The file first: one that cannot be removed keeps its announcement, and a
                # later start (or a delete) tries again.
                remove_file(path)
                if samples is not None:
                    put_kv(conn, HELD_MARK + rec_id, str(os.getpid()))
                    taken += 1
                else:
                    conn.execute("DELETE FROM kv WHERE key=?", (HELD_MARK + rec_id,))
                conn.execute("DELETE FROM kv WHERE key=?", (SPILLED + rec_id,))
        except OSError as exc:
            memory.pop(rec_id)
            _LOGGER.error("recording %s: cannot remove %s: %s", rec_id, path, exc)
    if taken:
        _LOGGER.warning(
            "audio of %s kept over the last stop taken back", counted(taken, "recording")
        )
    if lost:
        _LOGGER.warning(
            "audio of %s kept over the last stop is gone (the runtime directory"
            " emptied by a reboot, or the stop killed before it was whole)",
            counted(lost, "recording"),
        )
    return taken
