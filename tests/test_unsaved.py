"""Recordings the database could not take at a stop, kept in the runtime directory for the
next start (meraudiod/unsaved.py): a kill at the worst moment saves none twice, a temp file
of a kill goes, and a purge of their time deletes them. Real daemons, real files, real
SQLite; the stops themselves are in tests/test_locked_database.py and test_read_only.py."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Final

import numpy as np
import pytest

from meraudiod import status as status_module
from meraudiod.audio import decode_file
from meraudiod.config import Settings, load_settings
from meraudiod.db import Transaction, database_id, open_db, put_kv
from meraudiod.recordings import SPILLED, RecordingStore
from meraudiod.status import status
from meraudiod.unsaved import (
    Purged,
    Unsaved,
    keep_unsaved,
    marking_saved,
    take_back_unsaved,
    unsaved_dir,
)

from .conftest import TEST_DATA, cli, db_rows, status_json

SHORT = TEST_DATA / "ls_103_0000.flac"

# The daemon, SIGKILLed by itself once it has saved a kept recording and before its file
# goes: the commit done, the clean-up not.
_KILLED_ONCE_SAVED: Final = """
import os, runpy, signal, sys
from meraudiod import listener

def killed(conn, path):
    os.kill(os.getpid(), signal.SIGKILL)

listener.forget_kept = killed
sys.argv = ["meraudiod", *sys.argv[1:]]
runpy.run_module("meraudiod", run_name="__main__", alter_sys=True)
"""


def _kept(folder: Path, started_at: float, owner: str = "") -> Path:
    """A recording kept as a stopping daemon keeps it, for the database `owner` names (""
    as an earlier version kept it, for anybody)."""
    samples = decode_file(SHORT)
    probs = np.full(samples.size // 512, 0.9, dtype=np.float32)
    keep_unsaved(folder, Unsaved(samples, 10.0, started_at, probs, "mic:USB"), owner)
    (path,) = [p for p in folder.iterdir() if p.name.startswith(f"{round(started_at * 1e6)}-")]
    return path


def _run(env: dict[str, str], *python: str) -> subprocess.CompletedProcess[str]:
    """`meraudiod run --source stdin` with no audio (started by `python`: `-m meraudiod`, or
    a wrapper): it takes back what was kept, transcribes it and ends."""
    return subprocess.run(
        [sys.executable, *python, "run", "--source", "stdin"],
        env=env,
        input="",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_kept_recording_is_saved_once_by_a_daemon_killed_before_its_file_went(
    env: dict[str, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    folder = run_dir / "unsaved"
    started_at = time.time() - 60
    path = _kept(folder, started_at)
    (folder / f"{path.name}.part").write_bytes(b"half a file")  # a kill while it was kept

    killed = _run(env, "-c", _KILLED_ONCE_SAVED)
    assert killed.returncode == -9, killed.stderr
    rows = db_rows(env, "SELECT source, started_at, start_s, duration_s FROM recordings")
    assert [(r["source"], r["start_s"]) for r in rows] == [("mic:USB", 10.0)]
    assert rows[0]["started_at"] == started_at
    assert rows[0]["duration_s"] == decode_file(SHORT).size / 16000
    assert path.is_file()  # saved, and its file still there
    assert not (folder / f"{path.name}.part").exists()

    done = _run(env, "-m", "meraudiod")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "taken back" not in done.stderr, done.stderr  # it was saved already
    assert len(db_rows(env, "SELECT id FROM recordings")) == 1  # not twice
    assert not path.exists()
    assert not db_rows(env, "SELECT key FROM kv WHERE key LIKE 'unsaved%'")
    transcribed = db_rows(env, "SELECT status FROM recordings")
    assert [r["status"] for r in transcribed] == ["done"]


def test_a_purge_of_their_time_deletes_kept_recordings(env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    folder = run_dir / "unsaved"
    open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db").close()  # as it ran
    hour_ago = time.time() - 3600
    inside, outside = _kept(folder, hour_ago), _kept(folder, hour_ago - 86400)
    start = datetime.fromtimestamp(hour_ago - 60).isoformat(timespec="seconds")
    looked = cli("purge", "--start", start, "--end", "now", "--dry-run", env=env)
    assert looked.stdout.strip() == "would delete 1 recording and 1 audio file", looked
    assert inside.exists()
    done = cli("purge", "--start", start, "--end", "now", "--yes", env=env)
    assert done.stdout.strip() == "deleted 1 recording and 1 audio file", done
    assert not inside.exists() and outside.exists()
    audio_only = cli("purge", "--older-than", "0.5", "--audio-only", "--yes", env=env)
    assert audio_only.stdout.strip() == "deleted 0 recordings and 1 audio file", audio_only
    assert not outside.exists()
    # The next start finds nothing to take back: deleted means deleted.
    taken = _run(env, "-m", "meraudiod")
    assert taken.returncode == 0, taken.stderr
    assert not db_rows(env, "SELECT id FROM recordings")


def test_a_kept_recording_purged_while_the_daemon_holds_it_is_not_saved(tmp_path: Path) -> None:
    """The daemon took it back and waits for the database; a purge removes its file
    meanwhile. The save, under the write lock, finds the file gone and stores nothing."""
    folder = tmp_path / "run" / "unsaved"
    path = _kept(folder, time.time() - 60)
    conn = open_db(tmp_path / "meraudiod.db")
    store = RecordingStore(conn, tmp_path / "audio", "flac")
    samples = decode_file(SHORT)
    path.unlink()  # purge_unsaved
    with pytest.raises(Purged):
        store.save(samples, "mic:USB", 10.0, time.time() - 60, in_transaction=marking_saved(path))
    assert conn.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 0
    assert not list((tmp_path / "audio").rglob("*.*"))  # its audio file removed with it


def test_a_damaged_kept_file_is_said_and_removed_and_the_others_taken_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "unsaved"
    good = _kept(folder, time.time() - 60)
    damaged = folder / "0000000000000001-000.npz"
    damaged.write_bytes(b"not a recording")
    taken = take_back_unsaved(open_db(tmp_path / "meraudiod.db"), folder)
    assert [heard.kept_in for heard in taken] == [good]
    assert np.array_equal(taken[0].samples, decode_file(SHORT))
    assert not damaged.exists()
    (line,) = [r.getMessage() for r in caplog.records if "no recording kept" in r.getMessage()]
    assert line.startswith(f"{damaged} is no recording kept by meraudiod (") and line.endswith(
        "): removed"
    )


def test_two_daemons_of_one_user_keep_their_recordings_apart(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Without `run_dir`, two daemons of one user (two rooms, two data directories) share
    $XDG_RUNTIME_DIR: each takes back and purges only its own kept recordings."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in env.items() if k != "RUNTIME_DIRECTORY"}
    first = {**env, "XDG_RUNTIME_DIR": str(runtime)}
    second = {**first, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "other")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_RUNTIME_DIR", str(runtime))
        patch.delenv("RUNTIME_DIRECTORY", raising=False)
        patch.setenv("MERAUDIOD_STORAGE__DATA_DIR", first["MERAUDIOD_STORAGE__DATA_DIR"])
        folder = unsaved_dir(load_settings().storage)
    assert folder is not None and folder.is_relative_to(runtime)
    path = _kept(folder, time.time() - 3600)

    other = _run(second, "-m", "meraudiod")
    assert other.returncode == 0, other.stderr
    assert not db_rows(second, "SELECT id FROM recordings")
    start = datetime.fromtimestamp(time.time() - 7200).isoformat(timespec="seconds")
    purged = cli("purge", "--start", start, "--end", "now", "--yes", env=second)
    assert purged.stdout.strip() == "nothing to delete", purged
    assert path.is_file()

    own = _run(first, "-m", "meraudiod")
    assert own.returncode == 0, own.stderr
    assert [r["source"] for r in db_rows(first, "SELECT source FROM recordings")] == ["mic:USB"]
    assert not path.exists()


def test_a_daemon_of_another_database_given_the_same_run_dir_leaves_its_kept_recordings(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A second room's daemon given the first's `run_dir` (one after the other: never both
    at once) took back, stored and transcribed the first one's kept recordings in its own
    database, and its purge deleted them. Each is kept for its database's id now."""
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(tmp_path / "run")}
    second = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "kitchen")}
    conn = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")  # as it ran
    owner = database_id(conn)
    conn.close()
    assert len(owner) == 16
    path = _kept(tmp_path / "run" / "unsaved", time.time() - 3600, owner)

    other = _run(second, "-m", "meraudiod")
    assert other.returncode == 0, other.stderr
    assert "1 recording kept in" in other.stderr and "for another database" in other.stderr
    assert not db_rows(second, "SELECT id FROM recordings")
    assert status_json(second)["unsaved"]["recordings"] == 0
    start = datetime.fromtimestamp(time.time() - 7200).isoformat(timespec="seconds")
    purged = cli("purge", "--start", start, "--end", "now", "--yes", env=second)
    assert purged.stdout.strip() == "nothing to delete", purged
    assert path.is_file()

    assert status_json(env)["unsaved"]["recordings"] == 1
    own = _run(env, "-m", "meraudiod")
    assert own.returncode == 0, own.stderr
    assert [r["source"] for r in db_rows(env, "SELECT source FROM recordings")] == ["mic:USB"]
    assert not path.exists()


def test_status_counts_kept_recordings_it_may_read(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` with the daemon down counts the kept recordings (a temp file of a kill is
    none); an admin who may not read the service's folder (0700) gets null, not an error."""
    storage = settings.storage.model_copy(update={"run_dir": tmp_path / "run"})
    settings = settings.model_copy(update={"storage": storage})
    conn = open_db(storage.db_path)
    assert status(conn, settings)["unsaved"] == {
        "recordings": 0,
        "audio": 0,
        "kept_in": str(tmp_path / "run"),
    }
    path = _kept(tmp_path / "run" / "unsaved", time.time() - 60)
    (path.parent / f"{path.name}.part").write_bytes(b"half a file")
    assert status(conn, settings)["unsaved"]["recordings"] == 1
    # Held audio kept over a stop is this database's when one of its rows names it: another
    # data directory's daemon, given the same run_dir, keeps its own beside it.
    (tmp_path / "run" / "held-audio").mkdir()
    (tmp_path / "run" / "held-audio" / "01KBXY0000000000000000000A.flac").write_bytes(b"x")
    assert status(conn, settings)["unsaved"]["audio"] == 0
    with Transaction(conn):
        put_kv(conn, SPILLED + "01KBXY0000000000000000000B", "4121 /run/x.flac")
    assert status(conn, settings)["unsaved"]["audio"] == 1

    def refused(folder: Path) -> list[str]:
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(status_module.os, "listdir", refused)
    assert status(conn, settings)["unsaved"]["recordings"] is None
