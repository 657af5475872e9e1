"""Recordings the database could not take when the daemon stopped (its disk full or
read-only, or another process holding its write lock): each is kept over the stop in the
runtime directory and saved at the next start (or by the listener of a microphone
reopened), as soon as the database takes it.

Each is one file, `<started_at in µs>-<n>.<database id>.npz` in runtime_dir()/unsaved (its
samples, the VAD's probabilities, its source and times), written whole or not at all (a temp
file, fsync, rename). The database id (db.database_id) keeps them for their own database: a
daemon of another data directory given the same runtime directory later neither takes them
nor purges them nor counts them (a file named without one, of an earlier version, is
anybody's). Saved at the next start, its recording's rows are committed with a kv mark naming
the file, and the file goes after that commit, then the mark: a kill between the two leaves
a file its mark says was saved, which the start after removes; none is saved twice. A purge
of a time range (purge_unsaved) removes the ones that started in it: they are recordings
still to be saved, and delete means delete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from .audio import SAMPLE_RATE_HZ, Float32Array, Int16Array
from .config_sections import StorageSettings
from .db import Transaction, database_id, put_kv
from .deletion import remove_file
from .held_audio import runtime_dir
from .recordings import TMP_SUFFIX, Recording, atomic_file
from .wording import counted

_LOGGER = logging.getLogger(__name__)
_FOLDER: Final = "unsaved"
# kv key of a kept recording saved again whose file is still to be removed: "<prefix><name>".
_SAVED: Final = "unsaved_saved:"


@dataclass(frozen=True)
class Unsaved:
    """An utterance the database has not taken yet."""

    samples: Int16Array
    start_s: float
    started_at: float
    probs: Float32Array  # the VAD's, for the Wyoming client
    source: str
    kept_in: Path | None = None  # its file, when it was kept over a stop

    @property
    def duration_s(self) -> float:
        return self.samples.size / SAMPLE_RATE_HZ


def unsaved_dir(storage: StorageSettings) -> Path | None:
    """Where unsaved recordings are kept over a stop; None: no runtime directory is set."""
    runtime = runtime_dir(storage)
    return runtime / _FOLDER if runtime is not None else None


def keep_unsaved(folder: Path, heard: Unsaved, owner: str) -> None:
    """Keep one recording in `folder` for the database `owner` names (one taken back from
    there is already); the folder refusing it raises OSError. Named by its time stamp in µs,
    then a number: utterances read from a pipe faster than real time share a stamp, and the
    names sort as they were heard."""
    if heard.kept_in is not None and heard.kept_in.is_file():
        return
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp, tail = f"{round(heard.started_at * 1e6):016d}", f".{owner}.npz" if owner else ".npz"
    number = 0
    while (path := folder / f"{stamp}-{number:03d}{tail}").exists():
        number += 1
    _write(path, heard)


def kept_for(name: str, owner: str) -> bool:
    """Is the file `name` a recording kept for the database `owner` names (or for anybody)?"""
    named_for = name.removesuffix(".npz").partition(".")[2]  # "" in an earlier version's
    return name.endswith(".npz") and named_for in ("", owner)


def _write(path: Path, heard: Unsaved) -> None:
    """The recording in `path`, whole or not at all."""
    meta = {"source": heard.source, "start_s": heard.start_s, "started_at": heard.started_at}
    with atomic_file(path) as handle:
        np.savez(handle, samples=heard.samples, probs=heard.probs, meta=json.dumps(meta))


def take_back_unsaved(conn: sqlite3.Connection, folder: Path) -> list[Unsaved]:
    """The recordings kept over the last stop for this database, oldest first, each still in
    its file until it is saved (forget_kept). A temp file (a kill while it was written) goes,
    and so does a file already saved (a kill after that commit) when the database can say
    so; another database's are left where they are."""
    if not folder.is_dir():
        return []
    for part in folder.glob("*" + TMP_SUFFIX):
        remove_file(part)
    owner = database_id(conn)
    files = sorted(folder.glob("*.npz"))
    mine = [path for path in files if kept_for(path.name, owner)]
    if len(mine) < len(files):
        _LOGGER.warning(
            "%s kept in %s for another database (another data directory's daemon"
            " used this runtime directory): left there for it",
            counted(len(files) - len(mine), "recording"),
            folder,
        )
    taken = []
    for path in mine:
        if conn.execute("SELECT 1 FROM kv WHERE key=?", (_SAVED + path.name,)).fetchone():
            with contextlib.suppress(OSError, sqlite3.Error):
                forget_kept(conn, path)
            continue
        try:
            taken.append(_read(path))
        except OSError as exc:  # left where it is, for the next start
            _LOGGER.error("cannot read %s: %s", path, exc)
        except (ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            _LOGGER.error("%s is no recording kept by meraudiod (%s): removed", path, exc)
            remove_file(path)
    if taken:
        _LOGGER.warning(
            "%s the database did not take taken back from %s (%.1f s): saved as"
            " soon as it takes them",
            counted(len(taken), "recording"),
            folder,
            sum(heard.duration_s for heard in taken),
        )
    return taken


def _read(path: Path) -> Unsaved:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        samples, probs = data["samples"], data["probs"]
    if samples.dtype != np.int16 or samples.ndim != 1 or probs.dtype != np.float32:
        raise ValueError("not a recording")
    return Unsaved(
        samples,
        float(meta["start_s"]),
        float(meta["started_at"]),
        probs,
        str(meta["source"]),
        kept_in=path,
    )


class Purged(Exception):
    """A kept recording was purged before the database took it."""


def marking_saved(path: Path) -> Callable[[sqlite3.Connection, Recording], None]:
    """What the transaction that saves the recording kept in `path` does too: it marks it
    saved, or rolls back (Purged) if a purge removed its file meanwhile."""

    def mark(conn: sqlite3.Connection, recording: Recording) -> None:
        if not path.is_file():
            raise Purged(path)
        put_kv(conn, _SAVED + path.name, recording.id)

    return mark


def forget_kept(conn: sqlite3.Connection, path: Path) -> None:
    """A kept recording is saved: its file goes, then its mark."""
    remove_file(path)
    with Transaction(conn):
        conn.execute("DELETE FROM kv WHERE key=?", (_SAVED + path.name,))


def purge_unsaved(
    conn: sqlite3.Connection,
    storage: StorageSettings,
    before: float | None,
    after: float | None,
    dry_run: bool,
) -> int:
    """Remove the recordings kept for this database that started in [after, before);
    returns how many."""
    folder = unsaved_dir(storage)
    if folder is None or not folder.is_dir() or (before is None and after is None):
        return 0
    owner = database_id(conn)
    found = 0
    for path in (path for path in folder.glob("*.npz") if kept_for(path.name, owner)):
        try:
            started_at = int(path.stem.split("-")[0]) / 1e6
        except ValueError:
            continue
        if (before is None or started_at < before) and (after is None or started_at >= after):
            found += 1 if dry_run else remove_file(path)
    return found
