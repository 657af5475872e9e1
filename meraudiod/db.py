"""SQLite: open with WAL and durable pragmas, migrate, and the queries the CLI and status use.

One connection per thread. Every multi-row write is one transaction (`with conn:`).
Segment times are seconds from the start of their recording; recording `start_s`/`end_s`
are seconds from the start of the source stream.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from .schema import MIGRATIONS

# A commit appends every page it changed to the write-ahead log, whole: a recording's save,
# claim and transcript touch about 17 pages (table and index leaves). With 1 KiB pages that is
# 17 KiB a recording instead of 68 KiB: measured with `meraudiod bench`, the database's writes
# per recorded hour fell from 78 MB to 43 MB (2 KiB pages: 48 MB). Rows are small; the few
# that are not (a long segment's word timings) spill into overflow pages.
PAGE_BYTES: Final = 1024
_CHECKPOINT_PAGES: Final = 4000
_BUSY_TIMEOUT_S: Final = 30.0  # how long a statement waits for another connection's lock
# A stage's connection (open_db with a stop event) waits for the write lock in slices this long,
# looking at its stop between them; once stopping, all its waits together last at most
# _STOPPING_LOCK_WAIT_S (SQLite's own wait cannot be interrupted: sqlite3_interrupt does not
# end it, measured). The unit's TimeoutStopSec=30 SIGKILLs a stop that takes longer.
_LOCK_SLICE_S: Final = 0.2
_STOPPING_LOCK_WAIT_S: Final = 3.0
# A checkpoint holds off every writer while it waits for other connections (db.checkpoint).
_CHECKPOINT_WAIT_S: Final = 2.0
_FULL_DISK_BYTES: Final = 1024 * 1024  # below this, a failed open is blamed on the disk

# RETURNING (jobs.claim) and ALTER TABLE ... DROP COLUMN (migration 5) need SQLite 3.35;
# Ubuntu 20.04 (JetPack 5) ships 3.31.
MIN_SQLITE: Final = (3, 35, 0)


class DatabaseError(Exception):
    """The database cannot be used as it is; the message names the file and what to do."""


class DamagedDatabaseError(DatabaseError):
    """The database is damaged, not a database, or from a newer meraudiod (or the SQLite is
    too old): no restart mends it, only a person restoring or moving the file."""


# SQLite's primary result codes for a file that is damaged or no database at all.
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26


def _damaged(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11 and later
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return any(words in str(exc) for words in ("malformed", "file is not a database"))


class DiskFullError(DatabaseError):
    """The database cannot be opened: its disk is full to the last byte."""


class LockedDatabaseError(DatabaseError):
    """Another process holds the database's write lock (an admin's sqlite3 shell left in a
    transaction, a backup, a purge): it goes away by itself, or when that process ends."""

    @classmethod
    def at(cls, path: Path) -> LockedDatabaseError:
        """The error for this database, saying what to do."""
        return cls(
            f"database {path} is locked by another process (a transaction left open: an"
            " sqlite3 shell, a backup, a purge): end that transaction or process"
        )


def check_sqlite_version(version: str = sqlite3.sqlite_version) -> None:
    """DatabaseError when the SQLite library is older than the features used need."""
    found = tuple(int(part) for part in version.split(".")[:3])
    if found < MIN_SQLITE:
        raise DamagedDatabaseError(
            f"SQLite {version} is too old: meraudiod needs {'.'.join(map(str, MIN_SQLITE))}"
            " or later (RETURNING, DROP COLUMN); use a Python built with a newer SQLite"
        )


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """DatabaseError when PRAGMA quick_check finds damage (checked once, at start-up)."""
    found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
    if found != ["ok"]:
        detail = "; ".join(" ".join(line.split()) for line in found)
        raise DamagedDatabaseError(
            f"database {path} is damaged (PRAGMA quick_check: {detail}): restore it from a"
            " backup, or move it away to start with an empty one"
        )


class StageConnection(sqlite3.Connection):
    """A stage thread's connection: a Transaction's wait for the write lock ends soon after
    `stop` is set (a stop must not wait out the busy timeout on another process's lock)."""

    stop: threading.Event | None = None
    stopping_until: float | None = None  # time.monotonic(): no lock wait lasts beyond it


def open_db(
    path: Path, alone_when_full: bool = False, stop: threading.Event | None = None
) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database; one connection per thread.

    `alone_when_full` is for the CLI's commands that record nothing (status, purge, delete).
    Opened while no other process has it open (a full disk stops the daemon), SQLite makes
    its shared-memory file, the log's index, which a disk full to the last byte refuses
    ("disk I/O error"). Then the database is opened again with that index in this process's
    memory (EXCLUSIVE locking mode): no other process can use it until this connection is
    closed.

    `stop` is a stage thread's stop event: once it is set, the connection's waits for the
    write lock end within _STOPPING_LOCK_WAIT_S (see StageConnection)."""
    try:
        conn = _open(path)
    except DiskFullError:
        if not alone_when_full:
            raise
        conn = _open(path, exclusive=True)
    if isinstance(conn, StageConnection):
        conn.stop = stop
    return conn


def _open(path: Path, exclusive: bool = False) -> sqlite3.Connection:
    check_sqlite_version()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            path,
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=True,
            factory=StageConnection,
        )
    except (OSError, sqlite3.Error) as exc:  # one line naming the file, not a traceback
        raise DatabaseError(f"cannot open database {path}: {exc}{_unwritable(path)}") from exc
    try:
        if exclusive:  # before the first read: no shared-memory file is ever made
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.row_factory = sqlite3.Row
        if int(conn.execute("PRAGMA page_count").fetchone()[0]) == 0:
            # A new database: small pages, since every commit appends each page it touched to
            # the log (see PAGE_BYTES). An existing one keeps its size (VACUUM changes it).
            conn.execute(f"PRAGMA page_size={PAGE_BYTES}")
        _use_wal(conn)
        # FULL: a commit survives a power cut, which is the promise for saved recordings; a
        # Transaction(durable=False) relaxes this for one commit that may be lost.
        conn.execute("PRAGMA synchronous=FULL")
        # In pages: a log of about 4 MB before it is copied into the database, as with 4 KiB
        # pages; a hot page (a table's last leaf) is copied once per checkpoint, so fewer
        # checkpoints write less: 400 recordings through save, claim and transcript wrote
        # 38.3 KiB of database per recording at SQLite's default of 1000, 35.5 at 4000.
        conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
        conn.execute("PRAGMA foreign_keys=ON")
        # Deleted text is overwritten, not left in free pages.
        conn.execute("PRAGMA secure_delete=ON")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise DamagedDatabaseError(
                f"database {path} has schema version {version}, newer than this meraudiod's"
                f" {len(MIGRATIONS)}: it was written by a newer meraudiod; upgrade meraudiod,"
                " or move the database away to start with an empty one"
            )
        _migrate_beside_others(conn, path, version)
    except sqlite3.Error as exc:
        conn.close()
        full = _full_disk(path)
        error = DiskFullError if full else DamagedDatabaseError if _damaged(exc) else DatabaseError
        why = full or ("" if error is DamagedDatabaseError else _unwritable(path))
        raise error(f"cannot open database {path}: {exc}{why}") from exc
    except DatabaseError:
        conn.close()
        raise
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    """Turn the database to WAL (a no-op once it is). Turning a new database takes its write
    lock from the read lock it holds, and SQLite does not wait for that lock (two waiting
    readers would deadlock): another process creating the database at the same moment (the
    daemon and an `analyze` started with it) makes it fail at once. So wait here, as long
    as the busy timeout."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _unwritable(path: Path) -> str:
    """Why SQLite could not open it, when this user cannot write its directory: SQLite keeps
    the log's index there (meraudiod.db-shm) to read too, so a command that only reads,
    run as another user than the daemon's (or on a card remounted read-only), said no
    more than `attempt to write a readonly database` or `unable to open database file`."""
    folder = path.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            return ""
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ""  # gone (said by SQLite itself), or full: not who may write there
        log = "SQLite keeps the database's log there, also to read it"
        if exc.errno == errno.EROFS:
            return f" ({folder} is on a read-only file system; {log})"
        from .checks import user_name  # here: checks imports the configuration

        return (
            f" ({folder} is not writable by user {user_name()}: {exc.strerror}; {log}: run this as"
            " the daemon's user, e.g. sudo -u meraudiod)"
        )


def _full_disk(path: Path) -> str:
    """Why SQLite could not open it, when its disk is full (it says "disk I/O error" when
    it cannot grow its shared-memory file)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    if free >= _FULL_DISK_BYTES:
        return ""
    return f" (its disk is full: {free // 1024} KB free in {path.parent})"


def _migrate_beside_others(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Migrate, another process's lock said at once (LockedDatabaseError: the migration would
    wait out the busy timeout in silence, then fail with "database is locked"; the daemon's
    start waits for it, saying so), unless that process is itself creating or migrating the
    database (the daemon and an `analyze` or `status` started with it): seconds on a loaded
    device, one commit per migration. That is waited for, as any writer is: a new database
    (version 0) until its first migration is committed, one half migrated while its version
    moves on."""
    while True:
        try:
            with lock_said_at_once(conn, path):
                migrate(conn)
            return
        except LockedDatabaseError:
            now = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if now == version == 0:
                migrate(conn)
                return
            if now == version:  # no migration going on: a transaction left open
                raise
            version = now


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this database has not seen; returns the schema version."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # A concurrent process may have migrated between our read and our lock.
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= number:
                conn.execute("ROLLBACK")
                continue
            for statement in _split_sql(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def _split_sql(script: str) -> list[str]:
    """Statements of a migration (triggers contain semicolons, so complete_statement decides)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s and s != ";"]


class Transaction:
    """`with Transaction(conn):` runs the block in BEGIN IMMEDIATE ... COMMIT (or ROLLBACK).

    A durable commit (the default) is on the card before COMMIT returns: it survives a power
    cut. `durable=False` is for what a power cut may undo but a crash of the process may not
    (a job's lease; a transcript, made again from its saved audio; the deletion of delivered
    events): the commit is in the log and seen by every connection at once, and reaches the
    card with the next durable commit, checkpoint or `sync_log`, without an fsync of its own
    (synchronous=NORMAL, for this commit only).
    """

    def __init__(self, conn: sqlite3.Connection, durable: bool = True) -> None:
        self.conn = conn
        self.durable = durable

    def __enter__(self) -> sqlite3.Connection:
        # Set every time (it costs no I/O): a durable commit is FULL whatever came before.
        self.conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
        try:
            _begin(self.conn)
        except BaseException:
            self._restore()
            raise
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self._restore()

    def _restore(self) -> None:
        """FULL again for whatever commits next outside a Transaction (the setting cannot
        change while a failed COMMIT left the transaction open: then the next
        Transaction sets it)."""
        if not self.durable and not self.conn.in_transaction:
            self.conn.execute("PRAGMA synchronous=FULL")


def _begin(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting for the write lock as long as the connection's busy timeout
    says; on a stage's connection in slices, so that once it is stopping the wait ends within
    _STOPPING_LOCK_WAIT_S (then SQLite's busy error, as after the busy timeout)."""

    def begin() -> bool:
        conn.execute("BEGIN IMMEDIATE")
        return True

    _in_slices(conn, begin)


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the log into the database and empty it (PRAGMA wal_checkpoint(TRUNCATE)). That
    waits for every other connection's transaction (a backup's read, an admin's shell
    holding the write lock), holding off every writer meanwhile (the listener's saves), so
    at most _CHECKPOINT_WAIT_S; on a stage's connection in slices, as BEGIN does (_begin).
    False when it could not finish: the log keeps those pages until the next checkpoint."""
    with waiting_at_most(conn, _CHECKPOINT_WAIT_S):
        return _in_slices(
            conn, lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        )


@contextmanager
def waiting_at_most(conn: sqlite3.Connection, wait_s: float) -> Iterator[float]:
    """In the block, SQLite's wait for another connection's lock (the busy timeout) is at
    most wait_s (a caller may have set less); yields the wait it had, in seconds, restored
    at the end."""
    (wait_ms,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute(f"PRAGMA busy_timeout={min(int(wait_ms), int(wait_s * 1000))}")
    try:
        yield int(wait_ms) / 1000
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(wait_ms)}")


def _in_slices(conn: sqlite3.Connection, attempt: Callable[[], bool]) -> bool:
    """`attempt()` until it is done (True), while another connection's lock keeps it from it
    (False, or SQLite's busy error), as long as the busy timeout says; on a stage's
    connection in slices of _LOCK_SLICE_S, looking at its stop between them: once stopping,
    all its waits together last at most _STOPPING_LOCK_WAIT_S. At the end, the last busy
    error is raised, or False returned."""
    stop = conn.stop if isinstance(conn, StageConnection) else None
    if stop is None:
        return attempt()
    assert isinstance(conn, StageConnection)
    with waiting_at_most(conn, _LOCK_SLICE_S) as wait_s:
        deadline = time.monotonic() + wait_s
        while True:
            busy: sqlite3.OperationalError | None = None
            try:
                if attempt():
                    return True
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                busy = exc
            t = time.monotonic()
            if stop.is_set():
                if conn.stopping_until is None:
                    conn.stopping_until = t + _STOPPING_LOCK_WAIT_S
                deadline = min(deadline, conn.stopping_until)
            if t >= deadline:
                if busy is not None:
                    raise busy
                return False


def database_file(conn: sqlite3.Connection) -> str:
    """The file of this connection's main database."""
    return str(next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"))


def sync_log(conn: sqlite3.Connection) -> None:
    """Put every commit made so far on the card, also those made without an fsync of their
    own (`Transaction(durable=False)`): fsync the write-ahead log, as a durable commit does."""
    try:
        fd = os.open(f"{database_file(conn)}-wal", os.O_RDONLY)
    except FileNotFoundError:
        return  # no log: every commit is in the database file, synced by the checkpoint
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> float:
    """Wall-clock time for stored timestamps."""
    return time.time()


def row_dict(row: sqlite3.Row) -> dict[str, Any]:
    """A row as a plain dict."""
    return {key: row[key] for key in row.keys()}  # noqa: SIM118 - Row has no __iter__ of keys


def get_kv(conn: sqlite3.Connection, key: str, default: str) -> str:
    """A small persistent value."""
    row = conn.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
    return str(row["value"]) if row else default


def database_id(conn: sqlite3.Connection) -> str:
    """The database's own random name (16 hex digits; a copy of the file has it too)."""
    return get_kv(conn, "database_id", "")


def put_kv(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Write a small value inside the caller's transaction."""
    conn.execute(
        "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=?",
        (key, value, value),
    )


def set_kv(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Persist a small value (its own transaction)."""
    with Transaction(conn):
        put_kv(conn, key, value)


_BUSY_ERRORS: Final = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_BUSY_SNAPSHOT"})
# How long a look for the write lock waits (lock_said_at_once).
_LOCK_PROBE_S: Final = 1.0


@contextmanager
def lock_said_at_once(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    """The block's writes wait for another process's write lock _LOCK_PROBE_S at most, then
    LockedDatabaseError naming the file: a migration, the start's recovery, say it at once
    (the start then waits, see daemon._open_store) rather than wait out the busy timeout in
    silence, then fail. The writes are the look: no lock taken after a look waits it out."""
    try:
        with waiting_at_most(conn, _LOCK_PROBE_S):
            yield
    except sqlite3.OperationalError as exc:
        if not is_busy(exc):
            raise
        raise LockedDatabaseError.at(path) from exc


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection held the write lock past the busy timeout: worth trying again.
    (The error name exists from Python 3.11; before it, the message says so.)"""
    name = getattr(exc, "sqlite_errorname", None)
    if name is not None:
        return name in _BUSY_ERRORS
    return "locked" in str(exc) or "busy" in str(exc)


# SQLite's primary result codes of a write the storage refused: no room, a file opened
# read-only (the file system already read-only when it was opened), or an I/O error (a write
# through a file opened before the kernel remounted the file system read-only).
_SQLITE_READONLY: Final = 8
_SQLITE_IOERR: Final = 10
_SQLITE_FULL: Final = 13
# Extended codes that are not a refused write: the database moved under the process
# (health.check_store stops the daemon), a read that failed.
_NOT_REFUSED_WRITES: Final = frozenset({1032, 266, 522})  # READONLY_DBMOVED, IOERR_(SHORT_)READ


def cannot_write(exc: BaseException) -> bool:
    """A write the storage refused, which waiting may mend (room made, the file system
    remounted read-write): ENOSPC, EDQUOT or EROFS; SQLite's SQLITE_FULL, SQLITE_READONLY
    or a write's SQLITE_IOERR. (The error code exists from Python 3.11; before it, the
    message says so.)"""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        words = ("disk is full", "readonly database", "disk I/O error")
        return any(said in str(exc) for said in words)
    if code in _NOT_REFUSED_WRITES:
        return False
    return code & 0xFF in (_SQLITE_FULL, _SQLITE_READONLY, _SQLITE_IOERR)


def refused_write(exc: BaseException) -> bool:
    """A write the storage refused that waiting or an admin may mend: cannot_write, or a
    directory this user may not write (EACCES, EPERM: today's audio directory made by root)."""
    return cannot_write(exc) or (
        isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM)
    )


def no_room(exc: BaseException) -> bool:
    """Of the writes refused (cannot_write), one for want of space."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "disk is full" in str(exc)
    return isinstance(code, int) and code & 0xFF == _SQLITE_FULL
