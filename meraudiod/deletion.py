"""Deleting recordings: their rows (text, index rows, jobs, undelivered events, the voice
embeddings taken from them) and their audio, leaving nothing behind.

A batch's rows are forgotten before their audio files go and committed once the files are
gone: a delete killed half way, or stopped by a file it may not delete, leaves no audio file
whose recording is gone, and run again it finishes. Deleted text is then made unrecoverable
from the database file (secure_delete, the full-text index merged, the log checkpointed); a
mark committed with the rows says when that is still to do (a kill between the two, or a
checkpoint another connection kept from finishing), and the next delete, retention sweep or
start of the daemon does it."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from .db import Transaction, checkpoint, database_file, put_kv
from .recordings import audio_file, forget_held, normalise_id

_LOGGER = logging.getLogger(__name__)

DELETE_BATCH: Final = 100  # recordings per delete transaction: the write lock is held briefly
_Item = TypeVar("_Item")
# In kv while deleted words may still be in the full-text index or the database file's old
# pages (see forget_deleted_text).
_UNFORGOTTEN_KEY: Final = "deleted_text_unforgotten"


@dataclass(frozen=True)
class Deleted:
    """What a delete removed: recordings that existed, audio files that were there."""

    recordings: int = 0
    audio_files: int = 0
    ids: tuple[str, ...] = ()  # of the recordings that existed


def delete_recordings(
    conn: sqlite3.Connection,
    audio_dir: Path,
    rec_ids: list[str],
    stop: threading.Event | None = None,
) -> Deleted:
    """Delete recordings with their audio, text, index rows, jobs, undelivered events and
    the voice embeddings taken from them.

    In transactions of DELETE_BATCH recordings, so a listener waiting to save speech never
    waits long for the write lock; the full-text index is optimised and the log
    checkpointed once at the end, also when an earlier delete was killed before that (the
    same delete run again deletes no row). Each batch's audio goes first (see
    remove_audio_first). Once `stop` is set no further batch starts: what is left stays
    whole, rows and files, for the next time.
    """
    files = 0
    found: list[str] = []
    wanted = list(dict.fromkeys(normalise_id(r) for r in rec_ids))
    try:
        for batch in batches(wanted, stop):
            rows = conn.execute(
                f"SELECT id, audio_path FROM recordings WHERE id IN ({','.join('?' * len(batch))})",
                batch,
            ).fetchall()
            found += [str(row["id"]) for row in rows]
            files += remove_audio_first(conn, audio_dir, rows, forget_recording)
    finally:
        if found:
            forget_deleted_text(conn)
        else:
            finish_forgetting(conn)
    return Deleted(len(found), files, tuple(found))


def batches(items: Sequence[_Item], stop: threading.Event | None) -> Iterator[Sequence[_Item]]:
    """`items` DELETE_BATCH at a time, one transaction each; none more once `stop` is set."""
    for first in range(0, len(items), DELETE_BATCH):
        if stop is not None and stop.is_set():
            return
        yield items[first : first + DELETE_BATCH]


def forget_recording(conn: sqlite3.Connection, rec_id: str) -> None:
    """A recording's rows (inside the caller's transaction): text, index rows, jobs,
    undelivered events and the embeddings taken from it. Marks its text as still to be
    forgotten (forget_deleted_text), in the same commit."""
    mark_unforgotten(conn)
    conn.execute("DELETE FROM outbox WHERE recording_id=?", (rec_id,))
    conn.execute("DELETE FROM speaker_embeddings WHERE recording_id=?", (rec_id,))
    conn.execute("DELETE FROM recordings WHERE id=?", (rec_id,))
    forget_held(conn, rec_id)  # held audio: never written


def remove_audio_first(
    conn: sqlite3.Connection,
    audio_dir: Path,
    rows: Sequence[sqlite3.Row],
    forget: Callable[[sqlite3.Connection, str], None],
    durable: bool = True,
) -> int:
    """Delete the audio files of `rows` (`id`, `audio_path`) and `forget` each row, in one
    transaction (`durable`: see Transaction) committed once every file is gone; returns how
    many files were there.

    Each row is forgotten before its file goes (a database that cannot be written stops it
    before any file does), and the commit comes after the files: a process killed half way,
    or a file that cannot be deleted (OSError, raised), leaves rows whose audio is gone,
    which the same delete run again finishes, never an audio file whose row is gone, which
    nothing would ever find again.
    """
    with Transaction(conn, durable=durable):
        return sum(forget_with_audio(conn, audio_dir, row, forget) for row in rows)


def forget_with_audio(
    conn: sqlite3.Connection,
    audio_dir: Path,
    row: sqlite3.Row,
    forget: Callable[[sqlite3.Connection, str], None],
) -> int:
    """`forget` the row, then delete its audio file (inside the caller's transaction, which
    must commit only after this: see remove_audio_first); 1 if the file was there. The audio
    path is read again here, under the write lock: audio held in memory may have been written
    and named since `row` was read (held_audio.py)."""
    rec_id = str(row["id"])
    current = conn.execute("SELECT audio_path FROM recordings WHERE id=?", (rec_id,)).fetchone()
    stored = current["audio_path"] if current is not None else row["audio_path"]
    forget(conn, rec_id)
    return remove_file(audio_file(audio_dir, stored)) if stored else 0


def delete_recording(conn: sqlite3.Connection, audio_dir: Path, rec_id: str) -> bool:
    """Delete one recording (see delete_recordings). True if it existed."""
    return delete_recordings(conn, audio_dir, [rec_id]).recordings == 1


def remove_file(path: Path) -> bool:
    """Delete a file; True if it was there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def mark_unforgotten(conn: sqlite3.Connection) -> None:
    """Inside a delete's transaction: what it deletes is still in the database files until
    forget_deleted_text has run (done at the next sweep or start if the process dies first)."""
    put_kv(conn, _UNFORGOTTEN_KEY, "1")


def forget_deleted_text(conn: sqlite3.Connection) -> None:
    """Make deleted text unrecoverable from the database file.

    secure_delete zeroes freed pages, but the full-text index keeps deleted words in its
    segments until they are merged, and the database file keeps the old pages until the log
    is checkpointed. The mark forget_recording set goes once both are done; a checkpoint
    that another connection kept from finishing (a backup's long read) leaves it, for the
    next retention sweep or start (finish_forgetting).
    """
    with Transaction(conn):
        conn.execute("INSERT INTO segments_fts(segments_fts) VALUES ('optimize')")
    if checkpoint(conn):  # on a stage's connection, ended soon after its stop
        with Transaction(conn):
            conn.execute("DELETE FROM kv WHERE key=?", (_UNFORGOTTEN_KEY,))
    else:
        _LOGGER.warning(
            "deleted text stays in %s until its log can be checkpointed (another connection"
            " reads or writes it: a backup?): tried again at the next retention sweep or start",
            database_file(conn),
        )


def finish_forgetting(conn: sqlite3.Connection) -> bool:
    """forget_deleted_text if a delete committed its rows and was killed before it; True if
    it had to."""
    if conn.execute("SELECT 1 FROM kv WHERE key=?", (_UNFORGOTTEN_KEY,)).fetchone() is None:
        return False
    forget_deleted_text(conn)
    return True
