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
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Final

from .config import Settings
from .db import Transaction, put_kv
from .deletion import remove_file
from .jobs import pid_alive
from .recordings import (
    HELD_MARK,
    MemoryAudio,
    audio_file,
    audio_name,
    part_file,
    write_audio_atomically,
)

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
        row = conn.execute(
            "SELECT r.started_at, r.audio_path, r.status, EXISTS (SELECT 1 FROM jobs j WHERE"
            " j.recording_id = r.id AND j.state IN ('pending', 'running')) AS queued,"
            " EXISTS (SELECT 1 FROM kv WHERE kv.key = ?) AS marked"
            " FROM recordings r WHERE r.id=?",
            (HELD_MARK + rec_id, rec_id),
        ).fetchone()
        why = _not_kept(row, settings)
        if why is not None:
            conn.execute("DELETE FROM kv WHERE key=?", (HELD_MARK + rec_id,))
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
    if finished and row["status"] != "failed" and retention.keep_audio is False:
        return "retention.keep_audio = false"
    if (
        finished
        and retention.audio_days is not None
        and float(row["started_at"]) < time.time() - retention.audio_days * _DAY_S
    ):
        return "older than retention.audio_days"
    return None


def finish_held_writes(conn: sqlite3.Connection, audio_dir: Path) -> int:
    """At start-up: the writes of held audio whose process died half way. A whole file (the
    rename comes after its fsync) that its recording, still there, does not name yet is
    named; a temp file, or a file of a recording (or audio) deleted meanwhile, is removed.
    Returns how many were named."""
    named = 0
    rows = conn.execute(
        "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (_WRITING, _WRITING + "\uffff")
    ).fetchall()
    for row in rows:
        pid_text, _, stored = str(row["value"]).partition(" ")
        pid = int(pid_text)
        if pid != os.getpid() and pid_alive(pid):
            continue  # still being written
        rec_id = str(row["key"])[len(_WRITING) :]
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
            conn.execute("DELETE FROM kv WHERE key=?", (row["key"],))
    # The audio that stopped processes held is gone with them.
    for row in conn.execute(
        "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (HELD_MARK, HELD_MARK + "\uffff")
    ).fetchall():
        pid = int(row["value"])
        if pid == os.getpid() or not pid_alive(pid):
            with Transaction(conn):
                conn.execute("DELETE FROM kv WHERE key=?", (row["key"],))
    if named:
        _LOGGER.warning("named %d audio files written from memory by a stopped process", named)
    return named
