"""A device without a clock battery: its wall clock is days behind when the daemon starts
listening, and NTP steps it once the network is up.

The daemon's wall clock is shifted through a sitecustomize module on its PYTHONPATH that adds
the seconds written in a file to time.time() (the process's only source of wall-clock time),
so the test can step it while the real daemon runs; its boot clock is untouched, as NTP
leaves it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from meraudiod import wall_clock
from meraudiod.audio import SAMPLE_RATE_HZ, decode_file
from meraudiod.config import Settings
from meraudiod.db import open_db
from meraudiod.messages import bound_outbox

from .conftest import DEMO, db_rows, run_daemon, status_json, wait_for, wait_running

_SHIFT = """
import os, time

_file = os.environ["MERAUDIOD_TEST_CLOCK_SHIFT_FILE"]
_time, _time_ns, _read = time.time, time.time_ns, [0.0, -1.0]


def _shift_s():
    now = time.monotonic()
    if now - _read[1] > 0.05:
        try:
            with open(_file) as f:
                _read[0] = float(f.read())
        except (OSError, ValueError):
            pass
        _read[1] = now
    return _read[0]


time.time = lambda: _time() + _shift_s()
time.time_ns = lambda: _time_ns() + int(_shift_s() * 1e9)
"""
_DAYS_BEHIND = 10
_BYTES_PER_S = SAMPLE_RATE_HZ * 2
_PCM = decode_file(DEMO).tobytes()  # 16 kHz s16le


def _span(first_s: float, last_s: float) -> bytes:
    """The demo's audio from first_s to last_s."""
    return _PCM[int(first_s * SAMPLE_RATE_HZ) * 2 : int(last_s * SAMPLE_RATE_HZ) * 2]


# Two of the demo's shorter utterances, each with the silence around it (played at real time,
# the tests' wait is their length): its second (10.4-12.9 s) and its fifth (30.7-33.5 s).
_SECOND = _span(9.6, 14.0)
_FIFTH = _span(30.2, 34.7)


def _play(stdin: IO[bytes], pcm: bytes) -> None:
    """16 kHz s16le at real time, in half-second pieces, as a microphone delivers it."""
    piece = _BYTES_PER_S // 2
    for first in range(0, len(pcm), piece):
        stdin.write(pcm[first : first + piece])
        stdin.flush()
        time.sleep(0.5)


def shifted_clock(
    env: dict[str, str], tmp_path: Path, shift_s: float
) -> tuple[dict[str, str], Path]:
    """The environment of a daemon whose wall clock is shifted by the seconds in the file
    returned (shift_s to begin with)."""
    shift = tmp_path / "clock-shift-s"
    shift.write_text(str(shift_s))
    (tmp_path / "shift").mkdir()
    (tmp_path / "shift" / "sitecustomize.py").write_text(_SHIFT)
    return env | {
        "PYTHONPATH": str(tmp_path / "shift"),
        "MERAUDIOD_TEST_CLOCK_SHIFT_FILE": str(shift),
    }, shift


@dataclass
class _Behind:
    """A daemon on stdin whose wall clock is 10 days behind; the demo's fifth utterance
    (_FIFTH) played and saved."""

    daemon: subprocess.Popen[bytes]
    stdin: IO[bytes]
    shift: Path  # write the clock's shift in seconds here
    heard_from: float  # the true time just before it was played


@contextmanager
def _daemon_days_behind(env: dict[str, str], tmp_path: Path) -> Iterator[_Behind]:
    run_env, shift = shifted_clock(env, tmp_path, -_DAYS_BEHIND * 86400)
    daemon = run_daemon(run_env)
    assert daemon.stdin is not None
    try:
        wait_running(run_env, daemon)
        heard_from = time.time()
        _play(daemon.stdin, _FIFTH)
        deadline = time.monotonic() + 60
        while not db_rows(env, "SELECT id FROM recordings"):
            assert time.monotonic() < deadline, "the first utterance was never saved"
            time.sleep(0.2)
        yield _Behind(daemon, daemon.stdin, shift, heard_from)
    finally:
        daemon.kill()


def _assert_stamped_in(env: dict[str, str], heard_from: float, count: int) -> None:
    """`count` recordings, each stamped between heard_from and now by the true clock."""
    rows = db_rows(
        env, "SELECT started_at, ended_at, closed_at, duration_s FROM recordings ORDER BY start_s"
    )
    assert len(rows) == count
    for row in rows:
        assert heard_from - 5 < row["started_at"] < row["ended_at"] <= row["closed_at"], dict(row)
        assert row["closed_at"] <= time.time(), dict(row)
        assert abs(row["ended_at"] - row["started_at"] - row["duration_s"]) < 0.01, dict(row)


def test_recordings_follow_steps_of_the_wall_clock(env: dict[str, str], tmp_path: Path) -> None:
    """The clock 10 days behind, stepped to 3 days ahead (a wrong time server), then back to
    the true time: each step moves every recording of the run. Before: every recording kept
    the clock the run started with, 10 days in the past (so `retention.audio_days = 7`
    deleted speech heard minutes ago), also those made after NTP set the clock; and then a
    step moved only the recordings saved since the step before."""
    with _daemon_days_behind(env, tmp_path) as behind:
        (first,) = db_rows(env, "SELECT started_at FROM recordings")
        behind_s = behind.heard_from - first["started_at"]
        assert abs(behind_s - _DAYS_BEHIND * 86400) < 60, behind_s  # the shift took effect

        behind.shift.write_text(str(3 * 86400))  # forward by 13 days
        _play(behind.stdin, _span(14.0, 15.0))  # a second of the silence between two
        # Followed (the first recording moved) before the next step: a listener not run in
        # that second (a loaded machine) saw one step of +10 days instead of two.
        forward_s = (_DAYS_BEHIND + 3) * 86400
        moved = (
            f"SELECT id FROM recordings WHERE started_at > {first['started_at'] + forward_s - 60}"
        )
        wait_for(lambda: db_rows(env, moved), 30, "the step forward followed")
        behind.shift.write_text("0")  # back by 3 days
        _play(behind.stdin, _SECOND + _FIFTH)  # two more
        _, stderr = behind.daemon.communicate(timeout=180)  # stdin closed: end of the stream
    assert behind.daemon.returncode == 0, stderr.decode()
    _assert_stamped_in(env, behind.heard_from, 3)
    assert f"stepped by +{(_DAYS_BEHIND + 3) * 86400}.0 s" in stderr.decode()
    assert "stepped by -259200.0 s (set by NTP?): 1 recording" in stderr.decode()


def test_undelivered_events_survive_a_step_of_the_wall_clock(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network (so the broker and NTP) comes up 10 days after the clock the daemon started
    with: the events it queued meanwhile are kept for the broker. Before: they were 10 days
    old by the new clock, and the outbox's next age bound (`outbox_max_age_days = 7`,
    every minute in the MQTT link) dropped them. Here this process is the run: it started an
    hour ago with the clock 10 days behind (its record of that is set), and the clock is
    right now."""
    behind_s = _DAYS_BEHIND * 86400
    monkeypatch.setattr(wall_clock, "_RUN_OFFSET_S", wall_clock._offset_s() - behind_s)
    monkeypatch.setattr(wall_clock, "_RUN_STARTED_AT", time.time() - behind_s - 3600)
    t = time.time()
    queued_at = {
        "by this run, before the step": t - behind_s - 1800,
        "by an earlier run, 10 days ago": t - behind_s - 7200,
        "by this run, after the step": t - 60,
    }
    conn = open_db(settings.storage.db_path)
    for topic, created_at in queued_at.items():
        conn.execute(
            "INSERT INTO outbox (topic, payload, created_at) VALUES (?, '{}', ?)",
            (topic, created_at),
        )
    settings.mqtt.outbox_max_age_days = 7
    assert bound_outbox(conn, settings.mqtt) == 1
    kept = [row[0] for row in conn.execute("SELECT topic FROM outbox ORDER BY id")]
    assert kept == ["by this run, before the step", "by this run, after the step"]


_HOLD_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_listening_goes_on_while_a_step_waits_for_a_busy_database(
    env: dict[str, str], tmp_path: Path
) -> None:
    """NTP steps the clock while another process holds the database's write lock for 8 s.
    Before: the listener waited for the lock (up to the 30 s busy timeout) at every frame to
    restamp, heard nothing meanwhile, and the daemon said `no audio from stdin`."""
    with _daemon_days_behind(env, tmp_path) as behind:
        db = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_WRITE_LOCK, str(db), "8"], stdout=subprocess.PIPE
        )
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        behind.shift.write_text("0")  # NTP sets the clock
        _play(behind.stdin, bytes(9 * _BYTES_PER_S))  # silence at real time, while locked
        assert holder.wait(timeout=60) == 0
        _play(behind.stdin, _SECOND)  # one more
        _, stderr = behind.daemon.communicate(timeout=180)  # stdin closed: end of the stream
    assert behind.daemon.returncode == 0, stderr.decode()
    assert "no audio from" not in stderr.decode(), stderr.decode()
    assert "restamped later" in stderr.decode()
    _assert_stamped_in(env, behind.heard_from, 2)


def test_status_does_not_trust_a_heartbeat_from_before_a_backward_step(
    env: dict[str, str],
) -> None:
    """A daemon (its process still there, hung) last wrote its heartbeat before the clock was
    set back 12 years. Before: the heartbeat's age was negative, under the 20 s limit, so
    `status` said it was running, and would have for 12 years."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    data_dir.mkdir()
    open_db(data_dir / "meraudiod.db").close()
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        heartbeat = {"pid": hung.pid, "at": time.time() + 12 * 365 * 86400, "listening": True}
        (data_dir / "heartbeat.json").write_text(json.dumps(heartbeat))
        assert not status_json(env)["running"]
        heartbeat["at"] = time.time()  # one written after the step: running
        (data_dir / "heartbeat.json").write_text(json.dumps(heartbeat))
        assert status_json(env)["running"]
    finally:
        hung.kill()
        hung.wait()


def test_a_replay_longer_than_the_machine_has_been_up_keeps_its_spacing() -> None:
    """A file replayed fast leads the clock by its length, which may reach back before the
    machine booted: its recordings keep their places in the file. Before, every stamp before
    the boot was held at the boot, so they all had one time."""
    up_s = time.clock_gettime(time.CLOCK_BOOTTIME)
    clock = wall_clock.StreamClock(lead_s=up_s + 3600.0)
    first = clock.started_at(0.0, 5.0)
    second = clock.started_at(10.0, 5.0)
    assert second - first == pytest.approx(10.0, abs=0.01)
    assert first == pytest.approx(time.time() - up_s - 3600.0, abs=5.0)


def test_stdin_stamps_follow_its_samples_at_real_time_and_never_run_ahead(
    env: dict[str, str],
) -> None:
    """As the README says of stdin: at real time (a live pipe) the stamps follow the audio's
    own sample count from when the daemon began reading; fed faster, the stream runs ahead
    of the clock and its spacing is lost (each recording starts its own length before it was
    closed, or with the one closed before it), while `start_s` keeps its place in the
    stream."""
    live = run_daemon(env, "--print")
    assert live.stdin is not None
    wait_running(env, live)
    _play(live.stdin, _SECOND + _FIFTH)  # two utterances
    _, stderr = live.communicate(timeout=180)  # stdin closed: end of the stream
    assert live.returncode == 0, stderr.decode()
    rows = db_rows(env, "SELECT * FROM recordings ORDER BY start_s")
    assert len(rows) >= 2, rows
    origins = [r["started_at"] - r["start_s"] for r in rows]
    assert max(origins) - min(origins) < 0.5, origins  # one start, the samples' spacing

    for leftover in Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).glob("meraudiod.db*"):
        leftover.unlink()
    fed_at = time.time()
    fast = subprocess.run(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env=env,
        input=_PCM,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert fast.returncode == 0, fast.stderr.decode()
    rows = db_rows(env, "SELECT * FROM recordings ORDER BY start_s")
    assert len(rows) == 5, rows
    starts = [r["started_at"] for r in rows]
    assert starts == sorted(starts), starts
    for before, row in zip([None, *rows], rows, strict=False):
        assert fed_at - row["duration_s"] - 5 < row["started_at"], dict(row)
        # Its own length before it was closed, or (a long one closed just after a short
        # one, which may then end after it was closed) the start of the one before it.
        moved_back = row["started_at"] <= row["closed_at"] - row["duration_s"] + 1e-3
        kept_order = before is not None and row["started_at"] == pytest.approx(
            before["started_at"], abs=1e-3
        )
        assert moved_back or kept_order, (dict(row), before and dict(before))
    spans = [r["start_s"] for r in rows]
    assert spans[-1] - spans[0] > 25, spans  # the stream's own positions are kept
    assert starts[-1] - starts[0] < spans[-1] - spans[0] - 10, (starts, spans)  # not the stamps


def test_a_live_pipe_that_pauses_is_stamped_when_it_is_heard(env: dict[str, str]) -> None:
    """A pipe whose sender sends nothing for a while (a gated sender, a paused stream), then
    speech: the stamps counted only the samples, so they ran as far behind the clock as the
    pause had lasted (81 s behind after an 80 s pause; found by a new user). A live stream
    is stamped when its frames arrive; a file's lead still places it in the past."""
    live = run_daemon(env)
    assert live.stdin is not None
    wait_running(env, live)
    _play(live.stdin, _span(0.0, 1.0))  # a second of the demo's opening silence
    time.sleep(8)  # the sender pauses: nothing arrives
    spoken_at = time.time()
    _play(live.stdin, _SECOND)
    _, stderr = live.communicate(timeout=180)
    assert live.returncode == 0, stderr.decode()
    (row,) = db_rows(env, "SELECT * FROM recordings")
    assert row["started_at"] > spoken_at - 1.5, (dict(row), spoken_at)
