"""A storage the kernel remounted read-only (the SD card's classic failure: errors=remount-ro),
under a running daemon: a real bind mount remounted read-only in the daemon's own mount
namespace, and a real ext4 the kernel itself turns read-only after an error."""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from meraudiod import db
from meraudiod.audio import decode_file
from meraudiod.recordings import audio_name
from tests.conftest import DEMO, TEST_DATA, cli, db_rows, needs_root, wait_for
from tests.httpd import HttpDaemon, daemon_env
from tests.test_full_disk import FullDiskDaemon, _recordings, full_disk_daemon

SHORT = TEST_DATA / "ls_103_0000.flac"  # one utterance


def _mount(daemon: FullDiskDaemon, *options: str) -> None:
    """`mount OPTIONS` inside the daemon's mount namespace, as an admin would."""
    command = ["nsenter", "-t", str(daemon.proc.pid), "-m", "mount", *options]
    subprocess.run(command, check=True, capture_output=True)


def _status(daemon: FullDiskDaemon) -> dict[str, object]:
    answer = httpx.get(f"{daemon.url}/api/v1/status", timeout=30)
    assert answer.status_code == 200, answer.text
    data: dict[str, object] = answer.json()
    return data


@needs_root
def test_a_read_only_audio_directory_loses_no_recording(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The audio directory remounted read-only under the running daemon. Before: the listener
    died on the next utterance ("Read-only file system" twice in one chained traceback: the
    clean-up's unlink failed too), the utterance was lost, the daemon exited 1 and its restart
    refused (exit 78); an upload got 500 'internal error: OSError'; /health/ready said ready.
    Now the utterances are stored, their audio in memory until transcribed, said once; the
    status and readiness name the directory; an upload is refused with 507 naming it; once
    remounted read-write the audio is written again (said once more), the audio held in
    memory too, the daemon alive throughout."""
    speech = decode_file(DEMO).astype("<i2").tobytes()
    env = {**env, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "10"}
    with full_disk_daemon(env, tmp_path, "64m") as daemon:
        audio = daemon.point / "meraudiod" / "audio"
        _mount(daemon, "--bind", str(audio), str(audio))
        _mount(daemon, "-o", "remount,bind,ro", str(audio))

        answer = httpx.get(f"{daemon.url}/health/ready")
        assert answer.status_code == 503, answer.text
        disk = answer.json()["checks"]["disk"]
        assert not disk["ok"] and f"read-only file system: {audio}" in disk["detail"], disk
        with httpx.Client(base_url=daemon.url, timeout=60) as client:
            answer = client.post(
                "/api/v1/analysis/upload", files={"file": ("demo.flac", DEMO.read_bytes())}
            )
            assert answer.status_code == 507, answer.text
            message = answer.json()["error"]["message"]
            assert message == f"read-only file system: {audio}; nothing was stored", message

        daemon.say(speech)
        stored = _recordings(daemon, 5)
        assert all(r["audio_path"] is None and r["text"] for r in stored), stored
        assert daemon.proc.poll() is None, daemon.log()
        wait_for(lambda: _status(daemon)["degraded"], 30, "the status degraded")
        degraded = str(_status(daemon)["degraded"])
        assert f"{audio}" in degraded and "read-only file system" in degraded.lower(), degraded

        _mount(daemon, "-o", "remount,bind,rw", str(audio))
        wait_for(lambda: httpx.get(f"{daemon.url}/health/ready").status_code == 200, 30, "ready")
        # The five held in memory are written (before, they kept only their transcripts).
        _recordings(daemon, 5, audio_written=True, timeout_s=30)
        daemon.say(speech)
        written = _recordings(daemon, 10)
        assert all(r["audio_path"] is not None and r["text"] for r in written), written
        files = sorted((daemon.disk / "meraudiod" / "audio").rglob("*"))
        names = sorted(p.name for p in files if p.is_file())
        assert names == sorted(f"{r['id']}.flac" for r in written), names
        wait_for(lambda: _status(daemon)["degraded"] is None, 30, "the status clear again")
        log = daemon.log()
        assert log.count(f"cannot write audio to {audio} (Read-only file system)") == 1, log
        assert log.count(f"can write audio to {audio} again") == 1, log
        assert "Traceback" not in log, log
        assert daemon.stop() == 0, log


def test_what_a_read_only_storage_raises_is_a_write_that_waiting_may_mend() -> None:
    """The errors a storage that cannot be written raises, from the OS and from SQLite; not
    a damaged database, a missing file or a busy one."""
    assert db.cannot_write(OSError(errno.EROFS, "Read-only file system"))
    assert db.cannot_write(OSError(errno.ENOSPC, "No space left on device"))
    assert not db.cannot_write(OSError(errno.ENOENT, "No such file or directory"))
    assert not db.cannot_write(sqlite3.DatabaseError("database disk image is malformed"))
    assert not db.cannot_write(ValueError("no"))


# The SD card's own failure: ext4 (here without a journal, so that it can be remounted
# read-write again without a fsck) mounted errors=remount-ro, and an error the kernel meets
# (ext4's trigger_fs_error): every write from then on is refused, through files already open
# too, which a remount of a mount with open files cannot do.
EXT4 = r"""
set -eu
mount --make-rprivate /
mount -o loop,errors=remount-ro "$IMAGE" "$POINT"
"$PY" -c '
import os, sqlite3, subprocess, sys
from meraudiod.db import cannot_write
point = sys.argv[1]
conn = sqlite3.connect(os.path.join(point, "x.db"), isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE t (x)")
device = subprocess.check_output(["findmnt", "-n", "-o", "SOURCE", point], text=True)
with open(f"/sys/fs/ext4/{os.path.basename(device.strip())}/trigger_fs_error", "w") as f:
    f.write("1")
for what in ("open", "new", "file"):
    try:
        if what == "open":
            conn.execute("INSERT INTO t VALUES (1)")
        elif what == "new":
            sqlite3.connect(os.path.join(point, "x.db")).execute("INSERT INTO t VALUES (2)")
        else:
            open(os.path.join(point, "f"), "wb")
    except (OSError, sqlite3.Error) as exc:
        print(what, getattr(exc, "sqlite_errorname", exc.args[0]), cannot_write(exc))
' "$POINT"
"""


@needs_root
def test_the_errors_of_a_file_system_the_kernel_made_read_only_are_classified(
    tmp_path: Path,
) -> None:
    """What SQLite and the OS say once the kernel turned the card read-only: an open
    connection's write is SQLITE_IOERR_WRITE, a new one's SQLITE_READONLY, a file's EROFS;
    each is a write that waiting (a remount) may mend."""
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices")
    image = tmp_path / "card.img"
    with image.open("wb") as out:
        out.truncate(32 * 1024 * 1024)
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    subprocess.run(
        [
            shutil.which("mkfs.ext4", path=path) or "mkfs.ext4",
            "-q",
            "-O",
            "^has_journal",
            str(image),
        ],
        check=True,
    )
    point = tmp_path / "card"
    point.mkdir()
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", EXT4],
        env={
            **os.environ,
            "PATH": path,
            "PY": sys.executable,
            "IMAGE": str(image),
            "POINT": str(point),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    said = done.stdout.splitlines()
    assert said == [
        "open SQLITE_IOERR_WRITE True",
        "new SQLITE_READONLY True",
        f"file {errno.EROFS} True",
    ], shlex.join(said) + done.stderr


@needs_root
@pytest.mark.parametrize("runtime_dir", ["none", "tmpfs"])
def test_a_card_the_kernel_made_read_only_keeps_the_daemon_up(
    env: dict[str, str], tmp_path: Path, runtime_dir: str
) -> None:
    """The data directory on an ext4 mounted errors=remount-ro, which then meets an error:
    the audio and the database (through the connections already open: SQLITE_IOERR_WRITE)
    are refused. Before, the listener died on the next utterance, the daemon exited 1 and its
    restart refused (exit 78), what was said lost. Now the utterances wait in memory, said
    once; the daemon stays up, not ready, naming the database; stopped, it says what it could
    not keep. (This kernel's ext4 stays read-only until a fsck: nothing to wait for here.)

    With a runtime directory (storage.run_dir, another file system, as installed) the
    utterances the database did not take are kept there over the stop; before, they were
    lost as without one. The card mounted again (a fsck, a reboot that keeps /run), the
    next start stores and transcribes them."""
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices")
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    image = tmp_path / "card.img"
    with image.open("wb") as out:
        out.truncate(64 * 1024 * 1024)
    mkfs = shutil.which("mkfs.ext4", path=path) or "mkfs.ext4"
    subprocess.run([mkfs, "-q", "-O", "^has_journal", str(image)], check=True)
    card = tmp_path / "disk" / "meraudiod"
    mount = shlex.join(["mount", "-o", "loop,errors=remount-ro", str(image), str(card)])
    before = f"mkdir {shlex.quote(str(card))} && {mount} &&"
    env = {**env, "PATH": path, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "10"}
    run_dir = tmp_path / "run"
    if runtime_dir == "tmpfs":
        env["MERAUDIOD_STORAGE__RUN_DIR"] = str(run_dir)
    speech = decode_file(DEMO).astype("<i2").tobytes()
    daemon = FullDiskDaemon(env, tmp_path, "1m", before=before)
    try:
        daemon.wait_ready()
        source = ["nsenter", "-t", str(daemon.proc.pid), "-m", "findmnt", "-no", "SOURCE"]
        device = subprocess.run([*source, str(card)], capture_output=True, text=True, check=True)
        trigger = Path("/sys/fs/ext4") / Path(device.stdout.strip()).name / "trigger_fs_error"
        trigger.write_text("1")
        daemon.say(speech)
        waiting = "recordings wait in memory (at most 32) until it can be written"
        wait_for(lambda: waiting in daemon.log(), 60, "the recordings waiting")
        time.sleep(6)  # one more try to save them, at least
        assert daemon.proc.poll() is None, daemon.log()
        answer = httpx.get(f"{daemon.url}/health/ready")
        assert answer.status_code == 503, answer.text
        disk = answer.json()["checks"]["disk"]
        assert f"cannot write the database {card / 'meraudiod.db'}" in disk["detail"], disk
        answer = httpx.post(
            f"{daemon.url}/api/v1/analysis/upload",
            files={"file": ("demo.flac", DEMO.read_bytes())},
            timeout=60,
        )
        assert answer.status_code == 507, answer.text
        message = answer.json()["error"]["message"]
        assert message == f"cannot write {card}: Read-only file system; nothing was stored"
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert code == 0, log
    assert log.count(waiting) == 1, log
    assert "Traceback" not in log, log
    if runtime_dir == "none":
        assert log.count("lost on stopping") == 5, log
        return
    assert "lost on stopping" not in log, log
    kept = rf"database cannot be written: 5 recordings \([\d.]+ s\) kept in {run_dir}/unsaved"
    assert re.search(kept, log), log
    assert len(list((run_dir / "unsaved").iterdir())) == 5
    again_at = tmp_path / "again"
    again_at.mkdir()
    card = again_at / "disk" / "meraudiod"
    mount = shlex.join(["mount", "-o", "loop,errors=remount-ro", str(image), str(card)])
    before = f"mkdir {shlex.quote(str(card))} && {mount} &&"
    again = FullDiskDaemon(env, again_at, "1m", before=before)
    try:
        again.wait_ready()
        rows = _recordings(again, 5, timeout_s=120)
        assert "Dashwood" in str(rows[0]["text"]), rows
        assert list((run_dir / "unsaved").iterdir()) == []
    finally:
        assert again.stop() == 0, again.log()


@needs_root
def test_a_stdin_run_that_ends_on_a_read_only_disk_ends_as_any(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The data directory remounted read-only under `run --source stdin` once every
    recording was transcribed, then the input ends. Before, the run's last look for failed
    recordings to retry at once wrote to the database though none was waiting, and the run
    exited 1 with `Error: OperationalError: attempt to write a readonly database`, naming
    nothing (`run --source file:` too). Now a write the disk refuses there is no error: the
    run ends as any does, exit 0 (a recording still to transcribe waits for the disk, as the
    worker does)."""
    speech = decode_file(DEMO).astype("<i2").tobytes()
    env = {**env, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "10"}
    with full_disk_daemon(env, tmp_path, "64m") as daemon:
        daemon.say(speech)
        done = "SELECT id FROM recordings WHERE status='done'"
        wait_for(lambda: len(daemon.rows(done)) == 5, 120, "the demo's five transcribed")
        data = daemon.point / "meraudiod"
        _mount(daemon, "--bind", str(data), str(data))
        _mount(daemon, "-o", "remount,bind,ro", str(data))
        daemon.feeder.stop()
        assert daemon.proc.stdin is not None
        daemon.proc.stdin.close()  # the end of the input
        code = daemon.proc.wait(120)
    log = daemon.log()
    assert code == 0, log
    assert "Traceback" not in log and not [x for x in log.splitlines() if x.startswith("Error")]


@needs_root
def test_a_day_directory_the_daemon_may_not_write_loses_no_recording(
    env: dict[str, str],
) -> None:
    """Today's audio directory made by root (an `analyze` run as root, mode 0750) under a
    daemon that runs as its own user: the write is refused with EACCES, which was no refusal
    the listener knew (only a full or read-only disk). It died with a traceback, the
    utterance was lost, and every restart died the same way (found by fault injection).
    Now the audio is kept in memory as for a read-only directory, the refusal said in one
    line naming the directory; kept over the stop, it is written at the next start that can."""
    audio_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio"
    day = audio_dir / Path(audio_name("x", time.time(), "flac")).parent
    day.mkdir(parents=True)
    day.chmod(0o550)  # as the service's user without root's override: no writing here
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(audio_dir.parent.parent / "run")}
    first = cli("run", "--source", f"file:{SHORT}", env=env, as_user=True)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr, first.stderr
    assert f"cannot write audio to {day} (Permission denied)" in first.stderr, first.stderr
    (row,) = db_rows(env, "SELECT id, text, audio_path FROM recordings")
    assert row["text"] and row["audio_path"] is None, row
    day.chmod(0o750)
    again = cli("run", "--source", f"file:{SHORT}", env=env, as_user=True)
    assert again.returncode == 0, again.stderr
    rows = {r["id"]: r["audio_path"] for r in db_rows(env, "SELECT id, audio_path FROM recordings")}
    assert rows[row["id"]] is not None and (audio_dir / rows[row["id"]]).is_file(), rows


@needs_root
def test_an_upload_into_a_day_directory_the_daemon_may_not_write_is_refused_in_one_line(
    tmp_path: Path, models_dir: Path
) -> None:
    """Today's audio directory made by root, the daemon run as its own user: an upload got
    500 `internal error: PermissionError` with a traceback in the log (a reviewer). It is a
    storage refusal like a full or read-only disk: 507 naming the directory, nothing stored."""
    env = daemon_env(tmp_path, models_dir)
    audio_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio"
    day = audio_dir / Path(audio_name("x", time.time(), "flac")).parent
    day.mkdir(parents=True)
    day.chmod(0o550)
    server = HttpDaemon(env, as_user=True).start()
    try:
        with server.client() as client:
            answer = client.post(
                "/api/v1/analysis/upload", files={"file": ("demo.flac", DEMO.read_bytes())}
            )
    finally:
        assert server.stop() == 0, server.log()
    assert answer.status_code == 507, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith(f"cannot write {day}: Permission denied"), message
    assert "Traceback" not in server.log(), server.log()
