"""Recordings, jobs and the database, on real SQLite files and real audio files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from meraudiod import jobs
from meraudiod.audio import decode_file
from meraudiod.config import Settings
from meraudiod.db import (
    PAGE_BYTES,
    DatabaseError,
    Transaction,
    _split_sql,
    database_id,
    get_kv,
    migrate,
    open_db,
    set_kv,
)
from meraudiod.deletion import delete_recording
from meraudiod.messages import TranscriptEvent, enqueue, unpack_payload
from meraudiod.recording_views import recording_details
from meraudiod.recordings import RecordingStore, remove_crashed_writes
from meraudiod.schema import MIGRATIONS

from .conftest import TEST_DATA

SPEECH = decode_file(TEST_DATA / "librivox_0880.wav")


def store(settings: Settings) -> RecordingStore:
    conn = open_db(settings.storage.db_path)
    return RecordingStore(conn, settings.storage.audio_dir, "flac")


def test_database_is_wal_and_migrated(settings: Settings, tmp_path: Path) -> None:
    conn = open_db(settings.storage.db_path)
    latest = migrate(conn)  # the number of migrations the code has
    assert latest >= 5
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
    set_kv(conn, "kept", "yes")
    again = open_db(settings.storage.db_path)  # a second open migrates nothing twice
    assert again.execute("PRAGMA user_version").fetchone()[0] == latest
    assert get_kv(again, "kept", "lost") == "yes"

    # A database made by the first release is brought up to date, its rows kept.
    old = sqlite3.connect(tmp_path / "v1.db", isolation_level=None)
    old.executescript(MIGRATIONS[0] + "\nPRAGMA user_version=1;")
    old.execute(
        "INSERT INTO recordings (id, source, started_at, ended_at, start_s, end_s, duration_s,"
        " rms_dbfs, closed_at) VALUES ('01JD2X9K8M7Q6R5S4T3V2W1X0Y', 'mic', 1, 2, 0, 1, 1, -20, 2)"
    )
    old.close()
    upgraded = open_db(tmp_path / "v1.db")
    assert upgraded.execute("PRAGMA user_version").fetchone()[0] == latest
    assert upgraded.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 1
    (key,) = upgraded.execute("SELECT key FROM kv").fetchall()  # a later table
    assert key[0] == "database_id" and len(database_id(upgraded)) == 16  # made by a migration
    assert database_id(upgraded) != database_id(conn)  # each database its own


def test_processes_creating_the_database_at_one_moment_all_open_it(tmp_path: Path) -> None:
    """The daemon and an `analyze` started with it both create the database: turning a new
    database to WAL takes its write lock from a read lock, which SQLite does not wait for,
    so one of them failed with "database is locked" (found by CI, 1 run in about 20).
    Connections in threads contend for SQLite's file locks as processes do, and start faster."""
    openers, failed = 6, []
    for attempt in range(200):
        path = tmp_path / str(attempt) / "meraudiod.db"
        together = threading.Barrier(openers)

        def open_it(path: Path = path, together: threading.Barrier = together) -> None:
            together.wait()
            try:
                open_db(path).close()
            except DatabaseError as exc:
                failed.append(str(exc))

        threads = [threading.Thread(target=open_it) for _ in range(openers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failed == []
    conn = open_db(tmp_path / "0" / "meraudiod.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_BYTES


def test_a_database_another_process_is_still_creating_is_waited_for(tmp_path: Path) -> None:
    """Another process creating the same database (the daemon, an `analyze` started with it)
    holds its write lock for as long as its migration takes: seconds on a loaded device.
    Before, the lock was looked for 1 s at most and the second process failed with "locked
    by another process (a transaction left open ...)" (the test above, 3 of 1,200 openings
    under a load of 10). A database being created is waited for, as any writer is."""
    path = tmp_path / "meraudiod.db"
    creator = sqlite3.connect(path, isolation_level=None)
    creator.execute("PRAGMA journal_mode=WAL")
    creator.execute("BEGIN IMMEDIATE")  # its migration, slowed down: schema version still 0
    versions: list[int] = []

    def open_it() -> None:
        with contextlib.closing(open_db(path)) as conn:
            versions.append(conn.execute("PRAGMA user_version").fetchone()[0])

    opener = threading.Thread(target=open_it)
    opener.start()
    time.sleep(2.0)
    assert opener.is_alive() and not versions  # still waiting, not failed
    creator.execute("COMMIT")
    creator.close()
    opener.join(timeout=30)
    assert versions == [len(MIGRATIONS)]


def test_a_database_another_process_is_migrating_step_by_step_is_waited_for(
    tmp_path: Path,
) -> None:
    """Found by `status` run as the daemon first started, under load: the daemon had
    committed some of its migrations and held the lock for the next, one after another,
    longer than the 1 s look; the version read was no longer 0, so `status` failed with
    "locked by another process (a transaction left open ...)". A database whose version
    moves on while its lock is looked for is being migrated, and is waited for."""
    path = tmp_path / "meraudiod.db"
    migrator = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    migrator.execute("PRAGMA journal_mode=WAL")
    migrator.execute("BEGIN IMMEDIATE")
    for statement in _split_sql(MIGRATIONS[0]):
        migrator.execute(statement)
    migrator.execute("PRAGMA user_version=1")
    migrator.execute("COMMIT")
    step_s = 0.4  # each migration holds the lock this long: all of them 3.2 s, over the look

    under_way = threading.Event()

    def migrate_slowly() -> None:  # as db.migrate does, each step slowly
        for number, script in enumerate(MIGRATIONS[1:], start=2):
            migrator.execute("BEGIN IMMEDIATE")
            under_way.set()
            # open_db may take the lock between two steps (this thread not run on a loaded
            # machine) and do the rest itself, as a second daemon would: fine, not twice.
            if migrator.execute("PRAGMA user_version").fetchone()[0] >= number:
                migrator.execute("ROLLBACK")
                continue
            for statement in _split_sql(script):
                migrator.execute(statement)
            migrator.execute(f"PRAGMA user_version={number}")
            time.sleep(step_s)
            migrator.execute("COMMIT")

    steps = threading.Thread(target=migrate_slowly)
    steps.start()
    try:
        assert under_way.wait(10)  # the second migration holds the lock: open_db cannot do it
        with contextlib.closing(open_db(path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        steps.join(timeout=30)
        migrator.close()


def test_a_recordings_details_give_its_times_to_the_ms(settings: Settings) -> None:
    """A recording 951 frames into its stream: `recordings show --json` said `"start_s":
    30.432000000000002` (the frame count times 0.032 s, as stored); `recordings list` gave
    30.432. Now both do, and its segments' times too."""
    s = store(settings)
    rec = s.save(SPEECH, source="file:x", start_s=951 * 0.032, started_at=1000.0)
    s.conn.execute(
        "INSERT INTO segments (recording_id, idx, start_s, end_s, text) VALUES (?, 0, ?, ?, 'a')",
        (rec.id, 3 * 0.1, 7 * 0.1),
    )
    shown = recording_details(s.conn, settings.storage.audio_dir, rec.id)
    assert shown is not None
    assert (shown["start_s"], shown["duration_s"]) == (30.432, round(SPEECH.size / 16000, 3))
    assert [(x["start_s"], x["end_s"]) for x in shown["segments"]] == [(0.3, 0.7)]


def test_save_writes_audio_and_rows_together(settings: Settings) -> None:
    s = store(settings)
    rec = s.save(SPEECH, source="file:x", start_s=12.5, started_at=1000.0)
    audio, rate = soundfile.read(rec.audio_path, dtype="int16")
    assert rate == 16000 and np.array_equal(audio, SPEECH)
    row = s.conn.execute("SELECT * FROM recordings WHERE id=?", (rec.id,)).fetchone()
    assert row["start_s"] == 12.5 and abs(row["end_s"] - (12.5 + SPEECH.size / 16000)) < 1e-9
    assert row["status"] == "pending" and row["rms_dbfs"] < -10
    assert jobs.counts(s.conn)["pending"] == 1
    assert not list(settings.storage.audio_dir.rglob("*.part"))


def test_claim_complete_in_order(settings: Settings) -> None:
    s = store(settings)
    ids = [s.save(SPEECH, source="x", start_s=i, started_at=1000.0 + i).id for i in range(3)]
    claimed = []
    while (job := jobs.claim(s.conn, lease_s=60)) is not None:
        claimed.append(job.recording_id)
        with Transaction(s.conn):
            jobs.complete(s.conn, job.id)
    assert claimed == ids
    assert jobs.counts(s.conn) == {"pending": 0, "running": 0, "done": 3, "failed": 0}


def test_fail_retries_then_gives_up(settings: Settings) -> None:
    s = store(settings)
    s.save(SPEECH, source="x", start_s=0, started_at=1000.0)
    for attempt in range(1, 4):
        job = jobs.claim(s.conn, lease_s=60)
        assert job is not None and job.attempts == attempt
        with Transaction(s.conn):
            final = jobs.fail(s.conn, job.id, f"boom {attempt}", max_attempts=3, retry_delay_s=0)
        assert final is (attempt == 3)
    assert jobs.claim(s.conn, lease_s=60) is None
    (failed,) = jobs.backlog(s.conn)
    assert failed["state"] == "failed" and failed["error"] == "boom 3"
    assert jobs.retry_failed(s.conn) == jobs.Retried(requeued=1, skipped={})
    assert jobs.claim(s.conn, lease_s=60) is not None


def test_a_failed_job_waits_before_its_retry_and_the_rest_go_on(settings: Settings) -> None:
    s = store(settings)
    first, second = (s.save(SPEECH, source="x", start_s=i, started_at=1000.0).id for i in range(2))
    job = jobs.claim(s.conn, lease_s=60)
    assert job is not None and job.recording_id == first
    before = time.time()
    with Transaction(s.conn):
        assert jobs.fail(s.conn, job.id, "boom", max_attempts=3, retry_delay_s=30) is False
    (waiting, _) = jobs.backlog(s.conn)
    assert waiting["state"] == "pending" and 30 <= waiting["not_before"] - before < 31
    nxt = jobs.claim(s.conn, lease_s=60)  # the first waits; the second is not held up
    assert nxt is not None and nxt.recording_id == second
    assert jobs.claim(s.conn, lease_s=60) is None
    assert jobs.retry_now(s.conn) == 1
    again = jobs.claim(s.conn, lease_s=60)
    assert again is not None and again.recording_id == first and again.attempts == 2
    with Transaction(s.conn):  # the delay doubles with each attempt
        jobs.fail(s.conn, again.id, "boom", max_attempts=3, retry_delay_s=30)
    (waiting, _) = jobs.backlog(s.conn)
    assert 60 <= waiting["not_before"] - before < 62


def test_a_retry_waits_no_longer_after_the_clock_was_set_back(settings: Settings) -> None:
    """A job failed while the clock was 10 years ahead (a bad RTC), then NTP set it back:
    its retry time is 10 years away. Before: it waited that long (found by a reviewer)."""
    s = store(settings)
    rec_id = s.save(SPEECH, source="x", start_s=0, started_at=1000.0).id
    job = jobs.claim(s.conn, lease_s=60)
    assert job is not None
    with Transaction(s.conn):
        jobs.fail(s.conn, job.id, "boom", max_attempts=3, retry_delay_s=3600)
    assert jobs.claim(s.conn, lease_s=60) is None  # an hour's wait, as told
    ten_years_s = 10 * 365 * 86400  # what the clock said then: all its times that far ahead
    s.conn.execute(
        "UPDATE jobs SET updated_at = updated_at + ?, not_before = not_before + ?",
        (ten_years_s, ten_years_s),
    )
    again = jobs.claim(s.conn, lease_s=60)
    assert again is not None and again.recording_id == rec_id and again.attempts == 2


def test_expired_and_orphaned_leases_are_requeued(settings: Settings) -> None:
    s = store(settings)
    for i in range(3):
        s.save(SPEECH, source="x", start_s=i, started_at=1000.0)
    expired = jobs.claim(s.conn, lease_s=-1)  # lease already over
    dead = jobs.claim(s.conn, lease_s=600, owner="elsewhere:1")  # expired owner not on this host
    alive = jobs.claim(s.conn, lease_s=600)  # this live process
    assert expired and dead and alive
    s.conn.execute(
        "UPDATE jobs SET owner=? WHERE id=?",
        (f"{jobs.owner_id().split(':')[0]}:999999999", dead.id),
    )
    assert jobs.requeue_stale(s.conn, settings.storage.runtime_dir) == 2
    assert jobs.counts(s.conn) == {"pending": 2, "running": 1, "done": 0, "failed": 0}


def test_delete_removes_audio_rows_and_index(settings: Settings) -> None:
    s = store(settings)
    rec = s.save(SPEECH, source="x", start_s=0, started_at=1000.0)
    s.conn.execute(
        "INSERT INTO segments (recording_id, idx, start_s, end_s, text) VALUES (?, 0, 0, 1, ?)",
        (rec.id, "the secret word is marmalade"),
    )
    hits = "SELECT COUNT(*) FROM segments_fts WHERE segments_fts MATCH 'marmalade'"
    assert s.conn.execute(hits).fetchone()[0] == 1
    assert delete_recording(s.conn, settings.storage.audio_dir, rec.id)
    assert not rec.audio_path.exists()
    assert s.conn.execute(hits).fetchone()[0] == 0
    assert s.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert b"marmalade" not in Path(settings.storage.db_path).read_bytes()


def test_deleting_a_recording_overwrites_its_undelivered_events(settings: Settings) -> None:
    """Events are stored deflated, where a grep for a word finds nothing either way: the
    deflated bytes themselves must be gone from the database files, not only the row."""
    s = store(settings)
    rec = s.save(SPEECH, source="x", start_s=0, started_at=1000.0)
    with Transaction(s.conn):
        enqueue(
            s.conn,
            TranscriptEvent(node_id="n", area="", recording_id=rec.id, text="the word: quince"),
        )
    (stored,) = s.conn.execute("SELECT payload FROM outbox").fetchone()
    assert unpack_payload(stored)["text"] == "the word: quince"
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db = Path(settings.storage.db_path)
    assert bytes(stored) in db.read_bytes()  # what is looked for is findable
    assert delete_recording(s.conn, settings.storage.audio_dir, rec.id)
    assert s.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = b"".join(p.read_bytes() for p in db.parent.glob("meraudiod.db*"))
    pieces = [bytes(stored)[i : i + 12] for i in range(0, len(stored) - 12, 6)]
    assert not [piece for piece in pieces if piece in raw]


WRITER = """
import sys, numpy as np
from meraudiod.config import load_settings
from meraudiod.db import open_db
from meraudiod.recordings import RecordingStore
s = load_settings()
store = RecordingStore(open_db(s.storage.db_path), s.storage.audio_dir, "flac")
audio = (np.random.default_rng(0).standard_normal(16000 * 20) * 3000).astype(np.int16)
i = 0
while True:
    store.save(audio, source="crash-test", start_s=i, started_at=1000.0 + i)
    i += 1
    print(i, flush=True)
"""


def test_sigkill_during_writes_leaves_only_whole_recordings(
    settings: Settings, env: dict[str, str]
) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    saved = 0
    while saved < 5:  # killed mid-write once a few recordings are in
        line = proc.stdout.readline()  # "" once the writer has died
        assert line and time.monotonic() < deadline, f"the writer stopped after {saved}"
        saved = int(line)
    proc.kill()
    proc.wait(timeout=10)
    conn = open_db(settings.storage.db_path)
    remove_crashed_writes(conn, settings.storage.audio_dir)
    rows = conn.execute("SELECT audio_path, duration_s FROM recordings").fetchall()
    assert len(rows) >= 5
    named = sorted(settings.storage.audio_dir / r["audio_path"] for r in rows)
    files = sorted(settings.storage.audio_dir.rglob("*.*"))
    # At most one whole file more: written, then killed before its row (kept, never deleted).
    assert set(named) <= set(files) and len(files) - len(named) <= 1
    assert not [f for f in files if f.suffix == ".part"]
    for path, row in zip(named, sorted(rows, key=lambda r: r["audio_path"]), strict=True):
        assert soundfile.info(path).frames == round(row["duration_s"] * 16000)
    assert jobs.counts(conn)["pending"] == len(rows)


def test_orphan_removal_touches_only_our_own_files(settings: Settings, tmp_path: Path) -> None:
    """Even pointed at a directory full of other things, start-up recovery deletes nothing
    but its own half-written files of crashed writes (a whole recording is always kept)."""
    elsewhere = tmp_path / "somebody_elses"
    (elsewhere / "2026" / "11" / "25").mkdir(parents=True)
    precious = [
        elsewhere / "notes.txt",
        elsewhere / "2026" / "11" / "25" / "song.flac",
        elsewhere / ".git" / "HEAD",
    ]
    precious[2].parent.mkdir()
    for path in precious:
        path.write_text("keep me")
    ours = elsewhere / "2026" / "11" / "25" / "01M89AY2FTNHNGP6MBNKJA4H0J.flac"
    ours.write_bytes(b"x")
    half = elsewhere / "2026" / "11" / "25" / "01M89AY2HYHZ863J8AWD7NPJEM.flac.part"
    half.write_bytes(b"x")
    os.utime(half, (1e9, 1e9))  # an old version's, long dead
    conn = open_db(settings.storage.db_path)
    assert remove_crashed_writes(conn, elsewhere) == 1
    assert all(p.read_text() == "keep me" for p in precious)
    assert ours.exists() and not half.exists()


def test_an_empty_path_is_never_the_current_directory(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from meraudiod.config import load_settings

    monkeypatch.setenv("MERAUDIOD_STORAGE__TMP_AUDIO_DIR", "")
    settings = load_settings()
    assert settings.storage.tmp_audio_dir is None
    assert settings.storage.audio_dir == settings.storage.data_dir / "audio"
