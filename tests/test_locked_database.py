"""Another process holds SQLite's write lock on the daemon's database (an admin's `sqlite3`
shell left in a transaction, a backup, a long purge) while the daemon starts or stops: real
lock holders on the real file, real daemon processes, real signals."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

import numpy as np
import pytest
import soundfile

from meraudiod import daemon as daemon_module
from meraudiod.audio import SAMPLE_RATE_HZ, Int16Array, decode_file
from meraudiod.config import Settings
from meraudiod.daemon import Daemon
from meraudiod.db import DamagedDatabaseError, DatabaseError, Transaction, open_db
from meraudiod.deletion import forget_deleted_text
from meraudiod.recordings import RecordingStore
from meraudiod.schema import MIGRATIONS
from meraudiod.sources import open_source

from .broker import Broker
from .conftest import (
    DEMO,
    DEMO_TRUTH,
    TEST_DATA,
    StartWyoming,
    cli,
    db_rows,
    run_daemon,
    status_json,
    wait_for,
)

SHORT = TEST_DATA / "ls_103_0000.flac"  # one utterance: a quick real start-up of the daemon
# A stop must end well within systemd's TimeoutStopSec=30 (systemd/meraudiod.service), which
# then SIGKILLs.
STOP_S: Final = 20.0


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


def start_waiting_for(
    env: dict[str, str], holder: sqlite3.Connection, said: str, wait_more_s: float = 0.0
) -> None:
    """Start the daemon on a file while `holder` holds the write lock: it says `said` once
    and waits (still so `wait_more_s` later); the lock released, it goes on and ends well."""
    proc = run_daemon(env, source=f"file:{SHORT}")
    out = Output(proc.stderr)
    try:
        wait_for(lambda: said in out.text, 20, "the daemon to say it waits for the lock")
        time.sleep(wait_more_s)
        assert proc.poll() is None, out.text
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert proc.wait(timeout=120) == 0, out.text
    out.join()
    assert out.text.count("locked by another process") == 1, out.text
    assert "Traceback" not in out.text


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
    said = f"database {db} is locked by another process"
    start_waiting_for(env, holder, said, wait_more_s=3)  # two more looks at least
    assert len(db_rows(env, "SELECT id FROM recordings")) == 1


def test_a_start_that_must_migrate_while_another_process_holds_the_write_lock_says_it_waits(
    env: dict[str, str],
) -> None:
    """A database of an older meraudiod (schema version 1, in WAL as it kept it), its write
    lock held by another process. Before, the migration waited out the 30 s busy timeout in
    silence, then the start exited 1 with `cannot open database ...: database is locked`.
    Now it says at once, in one line naming the file and what to do, that it waits, as a
    start on a current database does, and migrates once the lock is gone."""
    db = _db(env)
    db.parent.mkdir(parents=True, exist_ok=True)
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(MIGRATIONS[0] + "\nPRAGMA user_version=1;")
    old.close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a backup, an admin's sqlite3 shell
    said = f"database {db} is locked by another process"
    try:
        t0 = time.monotonic()
        status = cli("status", env=env)  # a command: the same line, at once, exit 1
        assert time.monotonic() - t0 < 15
        assert status.returncode == 1, status.stderr
        assert status.stderr.splitlines() == [
            f"Error: {said} (a transaction left open: an sqlite3 shell, a backup, a purge):"
            " end that transaction or process"
        ], status.stderr
    except BaseException:
        holder.close()
        raise
    start_waiting_for(env, holder, said)
    version = db_rows(env, "PRAGMA user_version")[0][0]
    assert version == len(MIGRATIONS)
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


def two_utterances(folder: Path) -> Path:
    """A file of two short utterances of the demo, its second (10.4-12.9 s) and its fifth
    (30.7-33.5 s), with the silence around them, played from 0.8-3.3 s and 5.1-7.9 s (the
    demo's first two end at 12.9 s), then 25 s of silence: the stream goes on past a stop."""
    demo = decode_file(DEMO)

    def at(first_s: float, last_s: float) -> Int16Array:
        return demo[int(first_s * SAMPLE_RATE_HZ) : int(last_s * SAMPLE_RATE_HZ)]

    silence = np.zeros(25 * SAMPLE_RATE_HZ, dtype=np.int16)
    path = folder / "two-utterances.flac"
    soundfile.write(path, np.concatenate([at(9.6, 14.0), at(30.0, 34.5), silence]), SAMPLE_RATE_HZ)
    return path


def _stopped_under_the_write_lock(
    env: dict[str, str], folder: Path
) -> tuple[int, float, Output, float]:
    """Two utterances played at real time (two_utterances): the first (0.8-3.3 s) saved,
    then another process takes the write lock (a backup, an admin's sqlite3 shell), so the
    second (5.1-7.9 s) waits for it; SIGTERM once `status` counts it waiting. The exit code,
    how long the stop took, what the daemon said, and the wall clock when it was ready."""
    proc = run_daemon(env, "--realtime", source=f"file:{two_utterances(folder)}")
    out = Output(proc.stderr)
    holder: sqlite3.Connection | None = None
    try:
        wait_for(lambda: "ready:" in out.text, 120, "the daemon to be ready", poll_s=0.05)
        ready_at = time.time()
        wait_for(lambda: db_rows(env, "SELECT id FROM recordings"), 30, "the first recording")
        holder = sqlite3.connect(_db(env), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        # `status` tells what waits: read from the heartbeat (the database is read as usual).
        wait_for(
            lambda: status_json(env)["unsaved"] == {"recordings": 1, "audio": 0, "kept_in": None},
            20,
            "status to count the recording waiting in memory",
        )
        code, stop_s = stopped(proc, out)
    finally:
        _let_go(holder, proc)
    out.join()
    return code, stop_s, out, ready_at


@pytest.mark.parametrize("mqtt", ["off", "broker"])
def test_a_stop_while_another_process_holds_the_write_lock_is_prompt_and_says_what_it_loses(
    env: dict[str, str], mqtt: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """SIGTERM while another process holds the write lock and an utterance waits to be saved.
    Before, the stop took 120.7 s (the listener's three tries on the way out waited out the
    30 s busy timeout each, then it died with a traceback, exit 1): systemd's
    TimeoutStopSec=30 SIGKILLs it first. Now it ends within seconds, says in one line per
    recording what it could not save, and loses nothing committed. With MQTT, the outbox's
    delivered events it cannot delete stay, sent again at the next start."""
    if mqtt == "broker":
        broker: Broker = request.getfixturevalue("broker")
        env = {
            **env,
            "MERAUDIOD_MQTT__ENABLED": "true",
            "MERAUDIOD_MQTT__HOST": "127.0.0.1",
            "MERAUDIOD_MQTT__PORT": str(broker.port),
        }
    code, stop_s, out, _ = _stopped_under_the_write_lock(env, tmp_path)
    print(f"stopped in {stop_s:.1f} s")
    assert code == 0, out.text
    assert "Traceback" not in out.text
    lost = re.findall(
        r"database locked by another process: recording of [\d.]+ s lost on stopping", out.text
    )
    assert len(lost) == 1, out.text
    rows = db_rows(env, "SELECT audio_path FROM recordings")
    assert len(rows) == 1  # the one committed before the lock
    assert (Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio" / rows[0]["audio_path"]).is_file()
    assert not list(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).rglob("*.part"))


def test_a_recording_the_locked_database_did_not_take_is_kept_over_the_stop_and_saved(
    env: dict[str, str], tmp_path: Path
) -> None:
    """As above, with a runtime directory (the unit's /run/meraudiod, storage.run_dir): the
    utterance the database did not take is kept there over the stop, and the next start
    saves and transcribes it, with its own time stamp. Before, it was lost on stopping."""
    run_dir = tmp_path / "run"
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    code, _, out, ready_at = _stopped_under_the_write_lock(env, tmp_path)
    assert code == 0 and "Traceback" not in out.text, out.text
    assert "lost on stopping" not in out.text, out.text
    kept = re.findall(
        r"database locked by another process: 1 recording \(([\d.]+) s\) kept in (\S+) until"
        r" the daemon listens again",
        out.text,
    )
    assert kept and kept[0][1] == str(run_dir / "unsaved"), out.text
    (file,) = (run_dir / "unsaved").iterdir()
    (owner,) = db_rows(env, "SELECT value FROM kv WHERE key='database_id'")
    assert file.name.endswith(f".{owner['value']}.npz"), file  # kept for this database
    assert len(db_rows(env, "SELECT id FROM recordings")) == 1
    assert status_json(env)["unsaved"] == {"recordings": 1, "audio": 0, "kept_in": str(run_dir)}
    said = cli("status", env=env).stdout
    assert f"unsaved          1 recording kept in {run_dir} until the next start\n" in said

    again = run_daemon(env)  # no audio: it only takes back what was kept and transcribes it
    _, err = again.communicate(timeout=300)
    log = err.decode()
    assert again.returncode == 0 and "Traceback" not in log, log
    assert f"1 recording the database did not take taken back from {run_dir}/unsaved" in log
    rows = db_rows(env, "SELECT started_at, duration_s, status FROM recordings ORDER BY 1")
    assert [r["status"] for r in rows] == ["done", "done"], rows
    assert rows[1]["duration_s"] == pytest.approx(float(kept[0][0]), abs=0.05)
    # The file's second utterance starts 5.1 s in (4.8 s with its pre-roll), before the stop
    # (once it was closed, 8.6 s in, and counted): its time stamp is the first run's.
    assert ready_at - 1 < rows[1]["started_at"] < ready_at + 8, (ready_at, rows)
    assert not file.exists() and not list((run_dir / "unsaved").iterdir())
    assert status_json(env)["unsaved"] == {"recordings": 0, "audio": 0, "kept_in": str(run_dir)}
    assert "unsaved" not in cli("status", env=env).stdout
    assert not db_rows(env, "SELECT key FROM kv WHERE key LIKE 'unsaved%'")


def test_the_end_of_a_pipe_waits_for_the_lock_and_loses_nothing(env: dict[str, str]) -> None:
    """stdin ends while another process holds the write lock. A live source's listener
    waits 1 s at most for the lock while frames come (the utterance then waits in memory);
    at the end of the pipe no frame is left to read, so it waits as a file's does and saves
    it once the lock is free. (Not waiting there, the utterance was `lost on stopping`
    without a runtime directory, though nothing was stopping.)"""
    db = _db(env)
    proc = run_daemon(env)  # --source stdin
    out = Output(proc.stderr)
    try:
        wait_for(lambda: "ready:" in out.text, 120, "the daemon to be ready")
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        silence = np.zeros(2 * SAMPLE_RATE_HZ, np.int16)
        assert proc.stdin is not None
        proc.stdin.write(np.concatenate([decode_file(SHORT), silence]).tobytes())
        proc.stdin.close()  # the end of the pipe, the utterance not yet taken
        wait_for(lambda: "recordings wait in memory" in out.text, 30, "it to wait in memory")
        time.sleep(2)  # the pipe has ended meanwhile
        holder.execute("ROLLBACK")
        holder.close()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out.join()
    assert code == 0 and "lost" not in out.text and "Traceback" not in out.text, out.text
    assert [r["status"] for r in db_rows(env, "SELECT status FROM recordings")] == ["done"]


def test_a_stage_connection_waits_for_the_lock_while_running_and_briefly_once_stopping(
    settings: Settings,
) -> None:
    """The slices a stage's connection waits in: while running it still waits for the lock
    (not given up after one slice), a caller's shorter busy timeout (the clock's restamp)
    still holds, and once stopping all its waits together last about 3 s."""
    db = settings.storage.db_path
    open_db(db).close()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    stop = threading.Event()
    conn = open_db(db, stop=stop)
    try:
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(2.0, lambda: holder.execute("ROLLBACK")).start()
        t0 = time.monotonic()
        with Transaction(conn):
            pass
        assert 1.8 < time.monotonic() - t0 < 5

        holder.execute("BEGIN IMMEDIATE")
        conn.execute("PRAGMA busy_timeout=300")
        t0 = time.monotonic()
        with pytest.raises(sqlite3.OperationalError), Transaction(conn):
            pass
        assert time.monotonic() - t0 < 1.5
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 300
        conn.execute("PRAGMA busy_timeout=30000")

        threading.Timer(1.0, stop.set).start()
        t0 = time.monotonic()
        with pytest.raises(sqlite3.OperationalError), Transaction(conn):
            pass
        assert 3.5 < time.monotonic() - t0 < 6  # 1 s running, then 3 s stopping
        t0 = time.monotonic()
        with pytest.raises(sqlite3.OperationalError), Transaction(conn):
            pass
        assert time.monotonic() - t0 < 1.0  # the stop's 3 s are used up
    finally:
        conn.close()
        holder.close()


def _job(env: dict[str, str], job_id: int) -> tuple[str, int, int]:
    row = db_rows(env, f"SELECT state, attempts, crashes FROM jobs WHERE id={job_id}")[0]
    return (str(row["state"]), int(row["attempts"]), int(row["crashes"]))


# The daemon, SIGKILLed by itself once its worker is done with its first job (jobs.done_working):
# systemd's SIGKILL after TimeoutStopSec, at the first moment the job is no longer in hand.
_DAEMON_KILLED_ONCE_DONE_WITH_A_JOB: Final = """
import os, runpy, signal, sys
from meraudiod import jobs
done_working = jobs.done_working

def killed_once_done(runtime_dir, job_id):
    done_working(runtime_dir, job_id)
    os.kill(os.getpid(), signal.SIGKILL)

jobs.done_working = killed_once_done
sys.argv = ["meraudiod", *sys.argv[1:]]
runpy.run_module("meraudiod", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("then", ["exits", "sigkilled"])
def test_a_job_left_by_a_stop_while_another_process_holds_the_write_lock_is_no_crash(
    env: dict[str, str], then: str, tmp_path: Path
) -> None:
    """SIGTERM while another process holds the write lock and the worker waits for it to
    store a transcript: the job stays `running` (the database cannot be written). Before, the
    next start gave it back as a crash of that job, so three such stops in a row failed the
    recording for good. Now the worker's note of the job in hand (jobs.note_working) is
    gone once it gives the job up, and the next start gives it back with no crash counted,
    also when the stopping process is SIGKILLed right after (systemd's TimeoutStopSec: here
    the process kills itself as its worker lets the job go; a test's kill once came after
    the process had exited)."""
    played = two_utterances(tmp_path)  # at real time: its first recording closed 4 s in
    if then == "exits":
        proc = run_daemon(env, "--realtime", source=f"file:{played}")
    else:  # its first job is the one held under the lock: it cannot be done before
        run = ["run", "--source", f"file:{played}", "--realtime"]
        proc = subprocess.Popen(
            [sys.executable, "-c", _DAEMON_KILLED_ONCE_DONE_WITH_A_JOB, *run],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    out = Output(proc.stderr)
    said = "transcript not stored on stopping, database locked by another process"
    holder: sqlite3.Connection | None = None
    try:
        wait_for(lambda: "ready:" in out.text, 120, "the daemon to be ready", poll_s=0.05)
        running = "SELECT id FROM jobs WHERE state='running'"
        wait_for(lambda: db_rows(env, running), 120, "a job claimed", poll_s=0.01)
        holder = sqlite3.connect(_db(env), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # a backup, an admin's sqlite3 shell
        job_id, state = holder.execute("SELECT id, state FROM jobs ORDER BY id").fetchone()
        assert state == "running"  # claimed, its transcript not stored: now it cannot be
        time.sleep(3)  # transcribed meanwhile: the worker waits for the lock to store it
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_S)
    finally:
        _let_go(holder, proc)
    out.join()
    assert code == (0 if then == "exits" else -signal.SIGKILL), out.text
    assert said in out.text
    assert _job(env, job_id) == ("running", 0, 0)
    again = run_daemon(env, source=f"file:{SHORT}")
    again_out = Output(again.stderr)
    assert again.wait(timeout=120) == 0, again_out.text
    again_out.join()
    assert _job(env, job_id) == ("done", 0, 0), again_out.text


def _let_go(holder: sqlite3.Connection | None, proc: subprocess.Popen[bytes]) -> None:
    """A test's way out: the lock holder closed, the daemon killed if still running."""
    if holder is not None:
        holder.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stopped(proc: subprocess.Popen[bytes], out: Output) -> tuple[int, float]:
    """SIGTERM: its exit code and how long it took to stop (at most STOP_S, or a failure
    with what it said; the callers' `finally` kills it)."""
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"not stopped in {STOP_S} s: {out.text}") from None
    return code, time.monotonic() - asked


@contextmanager
def paused(
    script: str,
    args: list[str],
    env: dict[str, str],
    prefix: Sequence[str] = (),
    stdin: int = subprocess.DEVNULL,
) -> Iterator[tuple[subprocess.Popen[bytes], Callable[[], None]]]:
    """`PREFIX python -c SCRIPT TELL TOLD ARGS`: a meraudiod that stops at a point of its
    script's choosing (it writes "take" on the fd TELL and waits for a byte on the fd TOLD).
    Yields it once it is there (its stderr a pipe) and `go`, which lets it on; killed if
    still running at the end. PREFIX is a command that execs the rest (nsenter)."""
    tell_r, tell_w = os.pipe()
    told_r, told_w = os.pipe()
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", script, str(tell_w), str(told_r), *args],
        env=env,
        pass_fds=(tell_w, told_r),
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(tell_w)
    os.close(told_r)

    def go() -> None:
        os.write(told_w, b"!")

    try:
        assert os.read(tell_r, 4) == b"take", "it ended before its pause"
        yield proc, go
    finally:
        os.close(tell_r)
        os.close(told_w)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# The daemon, with the other process's lock taken at the start's recovery (after the start's
# lock check, before its first write): its look at when the machine booted (jobs.boot_time)
# tells the test on FD TELL, and waits for a byte on FD TOLD (the lock is held).
_DAEMON_WHOSE_RECOVERY_A_LOCK_OUTRUNS: Final = """
import os, runpy, sys
import meraudiod.daemon
tell, told = int(sys.argv[1]), int(sys.argv[2])
meraudiod.daemon._STORE_WAIT_S = float(sys.argv[3])
done = []

def hook(event, args):
    if event == "open" and args and args[0] == "/proc/stat" and not done:
        done.append(True)
        os.write(tell, b"take")
        os.read(told, 1)

sys.addaudithook(hook)
sys.argv = ["meraudiod", *sys.argv[4:]]
runpy.run_module("meraudiod", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("held", ["briefly", "past the wait"])
def test_a_lock_taken_between_the_starts_check_and_its_recovery_is_waited_for_and_said(
    env: dict[str, str], held: str
) -> None:
    """Another process takes the write lock after the start found it free, before the
    start's recovery (jobs left running, deleted text) writes. Before, the recovery waited
    out SQLite's 30 s busy timeout in silence, then the start exited 1 with `Error:
    OperationalError: database is locked`, no file named. Now it is the start's own wait:
    the line naming the file at once, the lock waited for (up to 120 s; 2 s here when held
    past it), then exit 1 with that line, `waited 2 s`."""
    db = _db(env)
    open_db(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    wait_s = "120" if held == "briefly" else "2"
    run = [wait_s, "run", "--source", f"file:{SHORT}"]
    said = f"database {db} is locked by another process"
    with paused(_DAEMON_WHOSE_RECOVERY_A_LOCK_OUTRUNS, run, env) as (proc, go):
        out = Output(proc.stderr)
        try:
            holder.execute("BEGIN EXCLUSIVE")  # an admin's sqlite3 shell, left in a transaction
            t0 = time.monotonic()
            go()
            if held == "briefly":
                wait_for(lambda: said in out.text, 15, "the start to say it waits for the lock")
                holder.execute("ROLLBACK")
            code = proc.wait(timeout=120)
            took_s = time.monotonic() - t0
        finally:
            holder.close()
    out.join()
    assert "Traceback" not in out.text
    assert out.text.count(said) == (1 if held == "briefly" else 2), out.text
    if held == "briefly":
        assert code == 0, out.text
        assert len(db_rows(env, "SELECT id FROM recordings")) == 1
    else:
        assert code == 1, out.text
        assert took_s < 15, out.text
        last = out.text.splitlines()[-1]
        assert last.startswith(f"Error: {said} (") and last.endswith("waited 2 s"), out.text


def test_a_stop_during_the_checkpoint_after_a_delete_is_prompt(env: dict[str, str]) -> None:
    """The log is checkpointed after a delete (the deleted words leave it), which waits for
    every other process's transaction, holding the write lock meanwhile: here a backup's
    read (an admin's shell holding the write lock is the same wait). Before, that wait was
    SQLite's plain 30 s busy timeout, not the stages' slices: a SIGTERM during the
    retention sweep's checkpoint took up to 30 s, and systemd SIGKILLs at 30 s. Now it ends
    within seconds of the stop, the delete committed."""
    first = run_daemon(env, source=f"file:{SHORT}")  # one recording, transcribed
    first_out = Output(first.stderr)
    assert first.wait(timeout=120) == 0, first_out.text
    first_out.join()
    db = _db(env)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE recordings SET started_at = started_at - 10 * 86400")
    conn.close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN")  # a backup's read: its snapshot is older than the delete
    holder.execute("SELECT COUNT(*) FROM recordings").fetchone()
    proc = run_daemon({**env, "MERAUDIOD_RETENTION__TEXT_DAYS": "1"})  # stdin: runs on
    out = Output(proc.stderr)
    try:
        wait_for(lambda: not db_rows(env, "SELECT id FROM recordings"), 60, "the sweep")
        time.sleep(1)  # the sweep's checkpoint waits for the backup's read
        code, stop_s = stopped(proc, out)
    finally:
        _let_go(holder, proc)
    out.join()
    print(f"stopped in {stop_s:.1f} s")
    assert code == 0, out.text
    assert "Traceback" not in out.text
    assert stop_s < 10, out.text


def test_the_checkpoint_after_a_delete_waits_for_the_lock_briefly(settings: Settings) -> None:
    """The write lock taken by another process (an admin's shell) between a delete's commit
    and its checkpoint, on a stage's connection (the retention sweep's, the command
    runner's). Before, the checkpoint waited out SQLite's 30 s busy timeout whatever the
    stop, holding off every writer; now it gives up after 2 s (and the next sweep or start
    does it: tests/test_retention.py)."""
    db = settings.storage.db_path
    open_db(db).close()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn = open_db(db, stop=threading.Event())

    def at_statement(sql: str) -> None:  # SQLite's trace: before the statement runs
        if "wal_checkpoint" in sql and not holder.in_transaction:
            holder.execute("BEGIN IMMEDIATE")

    conn.set_trace_callback(at_statement)
    try:
        t0 = time.monotonic()
        forget_deleted_text(conn)
        took_s = time.monotonic() - t0
        assert holder.in_transaction  # taken at the checkpoint, after the delete's commit
    finally:
        conn.close()
        holder.close()
    assert 1.9 < took_s < 4, took_s


def test_a_job_the_stop_cannot_give_back_while_another_process_holds_the_lock_is_no_crash(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    """SIGTERM while the worker waits on a hung Wyoming server: the request is abandoned and
    its job given back, a write, which another process's write lock keeps from it. Before,
    the job stayed `running` unsaid and the next start counted a crash against it; now the
    stop says so, and the next start gives it back with no crash counted."""
    from .test_wyoming import hung_server_daemon

    slow = {"MERAUDIOD_ASR__WYOMING__DEADLINE_BASE_S": "120"}
    with hung_server_daemon(env, start_wyoming, **slow) as (_, run_env, proc):
        running = "SELECT id FROM jobs WHERE state='running'"
        wait_for(lambda: db_rows(run_env, running), 120, "a request in flight")
        # The demo's utterances all saved first: the lock then keeps the stop from the job's
        # give-back alone (an utterance still being saved would wait for it another 3 s).
        heard = "SELECT id FROM recordings"
        wait_for(lambda: len(db_rows(run_env, heard)) == len(DEMO_TRUTH), 60, "the demo saved")
        holder = sqlite3.connect(_db(env), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # a backup, an admin's sqlite3 shell
            (job_id,) = holder.execute(running).fetchone()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=STOP_S)
        finally:
            holder.close()
    said = stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in said, said
    assert _job(env, job_id) == ("running", 0, 0)
    again = run_daemon(env, source=f"file:{SHORT}")  # the local model this time
    again_out = Output(again.stderr)
    assert again.wait(timeout=120) == 0, again_out.text
    again_out.join()
    assert _job(env, job_id) == ("done", 0, 0), again_out.text
    assert re.search(
        rf"job {job_id} \(recording \w+\): tcp://[\d.:]+: request abandoned on stopping, not"
        " given back, database locked by another process: transcribed again at the next start",
        said,
    ), said


# The daemon, its worker paused on the first job it claims, as it reads the job's audio: it
# tells the test on FD TELL and waits for a byte on FD TOLD.
WORKER_PAUSED_ON_ITS_JOB: Final = """
import os, runpy, sys
from meraudiod.worker import Worker
tell, told = int(sys.argv[1]), int(sys.argv[2])
read_audio = Worker._read_audio
done = []

def paused(path):
    if not done:
        done.append(True)
        os.write(tell, b"take")
        os.read(told, 1)
    return read_audio(path)

Worker._read_audio = staticmethod(paused)
sys.argv = ["meraudiod", *sys.argv[3:]]
runpy.run_module("meraudiod", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("audio", ["unreadable", "gone"])
def test_a_failure_the_stop_cannot_store_while_another_process_holds_the_lock_is_no_crash(
    settings: Settings, env: dict[str, str], audio: str
) -> None:
    """SIGTERM while another process holds the write lock and the worker fails a job: its
    audio unreadable (jobs.fail) or gone (jobs.fail_for_good). Before, that write, refused
    by the lock, left the job `running` unsaid, and the next start counted a crash against
    it. Now the stop says so, and the next start gives it back with no crash counted (the
    failure is then stored there, its attempts counted)."""
    conn = open_db(settings.storage.db_path)
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    assert store.save(decode_file(SHORT), source="x", start_s=0.0, started_at=1000.0)
    (job_id, stored), *_ = conn.execute("SELECT j.id, r.audio_path FROM jobs j, recordings r")
    conn.close()
    if audio == "unreadable":
        (settings.storage.audio_dir / stored).write_bytes(b"not a sound file")
    else:
        (settings.storage.audio_dir / stored).unlink()
    holder = sqlite3.connect(_db(env), isolation_level=None)
    run = ["run", "--source", "stdin"]
    with paused(WORKER_PAUSED_ON_ITS_JOB, run, env) as (proc, go):
        out = Output(proc.stderr)
        try:
            holder.execute("BEGIN IMMEDIATE")  # a backup, an admin's sqlite3 shell
            proc.send_signal(signal.SIGTERM)
            go()
            code = proc.wait(timeout=STOP_S)
        finally:
            holder.close()
    out.join()
    assert code == 0, out.text  # (the failure itself is logged with its traceback)
    assert _job(env, job_id) == ("running", 0, 0)
    again = run_daemon(env, source=f"file:{SHORT}")
    again_out = Output(again.stderr)
    assert again.wait(timeout=120) == 0, again_out.text
    again_out.join()
    tries = 3 if audio == "unreadable" else 1  # asr.max_attempts; lost audio fails at once
    assert _job(env, job_id) == ("failed", tries, 0), again_out.text
    assert re.search(
        rf"job {job_id} \(recording \w+\): .+ not stored on stopping, database locked by"
        " another process: transcribed again at the next start",
        out.text,
    ), out.text


# A command, with the other process's lock taken after its look for the lock, just before it
# migrates (db.migrate): it tells the test on FD TELL and waits for a byte on FD TOLD.
_COMMAND_WHOSE_MIGRATION_A_LOCK_OUTRUNS: Final = """
import os, runpy, sys
import meraudiod.db as db
tell, told = int(sys.argv[1]), int(sys.argv[2])
migrate = db.migrate

def migrate_once_the_lock_is_taken(conn):
    os.write(tell, b"take")
    os.read(told, 1)
    return migrate(conn)

db.migrate = migrate_once_the_lock_is_taken
sys.argv = ["meraudiod", *sys.argv[3:]]
runpy.run_module("meraudiod", run_name="__main__", alter_sys=True)
"""


def test_a_lock_taken_between_the_look_and_the_migration_is_said_at_once(
    env: dict[str, str],
) -> None:
    """An older meraudiod's database, its write lock taken by another process after the
    look for it, before the migration. Before, the migration waited out the 30 s busy
    timeout in silence, then `cannot open database ...: database is locked`. Now it is the
    look's own line, naming the file and what to do, at once (a start then waits for it)."""
    db = _db(env)
    db.parent.mkdir(parents=True, exist_ok=True)
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(MIGRATIONS[0] + "\nPRAGMA user_version=1;")
    old.close()
    holder = sqlite3.connect(db, isolation_level=None)
    with paused(_COMMAND_WHOSE_MIGRATION_A_LOCK_OUTRUNS, ["status"], env) as (proc, go):
        try:
            holder.execute("BEGIN IMMEDIATE")  # a backup, an admin's sqlite3 shell
            t0 = time.monotonic()
            go()
            _, raw = proc.communicate(timeout=60)
            took_s = time.monotonic() - t0
        finally:
            holder.close()
    stderr = raw.decode()
    assert proc.returncode == 1, stderr
    assert stderr.splitlines() == [
        f"Error: database {db} is locked by another process (a transaction left open: an"
        " sqlite3 shell, a backup, a purge): end that transaction or process"
    ], stderr
    assert took_s < 15, took_s
