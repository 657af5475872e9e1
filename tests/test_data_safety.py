"""The daemon never destroys its own data: a moved, symlinked or restored data directory
keeps every audio file; start-up recovery deletes only half-written files of dead writers."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import soundfile

from meraudiod import db as db_module
from meraudiod import models
from meraudiod.asr import Transcriber
from meraudiod.audio import decode_file
from meraudiod.config import Settings
from meraudiod.db import Transaction, open_db
from meraudiod.listener import Listener
from meraudiod.recordings import RecordingStore, remove_crashed_writes
from meraudiod.retention import purge
from meraudiod.schema import MIGRATIONS
from meraudiod.sources import FileSource
from meraudiod.vad import SileroVad
from meraudiod.worker import Worker

from .conftest import (
    DEMO,
    DEMO_TRUTH,
    TEST_DATA,
    cli,
    db_rows,
    needs_root,
    run_daemon,
    sigkill_when,
    status_json,
    wait_for,
    wait_running,
)

SPEECH = decode_file(TEST_DATA / "librivox_0880.wav")
SHORT = TEST_DATA / "ls_103_0000.flac"  # one utterance: a quick real start-up of the daemon


def saved(data_dir: Path, n: int, first_s: float = 1000.0) -> list[Path]:
    """n recordings written as the listener writes them; their audio files."""
    audio_dir = data_dir / "audio"
    store = RecordingStore(open_db(data_dir / "meraudiod.db"), audio_dir, "flac")
    files = []
    for i in range(n):
        rec = store.save(SPEECH, source="x", start_s=float(i), started_at=first_s + i)
        assert rec is not None and rec.audio_path is not None
        files.append(rec.audio_path)
    store.conn.close()
    return files


def start_daemon(env: dict[str, str], data_dir: Path) -> None:
    """A real `run` on a short file with this data directory: start-up recovery included."""
    result = cli("run", "--source", f"file:{SHORT}", env={**env, **_data(data_dir)})
    assert result.returncode == 0, result.stderr


def _data(data_dir: Path) -> dict[str, str]:
    return {"MERAUDIOD_STORAGE__DATA_DIR": str(data_dir)}


def plays_back(env: dict[str, str], data_dir: Path, rec_id: str) -> bool:
    """`recordings export` finds the audio and it decodes to what was said."""
    out = data_dir.parent / f"export-{rec_id}"
    result = cli("recordings", "export", rec_id, "--out", str(out), env={**env, **_data(data_dir)})
    assert result.returncode == 0, result.stderr
    audio, rate = soundfile.read(out / f"{rec_id}.flac", dtype="int16")
    return rate == 16000 and np.array_equal(audio, SPEECH)


def test_moving_the_data_directory_loses_nothing(env: dict[str, str], tmp_path: Path) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    files = saved(a, 3)
    shutil.move(str(a), str(b))  # `mv A B`
    start_daemon(env, b)
    moved = [b / f.relative_to(a) for f in files]
    assert all(f.is_file() for f in moved)
    rows = db_rows({**env, **_data(b)}, "SELECT id FROM recordings ORDER BY id")
    assert len(rows) == 4  # the three moved ones and the file just played
    assert all(plays_back(env, b, f.name.removesuffix(".flac")) for f in moved)


def test_a_data_directory_moved_under_a_running_daemon_stops_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by hostile testing: `mv A B` under a running daemon, and the rows of the next
    recordings went to the moved database (the daemon's open file) while their audio went to
    a directory made anew at A: after pointing data_dir at B, recordings without audio. The
    daemon now stops at once, with one line naming the data directory (systemd starts it
    again on what is at the configured path), and B keeps every recording whole."""
    a, b = tmp_path / "A", tmp_path / "B"
    run_env = {**env, **_data(a)}
    proc = run_daemon(run_env)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        wait_running(run_env, proc)
        silence = np.zeros(16000, dtype=np.int16)
        proc.stdin.write(np.concatenate([SPEECH, silence]).astype("<i2").tobytes())
        proc.stdin.flush()
        done = "SELECT id FROM recordings WHERE status='done'"
        wait_for(lambda: len(db_rows(run_env, done)) == 1, 120, "the first recording")
        shutil.move(str(a), str(b))
        proc.wait(timeout=30)  # before: it ran on, half in A and half in B
    finally:
        proc.kill()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 1, stderr
    assert f"the data directory {a} or its database was moved" in stderr, stderr
    rows = db_rows({**env, **_data(b)}, "SELECT id, audio_path FROM recordings")
    assert len(rows) == 1 and all((b / "audio" / r["audio_path"]).is_file() for r in rows), rows
    assert not a.exists() or not list(a.rglob("*.flac"))


def test_a_second_daemon_on_the_same_data_directory_is_refused(env: dict[str, str]) -> None:
    """A second `meraudiod run` on the data directory of a running one (an admin trying the
    service's configuration by hand) started beside it: two heartbeats in one file, so
    `status` named whichever wrote last (and the second's stop wrote `not running` over the
    first's), the same MQTT client id, each connection ending the other's, and each start
    removing the other's uploads being received. It now stops in one line, exit 1."""
    pid, line = _refused_beside(env, env)
    data_dir = env["MERAUDIOD_STORAGE__DATA_DIR"]
    assert f"another meraudiod (pid {pid}) runs on {data_dir}" in line, line


def _refused_beside(env: dict[str, str], second_env: dict[str, str]) -> tuple[int, str]:
    """A daemon runs on `env`; `meraudiod run` on `second_env` beside it must stop at once,
    exit 1, no traceback, leaving the first running and named by `status`. The first's pid
    and the second's last line; the first is stopped (exit 0) before this returns."""
    first = run_daemon(env)
    try:
        wait_running(env, first)
        second = cli("run", "--source", "demo", env=second_env, timeout_s=60)
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr
        assert status_json(env)["pid"] == first.pid
        assert first.poll() is None
    finally:
        first.terminate()
        assert first.wait(timeout=60) == 0
    return first.pid, second.stderr.strip().splitlines()[-1]


def test_a_daemon_of_another_data_directory_given_the_same_run_dir_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    """An admin copies the installed configuration for a second room and changes only
    data_dir: both daemons wrote one heartbeat in run_dir (`status` named whichever wrote
    last), removed each other's notes of the job in hand, and took back each other's
    recordings kept over a stop. The second now stops in one line, exit 1, before it writes
    anything there."""
    run_dir = tmp_path / "run"
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    second_room = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "room2")}
    pid, line = _refused_beside(env, second_room)
    assert line.endswith(
        f"another meraudiod (pid {pid}) uses storage.run_dir {run_dir}: give this"
        f" one (on {tmp_path / 'room2'}) a run_dir of its own"
    ), line
    alone = cli("run", "--source", f"file:{SHORT}", env=second_room, timeout_s=120)
    assert alone.returncode == 0, alone.stderr  # the first one stopped: its turn


def test_a_run_dir_removed_under_the_daemon_is_made_again(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`rm -rf` of storage.run_dir under a running daemon: its heartbeat was never written
    again (`cannot write the heartbeat`, once), so `status` said `starting ... no heartbeat
    yet` of a daemon at work, and the notes of the job in hand stopped, so a crash during
    one was not counted (found by fault injection). The next heartbeat makes it again."""
    run_dir = tmp_path / "run"
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    proc = run_daemon(env)
    try:
        wait_running(env, proc)
        shutil.rmtree(run_dir)
        wait_for(lambda: (run_dir / "heartbeat.json").is_file(), 30, "the heartbeat again")
        assert status_json(env)["running"] is True
        # Its lock is taken again: another room's daemon given this run_dir is still refused.
        second_room = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "room2")}
        second = cli("run", "--source", "demo", env=second_room, timeout_s=60)
        assert second.returncode == 1 and "uses storage.run_dir" in second.stderr, second.stderr
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert f"storage.run_dir {run_dir} was removed under the daemon: made again" in stderr, stderr


def test_a_data_directory_moved_while_someone_speaks_keeps_the_utterance_for_the_next_start(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`mv A B` while an utterance is being heard: the stop saved it on its way out, its row
    in the moved database and its audio in a directory made anew at A (found by fault
    injection, 3 of 3 tries). Now nothing is written at A: the utterance is kept in run_dir,
    and the daemon started on B takes it back and saves it there whole."""
    a, b, run_dir = tmp_path / "A", tmp_path / "B", tmp_path / "run"
    run_env = {**env, **_data(a), "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    proc = run_daemon(run_env)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        wait_running(run_env, proc)
        proc.stdin.write(SPEECH[: SPEECH.size // 2].astype("<i2").tobytes())  # mid-sentence
        proc.stdin.flush()
        heartbeat = run_dir / "heartbeat.json"
        wait_for(lambda: json.loads(heartbeat.read_text())["recording"], 60, "speech heard")
        shutil.move(str(a), str(b))
        proc.wait(timeout=30)
    finally:
        proc.kill()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert not a.exists(), sorted(a.rglob("*"))
    assert db_rows({**env, **_data(b)}, "SELECT id FROM recordings") == []
    assert len(list((run_dir / "unsaved").iterdir())) == 1, stderr
    again = {**env, **_data(b), "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    start_daemon(again, b)
    rows = db_rows(again, "SELECT id, audio_path FROM recordings ORDER BY id")
    assert len(rows) == 2 and all((b / "audio" / r["audio_path"]).is_file() for r in rows), rows


def test_a_symlinked_data_directory_used_by_its_real_path_loses_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    files = saved(link, 2)  # recorded through the link
    result = cli("analyze", str(SHORT), env={**env, **_data(real)})  # analysed by the real path
    assert result.returncode == 0, result.stderr
    assert all((real / f.relative_to(link)).is_file() for f in files)
    start_daemon(env, real)
    assert all((real / f.relative_to(link)).is_file() for f in files)


def test_a_restored_older_database_keeps_the_newer_audio(
    env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    older = saved(data, 2)
    backup = tmp_path / "backup.db"
    conn = sqlite3.connect(data / "meraudiod.db")
    conn.execute("VACUUM INTO ?", (str(backup),))
    conn.close()
    newer = saved(data, 2, first_s=2000.0)
    for suffix in ("", "-wal", "-shm"):
        (data / f"meraudiod.db{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, data / "meraudiod.db")  # the backup restored
    start_daemon(env, data)
    assert all(f.is_file() for f in older + newer)  # no row names the newer two: still kept


def test_migration_makes_stored_paths_relative(settings: Settings, tmp_path: Path) -> None:
    """A database written by a version that stored absolute paths, moved since."""
    path = settings.storage.db_path
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:5]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version=5")
    rec_id = "01M89AY2FTNHNGP6MBNKJA4H0J"
    for rid, stored in (
        (rec_id, f"/old/place/audio/2026/11/25/{rec_id}.flac"),
        ("01M89AY2HYHZ863J8AWD7NPJEM", "/old/audio/2026/11/25/01M89AY2HYHZ863J8AWD7NPJEM.wav"),
        ("01M89AY2HYHZ863J8AWD7NPJEN", "/somewhere/odd.flac"),  # not ours: left as it was
    ):
        conn.execute(
            "INSERT INTO recordings (id, source, started_at, ended_at, start_s, end_s,"
            " duration_s, audio_path, rms_dbfs, closed_at) VALUES (?, 'x', 0, 1, 0, 1, 1, ?, 0, 0)",
            (rid, stored),
        )
    conn.close()
    migrated = open_db(path)
    paths = [r[0] for r in migrated.execute("SELECT audio_path FROM recordings ORDER BY id")]
    assert paths == [
        f"2026/11/25/{rec_id}.flac",
        "2026/11/25/01M89AY2HYHZ863J8AWD7NPJEM.wav",
        "/somewhere/odd.flac",
    ]


def test_recovery_deletes_only_half_written_files_of_dead_writers(settings: Settings) -> None:
    (kept,) = saved(settings.storage.data_dir, 1)
    day = kept.parent
    unnamed = day / "01M89AY2FTNHNGP6MBNKJA4H0J.flac"  # whole, but no row names it: kept
    unnamed.write_bytes(kept.read_bytes())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    crashed = day / f"01M89AY2HYHZ863J8AWD7NPJEM.flac.{dead_pid}.part"
    crashed.write_bytes(b"half")
    live = day / f"01M89AY2HYHZ863J8AWD7NPJEN.flac.{os.getppid()}.part"  # a live writer's
    live.write_bytes(b"half")
    known = day / f"{kept.name}.{dead_pid}.part"  # the database has this recording
    known.write_bytes(b"half")
    conn = open_db(settings.storage.db_path)
    assert remove_crashed_writes(conn, settings.storage.audio_dir) == 1
    assert not crashed.exists()
    assert kept.is_file() and unnamed.is_file() and live.is_file() and known.is_file()


# --- deletes never hold the write lock long enough to lose speech -----------------------------


def _big_store(conn: sqlite3.Connection, n: int) -> None:
    """n transcribed recordings (no audio) with their jobs and an event each."""
    rows = [(f"OLD{i:023d}", 1000.0 + i) for i in range(n)]
    with Transaction(conn):
        conn.executemany(
            "INSERT INTO recordings (id, source, started_at, ended_at, start_s, end_s,"
            " duration_s, rms_dbfs, closed_at, status) VALUES (?, 'old', ?, 0, 0, 1, 1, -30, 0,"
            " 'done')",
            rows,
        )
        conn.executemany(
            "INSERT INTO jobs (recording_id, state, created_at, updated_at)"
            " VALUES (?, 'done', 0, 0)",
            ((rec_id,) for rec_id, _ in rows),
        )
        conn.executemany(
            "INSERT INTO outbox (topic, payload, created_at, recording_id)"
            " VALUES ('e', '{}', 0, ?)",
            ((rec_id,) for rec_id, _ in rows[::10]),
        )


def listener_on(settings: Settings, path: Path, **hooks: Any) -> Listener:
    source = FileSource(path)
    source.start()
    vad = SileroVad(models.vad_file(settings))
    return Listener(settings, source, vad, keep_ids=True, **hooks)


def test_every_delete_path_has_an_index(settings: Settings) -> None:
    conn = open_db(settings.storage.db_path)
    for table in ("jobs", "speaker_embeddings", "outbox", "segments", "speaker_mappings"):
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT 1 FROM {table} WHERE recording_id='x'"
        ).fetchall()
        assert "USING" in " ".join(str(row[3]) for row in plan), (table, plan)


def test_a_big_purge_beside_a_listener_loses_no_speech(settings: Settings) -> None:
    """1,000 recordings purged from a store with 50,000 jobs while speech is being saved."""
    conn = open_db(settings.storage.db_path)
    _big_store(conn, 50_000)
    listener = listener_on(settings, DEMO)
    listener.start()
    t0 = time.monotonic()
    result = purge(conn, settings.storage.audio_dir, before=1000.0 + 1000)
    purge_s = time.monotonic() - t0
    assert listener.finished.wait(120), "the listener never finished the file"
    assert result.recordings_deleted == 1000
    assert listener.error is None
    assert listener.recordings_saved == len(DEMO_TRUTH)  # 0 utterances lost
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 49_000 + len(DEMO_TRUTH)
    print(f"purge of 1,000 recordings beside 50,000 jobs: {purge_s:.2f} s")
    assert purge_s < 3.0  # generous: 0.3 s measured here, 6.3 s without the indexes


def test_the_listener_and_the_worker_outlive_a_database_locked_past_its_busy_timeout(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the write lock past the busy timeout (one hold for both
    stages): the utterance is kept and saved once the lock is gone, the listener lives on,
    and the worker, whose claims failed meanwhile, transcribes it. The busy timeout is 30 s
    (db._BUSY_TIMEOUT_S); 2 s here, so that a hold past it takes seconds, not half a
    minute: the stages run in this process and open their connections after it is set
    (db._open reads it then), so they wait it out and give up as the daemon's do."""
    monkeypatch.setattr(db_module, "_BUSY_TIMEOUT_S", 2.0)
    path = settings.storage.db_path
    open_db(path).close()
    asr = settings.asr
    model = models.resolve(asr.model, settings.storage.resolved_models_dir, False)
    stop = threading.Event()
    worker = Worker(settings, Transcriber(model, asr, asr.model), stop)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # e.g. a long purge by an older version
        held_at = time.monotonic()
        worker.start()
        listener = listener_on(settings, SHORT)
        listener.start()
        # Held past the busy timeout of both: the first save and claim fail (a fixed hold
        # once let a save begun late outlast it, and the test passed untried).
        said = {"database busy (database is locked): recording of", "the worker tries again"}
        wait_for(
            lambda: all(any(s in r.getMessage() for r in caplog.records) for s in said),
            120,
            "the save and the claim to give up waiting",
        )
        assert time.monotonic() - held_at >= db_module._BUSY_TIMEOUT_S  # held past it
        holder.execute("ROLLBACK")
        assert listener.finished.wait(60), "the listener never finished the file"
        assert listener.error is None and worker.is_alive()
        assert listener.recording_ids is not None and len(listener.recording_ids) == 1
        worker.wake()
        conn = open_db(path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT status FROM recordings WHERE id=?", (listener.recording_ids[0],)
            ).fetchone()
            if row["status"] == "done":
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the worker never transcribed the recording")
        conn.close()
    finally:
        holder.close()
        stop.set()
        worker.join(30)


# --- analyze beside a live daemon -----------------------------------------------------------


def feed_realtime(
    stdin: IO[bytes], stop: threading.Event, played_once: threading.Event | None = None
) -> None:
    """The demo's speech as 16 kHz s16le on a pipe, at real time, over and over until stop;
    `played_once` is set when the whole demo has gone through once."""
    pcm = decode_file(DEMO).tobytes()
    chunk = 16000  # 0.5 s
    try:
        while not stop.is_set():
            for first in range(0, len(pcm), chunk):
                if stop.is_set():
                    break
                stdin.write(pcm[first : first + chunk])
                stdin.flush()
                time.sleep(0.5)
            else:
                if played_once is not None:
                    played_once.set()
    finally:
        stdin.close()


def test_analyze_15_times_beside_a_live_daemon_takes_nothing_of_its(env: dict[str, str]) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=False,
    )
    assert daemon.stdin is not None
    stop, played_once = threading.Event(), threading.Event()
    feeder = threading.Thread(
        target=feed_realtime, args=(daemon.stdin, stop, played_once), daemon=True
    )
    feeder.start()
    try:
        for _ in range(15):
            result = cli("analyze", str(SHORT), env=env)
            assert result.returncode == 0, result.stderr
            assert daemon.poll() is None, "the daemon stopped"
        # The daemon hears the whole demo at least once, however fast the analyze runs were.
        assert played_once.wait(120), "the demo was never played through"
        stop.set()
        _, stderr = daemon.communicate(timeout=180)
    finally:
        stop.set()
        daemon.kill()
    assert daemon.returncode == 0, stderr.decode()
    assert b"listener failed" not in stderr
    rows = db_rows(
        env,
        "SELECT r.source, r.status, j.owner, j.origin FROM recordings r"
        " JOIN jobs j ON j.recording_id = r.id",
    )
    mine = [r for r in rows if r["source"] == "stdin"]
    theirs = [r for r in rows if r["source"] == f"file:{SHORT}"]
    assert len(mine) >= len(DEMO_TRUTH) and len(theirs) == 15
    # Every daemon job was done by the daemon, every analyze job by the analyze that made it.
    assert {r["owner"].rpartition(":")[2] for r in mine} == {str(daemon.pid)}
    assert all(r["origin"] is None and r["status"] == "done" for r in mine)
    assert all(r["owner"] == r["origin"] and r["status"] == "done" for r in theirs)


def test_the_daemon_takes_over_the_recordings_of_a_killed_analyze(env: dict[str, str]) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env=env,
        stdin=subprocess.PIPE,  # open and silent: the daemon runs on, hearing nothing
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sigkill_when(  # half way through the file
            env,
            ["analyze", str(DEMO)],
            "SELECT COUNT(*) FROM jobs WHERE origin LIKE '%:{pid}'",
            "analyze to queue a job",
        )
        left = db_rows(env, "SELECT id FROM recordings")
        assert left
        done = "SELECT COUNT(*) AS n FROM recordings WHERE status='done'"
        wait_for(
            lambda: db_rows(env, done)[0]["n"] == len(left),
            120,
            "the daemon to transcribe what analyze left",
            poll_s=1,
        )
        owners = db_rows(env, "SELECT DISTINCT owner FROM jobs")
        assert any(r["owner"].endswith(f":{daemon.pid}") for r in owners)
    finally:
        assert daemon.stdin is not None
        daemon.stdin.close()
        daemon.wait(timeout=60)
    assert daemon.returncode == 0


def test_a_delete_stopped_half_way_leaves_no_audio_without_its_row(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by a purge run as a user who may not delete some audio files: the rows went
    first, so the audio of 100 deleted recordings stayed on disk, found by nothing ever again
    (and a traceback). The audio goes first; the same purge, run again, finishes."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    deletable = saved(data_dir, 50)
    kept = saved(data_dir, 100, first_s=1000.0 + 3 * 86400)  # another day's directory
    kept[0].parent.chmod(0o555)
    try:
        result = cli("purge", "--older-than", "1", "--yes", env=env, as_user=True)
    finally:
        kept[0].parent.chmod(0o755)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().endswith(": Permission denied"), result.stderr
    assert str(kept[0].parent) in result.stderr
    rows = db_rows(env, "SELECT audio_path FROM recordings")
    on_disk = {
        p.relative_to(data_dir / "audio").as_posix() for p in [*deletable, *kept] if p.exists()
    }
    assert on_disk <= {r["audio_path"] for r in rows}  # no audio file without its row
    assert all(p.is_file() for p in kept)
    assert db_rows(env, "PRAGMA integrity_check")[0][0] == "ok"
    again = cli("purge", "--older-than", "1", "--yes", env=env)
    assert "recordings and 100 audio files" in again.stdout, again.stderr
    assert not list((data_dir / "audio").rglob("*.flac"))


def test_retry_failed_skips_a_failed_recording_whose_audio_is_gone_as_reprocess_does(
    env: dict[str, str],
) -> None:
    """Found comparing the two ways to queue failed recordings again: `reprocess --failed`
    skipped one whose audio file is gone, `jobs --retry-failed` queued it, and the worker
    failed it again at once. Both now leave it failed and say so, one line per recording."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    files = saved(data_dir, 3)
    ids = [str(r["id"]) for r in db_rows(env, "SELECT id FROM recordings ORDER BY started_at")]
    files[1].unlink()  # deleted by hand, a failing card
    gone = ids[1]
    conn = open_db(data_dir / "meraudiod.db")
    fail_all = "UPDATE jobs SET state='failed', attempts=3, error='boom'"
    conn.execute(fail_all)
    conn.close()

    def states() -> dict[str, str]:
        rows = db_rows(env, "SELECT recording_id, state FROM jobs")
        return {str(r["recording_id"]): str(r["state"]) for r in rows}

    retried = cli("jobs", "--retry-failed", env=env)
    assert retried.returncode == 0, retried.stderr
    assert states() == {ids[0]: "pending", gone: "failed", ids[2]: "pending"}
    said = retried.stderr.splitlines()
    assert said[0] == f"skipped {gone}: its audio file {files[1]} is missing", said
    assert said[1:] == ["requeued 2 failed jobs"], said

    conn = open_db(data_dir / "meraudiod.db")
    conn.execute(fail_all)
    conn.close()
    reprocessed = cli("reprocess", "--failed", env=env)
    assert reprocessed.returncode == 0, reprocessed.stderr
    assert states() == {ids[0]: "pending", gone: "failed", ids[2]: "pending"}
    assert reprocessed.stderr.splitlines() == [
        f"skipped {gone}: its audio file {files[1]} is missing"
    ], reprocessed.stderr
    assert reprocessed.stdout.splitlines() == ["queued 2 recordings"], reprocessed.stdout


def test_changes_to_a_database_it_may_not_write_are_one_line_and_delete_nothing(
    env: dict[str, str],
) -> None:
    """Found by running the CLI as a user who may read the database but not write it:
    `recordings delete`, `speakers rename|opt-out|delete` and `jobs --retry-failed` ended in
    a traceback (attempt to write a readonly database). Now one line naming the database,
    and no audio file goes before the database has agreed to forget its row."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    files = saved(data_dir, 3)
    db = data_dir / "meraudiod.db"
    conn = open_db(db)
    conn.execute(
        "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
        " VALUES ('S1', 'Carol', 0, 0, 0, 0)"
    )
    # A failed job for --retry-failed to change (with none it has nothing to write).
    conn.execute("UPDATE jobs SET state='failed' WHERE id=(SELECT MIN(id) FROM jobs)")
    conn.close()
    ids = [str(r["id"]) for r in db_rows(env, "SELECT id FROM recordings")]
    db.chmod(0o444)
    try:
        for args in (
            ["recordings", "delete", *ids],
            ["speakers", "rename", "Carol", "Erin"],
            ["speakers", "opt-out", "Carol"],
            ["speakers", "delete", "Carol"],
            ["jobs", "--retry-failed"],
        ):
            result = cli(*args, env=env, as_user=True)
            assert result.returncode == 1, (args, result.stdout)
            assert result.stderr.strip() == (
                f"Error: database {db}: attempt to write a readonly database"
            ), (args, result.stderr)
    finally:
        db.chmod(0o640)
    assert all(f.is_file() for f in files) and len(db_rows(env, "SELECT id FROM recordings")) == 3
    assert [r[0] for r in db_rows(env, "SELECT name FROM speakers")] == ["Carol"]


@needs_root  # the tmpfs is mounted in a private mount namespace
def test_a_database_on_a_full_disk_is_said_to_be_on_a_full_disk(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by filling the data directory's disk (a 30 MB tmpfs) under a daemon: it died,
    and every start after it, and `status`, said only "cannot open database ...: disk I/O
    error" (SQLite cannot grow its shared-memory file), sending the admin after a broken
    card. Now `status` opens the database alone there and says the disk is full (0 MB
    free); a command that records says so in its one line (test_full_disk.py)."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    saved(data_dir, 1)
    full = tmp_path / "full"
    full.mkdir()
    status = shlex.join([sys.executable, "-m", "meraudiod", "status"])
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {shlex.quote(str(full))} || exit 99;"
        f" cp -a {shlex.quote(str(data_dir))}/. {shlex.quote(str(full))}/;"
        f" dd if=/dev/zero of={shlex.quote(str(full / 'filler'))} bs=4k 2>/dev/null; {status}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        env={**env, "MERAUDIOD_STORAGE__DATA_DIR": str(full)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert f"MB used in {full}, 0 MB free" in result.stdout, result.stdout
    assert re.search(r"^backlog +1 ", result.stdout, re.M), result.stdout  # what the DB holds
