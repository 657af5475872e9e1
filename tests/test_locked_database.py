"""Another process holds SQLite's write lock on the daemon's database (an admin's `sqlite3`
shell left in a transaction, a backup, a long purge) while the daemon starts or stops: real
lock holders on the real file, real daemon processes, real signals."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from meraudiod import daemon as daemon_module
from meraudiod.config import Settings
from meraudiod.daemon import Daemon
from meraudiod.db import DamagedDatabaseError, DatabaseError, open_db
from meraudiod.sources import open_source

from .conftest import TEST_DATA, db_rows, run_daemon, wait_for

SHORT = TEST_DATA / "ls_103_0000.flac"  # one utterance: a quick real start-up of the daemon


class Output:
    """A daemon's stderr, read on a thread."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self._thread = threading.Thread(
            target=lambda: self.lines.extend(x.decode(errors="replace") for x in stream),
            name="stderr-reader",
            daemon=True,
        )
        self._thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def join(self) -> None:
        self._thread.join(10)


def _db(env: dict[str, str]) -> Path:
    return Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"


def test_a_start_while_another_process_holds_the_write_lock_waits_and_says_so(
    env: dict[str, str],
) -> None:
    """Before, the start waited out the 30 s busy timeout in silence, then exited 1 with
    `Error: OperationalError: database is locked` (no file named, nothing to do said). Now it
    says at once, in one line naming the file, that it waits, and goes on once the lock is
    gone."""
    db = _db(env)
    open_db(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # an admin's sqlite3 shell, left in a transaction
    proc = run_daemon(env, source=f"file:{SHORT}")
    out = Output(proc.stderr)
    try:
        said = f"database {db} is locked by another process"
        wait_for(lambda: said in out.text, 20, "the daemon to say it waits for the lock")
        time.sleep(3)  # it goes on waiting: two more looks at least
        assert proc.poll() is None, out.text
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert proc.wait(timeout=120) == 0, out.text
    out.join()
    assert out.text.count("locked by another process") == 1, out.text
    assert "Traceback" not in out.text
    assert len(db_rows(env, "SELECT id FROM recordings")) == 1


def test_a_lock_held_past_the_wait_ends_the_start_in_one_line_that_is_restarted(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held longer than the start waits (120 s; 2 s here), the start fails with one line
    naming the file and what to do, a DatabaseError: exit 1, which systemd restarts (a lock
    goes away by itself), not exit 78."""
    monkeypatch.setattr(daemon_module, "_STORE_WAIT_S", 2.0, raising=False)
    db = settings.storage.db_path
    open_db(db).close()
    settings.audio.source = f"file:{SHORT}"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    daemon = Daemon(settings, open_source(settings.audio.source, settings.audio), threading.Event())
    t0 = time.monotonic()
    try:
        with pytest.raises(DatabaseError) as raised:
            daemon.start()
    finally:
        daemon.stop()
        holder.close()
    assert time.monotonic() - t0 < 10
    assert not isinstance(raised.value, DamagedDatabaseError)
    assert str(raised.value).startswith(f"database {db} is locked by another process (")
    assert str(raised.value).endswith("waited 2 s")
