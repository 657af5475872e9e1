"""Retention and privacy on real files and rows: limits, purge, the disk guard."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from meraudiod.audio import decode_file
from meraudiod.config import Settings
from meraudiod.db import Transaction, open_db
from meraudiod.recordings import RecordingStore
from meraudiod.retention import PurgeResult, purge, sweep

from .conftest import DEMO, DEMO_TRUTH, TEST_DATA, cli, stored_audio
from .httpd import daemon_env

SHORT = TEST_DATA / "ls_103_0000.flac"  # one utterance: a quick real run of the daemon


@pytest.fixture(scope="module")
def analyzed_demo(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A data directory with the demo analysed in it, once for the module (five
    transcriptions each time were most of the module's CPU): each test gets a copy."""
    root = tmp_path_factory.mktemp("analyzed-demo")
    env = daemon_env(root, models_dir)
    done = cli("analyze", str(DEMO), env=env)
    assert done.returncode == 0, done.stderr
    return root / "data"


def analyzed(env: dict[str, str], demo: Path | None = None) -> sqlite3.Connection:
    """The demo analysed into `env`'s data directory (a copy of `demo`'s when given)."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    if demo is None:
        assert cli("analyze", str(DEMO), env=env).returncode == 0
    else:
        shutil.copytree(demo, data_dir)
    conn = sqlite3.connect(data_dir / "meraudiod.db")
    conn.row_factory = sqlite3.Row
    return conn


def age(conn: sqlite3.Connection, rec_ids: list[str], days: float) -> None:
    for rec_id in rec_ids:
        conn.execute(
            "UPDATE recordings SET started_at = started_at - ? WHERE id=?", (days * 86400, rec_id)
        )
    conn.commit()


def test_sweep_drops_old_audio_then_old_text(
    env: dict[str, str], settings: Settings, analyzed_demo: Path
) -> None:
    conn = analyzed(env, analyzed_demo)
    ids = [r["id"] for r in conn.execute("SELECT id FROM recordings ORDER BY id")]
    age(conn, ids[:2], 40)  # older than both limits
    age(conn, ids[2:3], 10)  # older than the audio limit only
    settings.retention.audio_days = 7
    settings.retention.text_days = 30
    db = open_db(settings.storage.db_path)
    result = sweep(db, settings)
    assert result.recordings_deleted == 2 and result.audio_files_deleted == 3
    rows = {r["id"]: r for r in conn.execute("SELECT id, audio_path, text FROM recordings")}
    assert set(rows) == set(ids[2:])
    assert rows[ids[2]]["audio_path"] is None and rows[ids[2]]["text"]  # text kept, audio gone
    assert all(stored_audio(env, rows[i]["audio_path"]).is_file() for i in ids[3:])
    assert len(list(settings.storage.audio_dir.rglob("*.flac"))) == len(DEMO_TRUTH) - 3


def test_purge_by_time_range_deletes_text_from_the_database_file(
    env: dict[str, str], settings: Settings, analyzed_demo: Path
) -> None:
    conn = analyzed(env, analyzed_demo)
    ids = [r["id"] for r in conn.execute("SELECT id FROM recordings ORDER BY id")]
    secret = conn.execute("SELECT text FROM recordings WHERE id=?", (ids[0],)).fetchone()[0]
    word = max(secret.split(), key=len).strip(".,").lower()  # e.g. "prudently"
    conn.close()
    age_conn = sqlite3.connect(settings.storage.db_path)
    age(age_conn, ids[:1], 2)
    age_conn.close()
    db = open_db(settings.storage.db_path)
    now = time.time()
    result = purge(db, settings.storage.audio_dir, after=now - 3 * 86400, before=now - 86400)
    assert result.recordings_deleted == 1
    assert db.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == len(DEMO_TRUTH) - 1
    db.close()
    raw = b"".join(p.read_bytes() for p in settings.storage.data_dir.glob("meraudiod.db*"))
    assert word.encode() not in raw.lower()


def test_a_delete_while_a_backup_reads_holds_off_writers_briefly_and_forgets_later(
    env: dict[str, str], settings: Settings, analyzed_demo: Path
) -> None:
    """A backup's read open, its snapshot older than the delete: the checkpoint after the
    delete waits for it, holding off every writer meanwhile (the listener's saves), and did
    so for SQLite's whole 30 s busy timeout, then gave up in silence with the delete's mark
    gone: the deleted words stayed in the database file until some later checkpoint. Now it
    waits 2 s, says so, keeps the mark, and the next sweep (no limits configured) finishes
    once the read is over."""
    conn = analyzed(env, analyzed_demo)
    ids = [r["id"] for r in conn.execute("SELECT id FROM recordings ORDER BY id")]
    secret = conn.execute("SELECT text FROM recordings WHERE id=?", (ids[0],)).fetchone()[0]
    word = max(secret.split(), key=len).strip(".,").lower().encode()
    conn.close()
    path = settings.storage.db_path
    backup = sqlite3.connect(path, isolation_level=None)
    backup.execute("BEGIN")
    backup.execute("SELECT COUNT(*) FROM recordings").fetchone()
    db = open_db(path)

    def stored() -> bytes:
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*")).lower()

    try:
        started = time.monotonic()
        result = purge(db, settings.storage.audio_dir, after=0.0, before=time.time() + 60)
        took_s = time.monotonic() - started
        assert result.recordings_deleted == len(ids)
        assert took_s < 5, took_s  # 2 s of waiting for the read, not 30
        assert word in stored()  # the read still sees it: its pages cannot go yet
        unforgotten = "SELECT 1 FROM kv WHERE key='deleted_text_unforgotten'"
        assert db.execute(unforgotten).fetchone() is not None
    finally:
        backup.close()
    sweep(db, settings)  # no limits: it only finishes what the delete left
    assert db.execute(unforgotten).fetchone() is None
    db.close()
    assert word not in stored()


def test_purge_cli_needs_a_criterion_and_reports(env: dict[str, str], analyzed_demo: Path) -> None:
    analyzed(env, analyzed_demo).close()
    refused = cli("purge", env=env)
    assert refused.returncode != 0 and "needs" in refused.stderr
    done = cli(
        "purge", "--start", "2000-01-01", "--end", "2100-01-01", "--audio-only", "-y", env=env
    )
    assert done.returncode == 0 and f"{len(DEMO_TRUTH)} audio files" in done.stdout
    listed = json.loads(cli("recordings", "list", "--json", env=env).stdout)
    assert len(listed) == len(DEMO_TRUTH) and all(r["text"] for r in listed)
    gone = cli("purge", "--start", "2000-01-01", "--end", "2100-01-01", "--yes", env=env)
    assert f"deleted {len(DEMO_TRUTH)} recordings and 0 audio files" in gone.stdout
    assert json.loads(cli("recordings", "list", "--json", env=env).stdout) == []


def test_purge_wants_a_whole_range_asks_first_and_counts_truly(
    env: dict[str, str], analyzed_demo: Path
) -> None:
    conn = analyzed(env, analyzed_demo)
    total = len(DEMO_TRUTH)
    half_open = cli("purge", "--start", "2000-01-01", env=env)
    assert half_open.returncode != 0 and "both --start and --end" in half_open.stderr
    until_now = cli("purge", "--start", "2000-01-01", "--end", "now", "--dry-run", env=env)
    assert until_now.returncode == 0 and "would delete" in until_now.stdout
    dry = cli("purge", "--start", "2000-01-01", "--end", "2100-01-01", "--dry-run", env=env)
    assert dry.returncode == 0 and f"would delete {total} recordings" in dry.stdout
    unasked = cli(
        "purge", "--start", "2000-01-01", "--end", "2100-01-01", env=env
    )  # not a terminal
    assert unasked.returncode != 0 and "--yes" in unasked.stderr
    assert conn.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == total
    (gone_already,) = conn.execute("SELECT audio_path FROM recordings LIMIT 1").fetchone()
    stored_audio(env, gone_already).unlink()
    done = cli("purge", "--start", "2000-01-01", "--end", "2100-01-01", "--yes", env=env)
    assert f"deleted {total} recordings and {total - 1} audio files" in done.stdout
    assert conn.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 0


def test_keep_no_audio_once_transcribed(env: dict[str, str]) -> None:
    conn = analyzed({**env, "MERAUDIOD_RETENTION__KEEP_AUDIO": "false"})
    rows = conn.execute("SELECT audio_path, text, status FROM recordings").fetchall()
    assert len(rows) == len(DEMO_TRUTH)
    assert all(r["audio_path"] is None and r["text"] and r["status"] == "done" for r in rows)
    audio_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio"
    assert list(audio_dir.rglob("*.flac")) == []


def test_disk_guard_keeps_transcribing_from_memory(env: dict[str, str]) -> None:
    full = {**env, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": str(10**12)}  # "the disk is full"
    result = cli("run", "--source", "demo", env=full)
    assert result.returncode == 0, result.stderr
    assert "disk almost full" in result.stderr
    conn = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    rows = conn.execute("SELECT audio_path, text, status FROM recordings").fetchall()
    assert len(rows) == len(DEMO_TRUTH)
    assert all(path is None and text and status == "done" for path, text, status in rows)
    audio_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio"
    assert list(audio_dir.rglob("*.flac")) == []


def test_retention_keeps_what_is_not_transcribed_yet_whatever_its_clock_said(
    env: dict[str, str], settings: Settings
) -> None:
    """Found by a daemon started with text_days on a backlog stamped 1970 (a Pi without a
    real-time clock records before NTP sets the time): the sweep at start deleted the
    recordings before the worker transcribed them ("its audio file ... is missing"). Not
    transcribed yet, or queued to be again, a recording keeps its text and audio."""
    conn = open_db(settings.storage.db_path)
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    speech = decode_file(DEMO)[: 5 * 16000]
    backlog = store.save(speech, source="mic", start_s=0.0, started_at=1000.0)
    queued_again = store.save(speech, source="mic", start_s=0.0, started_at=1000.0)
    assert backlog is not None and queued_again is not None
    conn.execute("UPDATE recordings SET status='done' WHERE id=?", (queued_again.id,))
    conn.commit()
    limits = settings.retention.model_copy(update={"audio_days": 1.0, "text_days": 1.0})
    assert sweep(conn, settings.model_copy(update={"retention": limits})) == PurgeResult()
    assert backlog.audio_path is not None and backlog.audio_path.is_file()
    result = cli("run", "--source", "demo", env={**env, "MERAUDIOD_RETENTION__TEXT_DAYS": "30"})
    assert result.returncode == 0, result.stderr
    row = conn.execute("SELECT status, text FROM recordings WHERE id=?", (backlog.id,)).fetchone()
    assert row is not None and row["status"] == "done" and row["text"], result.stderr


def test_keep_no_audio_with_a_file_it_may_not_delete_keeps_the_transcript_and_the_row(
    env: dict[str, str], settings: Settings
) -> None:
    """Found with keep_audio = false and a recording's day directory the daemon may not
    write: the transcript was stored and the row's audio path cleared, then the unlink
    failed, so the job was retried, failed ("its audio was never written (disk full)") and
    the audio file stayed on disk with no row naming it, for ever. Now the file goes before
    its row forgets it: the recording is done, and its audio, still named, can be purged."""
    conn = open_db(settings.storage.db_path)
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    rec = store.save(decode_file(DEMO)[: 8 * 16000], source="mic", start_s=0.0, started_at=1e9)
    assert rec is not None and rec.audio_path is not None
    rec.audio_path.parent.chmod(0o555)
    try:
        result = cli(
            "run",
            "--source",
            f"file:{SHORT}",
            env={**env, "MERAUDIOD_RETENTION__KEEP_AUDIO": "false"},
            timeout_s=180,
            as_user=True,
        )
    finally:
        rec.audio_path.parent.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert f"recording {rec.id}: keep_audio = false but its audio stays" in result.stderr
    row = conn.execute("SELECT status, text, audio_path FROM recordings WHERE id=?", (rec.id,))
    status, text, audio_path = row.fetchone()
    assert status == "done" and text, result.stderr
    assert audio_path is not None and (settings.storage.audio_dir / audio_path).is_file()
    purged = cli(
        "purge", "--start", "2000-01-01", "--end", "2002-01-01", "--audio-only", "--yes", env=env
    )
    assert "and 1 audio file\n" in purged.stdout, purged.stderr
    assert not rec.audio_path.exists()


def _old_recordings(settings: Settings, n: int, age_days: float) -> list[str]:
    """n transcribed recordings `age_days` old, each with a (stand-in) audio file."""
    conn = open_db(settings.storage.db_path)
    audio_dir = settings.storage.audio_dir
    audio_dir.mkdir(parents=True, exist_ok=True)
    started_at = time.time() - age_days * 86400
    ids = [f"01OLD{i:021d}" for i in range(n)]
    for rec_id in ids:
        (audio_dir / f"{rec_id}.flac").write_bytes(b"fLaC")
    with Transaction(conn):
        conn.executemany(
            "INSERT INTO recordings (id, source, started_at, ended_at, start_s, end_s,"
            " duration_s, rms_dbfs, closed_at, status, audio_path, text)"
            " VALUES (?, 'old', ?, 0, 0, 1, 1, -30, 0, 'done', ?, 'words')",
            [(rec_id, started_at + i, f"{rec_id}.flac") for i, rec_id in enumerate(ids)],
        )
        conn.executemany(
            "INSERT INTO jobs (recording_id, state, created_at, updated_at)"
            " VALUES (?, 'done', 0, 0)",
            ((rec_id,) for rec_id in ids),
        )
    conn.close()
    return ids


@pytest.mark.parametrize("limit", ["text_days", "audio_days"])
def test_a_sweep_stops_between_batches_and_leaves_the_rest_whole(
    settings: Settings, limit: str
) -> None:
    """Found stopping a daemon during a big sweep: it did not look at the stop event (20,000
    deletes, 3 s; the audio sweep in one transaction). Now it stops between batches of 100:
    each recording's row and audio file went together or not at all, and the next sweep
    does the rest."""
    n = 3000
    ids = _old_recordings(settings, n, age_days=40 if limit == "text_days" else 10)
    settings.retention.text_days = 30
    settings.retention.audio_days = 7
    db = settings.storage.db_path
    gone_sql = (
        "SELECT COUNT(*) FROM recordings WHERE audio_path IS NOT NULL"
        if limit == "audio_days"
        else "SELECT COUNT(*) FROM recordings"
    )
    stop = threading.Event()
    results: list[PurgeResult] = []
    sweeping = threading.Thread(
        target=lambda: results.append(sweep(open_db(db), settings, stop)), name="sweep"
    )
    watcher = sqlite3.connect(db)
    sweeping.start()
    try:
        # The stop comes once the first batch is committed, as a SIGTERM would at any time.
        while sweeping.is_alive() and watcher.execute(gone_sql).fetchone()[0] == n:
            time.sleep(0.002)
        stop.set()
    finally:
        sweeping.join(60)
    assert not sweeping.is_alive()
    (result,) = results
    done = result.recordings_deleted if limit == "text_days" else result.audio_files_deleted
    assert 0 < done < n and done % 100 == 0, result  # whole batches, and not all of them
    rows = {r[0]: r[1] for r in watcher.execute("SELECT id, audio_path FROM recordings")}
    files = {p.name for p in settings.storage.audio_dir.iterdir()}
    with_audio = {f"{rec_id}.flac" for rec_id, path in rows.items() if path is not None}
    assert files == with_audio  # no file without its row, no row naming a file gone
    assert len(with_audio) == n - done
    assert watcher.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    again = sweep(open_db(db), settings)  # the next sweep does the rest
    assert not list(settings.storage.audio_dir.iterdir())
    if limit == "text_days":
        assert again.recordings_deleted == n - done
        assert watcher.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 0
    else:
        assert again.audio_files_deleted == n - done
        assert set(rows) == set(ids)
    watcher.close()
