"""A device without a clock battery: its wall clock is days behind when the daemon starts
listening, and NTP steps it once the network is up.

The daemon's wall clock is shifted through a sitecustomize module on its PYTHONPATH that adds
the seconds written in a file to time.time() (the process's only source of wall-clock time),
so the test can step it while the real daemon runs; its boot clock is untouched, as NTP
leaves it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO

from meraudiod.audio import SAMPLE_RATE_HZ, decode_file

from .conftest import DEMO, db_rows, run_daemon, wait_running

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


def _play(stdin: IO[bytes], pcm: bytes) -> None:
    """16 kHz s16le at real time, in half-second pieces, as a microphone delivers it."""
    piece = _BYTES_PER_S // 2
    for first in range(0, len(pcm), piece):
        stdin.write(pcm[first : first + piece])
        stdin.flush()
        time.sleep(0.5)


def test_recordings_follow_a_step_of_the_wall_clock(env: dict[str, str], tmp_path: Path) -> None:
    """Before: every recording of the run kept the clock it started with, 10 days in the past
    (so `retention.audio_days = 7` deleted speech heard minutes ago), also those made after
    NTP set the clock."""
    shift = tmp_path / "clock-shift-s"
    shift.write_text(str(-_DAYS_BEHIND * 86400))
    (tmp_path / "shift").mkdir()
    (tmp_path / "shift" / "sitecustomize.py").write_text(_SHIFT)
    run_env = env | {
        "PYTHONPATH": str(tmp_path / "shift"),
        "MERAUDIOD_TEST_CLOCK_SHIFT_FILE": str(shift),
    }
    pcm = decode_file(DEMO).tobytes()
    daemon = run_daemon(run_env)
    assert daemon.stdin is not None
    try:
        wait_running(run_env, daemon)
        heard_from = time.time()
        _play(daemon.stdin, pcm[: 9 * _BYTES_PER_S])  # the first utterance
        deadline = time.monotonic() + 60
        while not db_rows(env, "SELECT id FROM recordings"):
            assert time.monotonic() < deadline, "the first utterance was never saved"
            time.sleep(0.2)
        (first,) = db_rows(env, "SELECT started_at FROM recordings")
        behind_s = heard_from - first["started_at"]
        assert abs(behind_s - _DAYS_BEHIND * 86400) < 60, behind_s  # the shift took effect

        shift.write_text("0")  # NTP sets the clock
        _play(daemon.stdin, pcm[9 * _BYTES_PER_S : 21 * _BYTES_PER_S])  # two more
        _, stderr = daemon.communicate(timeout=180)  # stdin closed: the end of the stream
    finally:
        daemon.kill()
    assert daemon.returncode == 0, stderr.decode()
    rows = db_rows(env, "SELECT started_at, ended_at, closed_at FROM recordings ORDER BY start_s")
    assert len(rows) == 3
    for row in rows:
        assert heard_from - 5 < row["started_at"] < row["ended_at"] <= row["closed_at"], dict(row)
        assert row["closed_at"] <= time.time()
    assert f"stepped by +{_DAYS_BEHIND * 86400}" in stderr.decode()
