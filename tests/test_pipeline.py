"""End to end through the real `meraudiod` process: file, stdin, signals, crashes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from meraudiod.audio import decode_file

from .conftest import DEMO, DEMO_TRUTH, TEST_DATA, cli, db_rows, run_daemon, stored_audio


def _recordings(env: dict[str, str]) -> int:
    if not (Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db").is_file():
        return 0
    try:
        return int(db_rows(env, "SELECT COUNT(*) AS n FROM recordings")[0]["n"])
    except sqlite3.OperationalError:  # not migrated yet
        return 0


def test_demo_gives_one_whole_recording_per_utterance(env: dict[str, str]) -> None:
    result = cli("run", "--source", "demo", "--print", env=env)
    assert result.returncode == 0, result.stderr
    rows = db_rows(env, "SELECT * FROM recordings ORDER BY start_s")
    assert len(rows) == len(DEMO_TRUTH)
    for row, truth in zip(rows, DEMO_TRUTH, strict=True):
        assert row["start_s"] <= truth["start_s"] and row["end_s"] >= truth["end_s"], truth
        assert row["status"] == "done"
        audio, rate = soundfile.read(stored_audio(env, row["audio_path"]))
        assert rate == 16000 and abs(audio.size / 16000 - row["duration_s"]) < 1e-6
    # the printed transcripts are the stored ones, in order
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [line.split("] ", 1)[1] for line in lines] == [row["text"] for row in rows]
    assert "dashwood" in rows[0]["text"].lower()
    # Read faster than real time, the file is stamped as if heard live, ending as the replay
    # began: each recording where it lies in the file, none at a time to come. Before, each
    # was "now minus its length" (a long one after a short one came out earlier), then held
    # in order by giving four of the five the same time, their ends seconds ahead of the clock.
    origins = [row["started_at"] - row["start_s"] for row in rows]
    assert max(origins) - min(origins) < 0.001, origins
    for row in rows:
        assert row["ended_at"] - row["started_at"] == pytest.approx(row["duration_s"], abs=1e-3)
        assert row["ended_at"] <= row["closed_at"], dict(row)


def test_tones_and_music_give_no_recording(env: dict[str, str], tmp_path: Path) -> None:
    t = np.arange(16000 * 4) / 16000
    tones = np.concatenate(
        [
            0.3 * np.sin(2 * np.pi * 440 * t),
            0.3 * np.sin(2 * np.pi * (300 + 400 * t) * t),  # a sweep
            0.2 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t)),  # a DTMF tone
        ]
    )
    music = [
        soundfile.read(TEST_DATA / n)[0]
        for n in ("music_strings_pd.flac", "humpback_whale_pd.flac")
    ]
    path = tmp_path / "nonspeech.wav"
    soundfile.write(path, np.concatenate([tones, *music]), 16000)
    result = cli("run", "--source", f"file:{path}", env=env)
    assert result.returncode == 0, result.stderr
    assert db_rows(env, "SELECT COUNT(*) AS n FROM recordings")[0]["n"] == 0


def test_stdin_pcm_is_recorded(env: dict[str, str]) -> None:
    pcm = decode_file(DEMO).astype("<i2").tobytes()
    proc = subprocess.run(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env=env,
        input=pcm,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(db_rows(env, "SELECT id FROM recordings WHERE status='done'")) == len(DEMO_TRUTH)


def test_bad_file_exits_with_one_clear_line(env: dict[str, str], tmp_path: Path) -> None:
    # (A missing microphone is waited for instead: test_boot.py.)
    bad = tmp_path / "notes.mp3"
    bad.write_text("not audio")
    result = cli("run", "--source", f"file:{bad}", env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error: cannot open audio file")
    assert "notes.mp3" in result.stderr


def test_sigterm_stops_cleanly_and_keeps_what_was_said(env: dict[str, str]) -> None:
    # The input stops in the middle of the second utterance and stays open: whenever SIGTERM
    # comes, someone is still speaking.
    second = DEMO_TRUTH[1]
    cut_s = (second["start_s"] + second["end_s"]) / 2
    pcm = decode_file(DEMO)[: int(cut_s * 16000)]
    proc = run_daemon(env, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(pcm.astype("<i2").tobytes())
    proc.stdin.flush()
    deadline = time.monotonic() + 120
    while not _recordings(env):  # models loaded, audio flowing, the first utterance saved
        assert proc.poll() is None and time.monotonic() < deadline, "no recording was saved"
        time.sleep(0.2)
    time.sleep(2.0)  # margin for the listener to read the rest (1.2 s of audio) at full speed
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()
    assert time.monotonic() - started < 5.0
    rows = db_rows(env, "SELECT * FROM recordings ORDER BY start_s")
    assert len(rows) == 2, [dict(r) for r in rows]
    assert rows[0]["status"] in ("done", "pending")  # transcribed unless the machine is slow
    # The utterance under way was saved on the way out, up to where the input stopped.
    assert rows[1]["start_s"] < second["start_s"] + 0.3 and rows[1]["end_s"] <= cut_s + 0.1
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    assert not list(data_dir.rglob("*.part"))
    for row in rows:
        assert soundfile.info(stored_audio(env, row["audio_path"])).frames > 0


def test_sigkill_mid_backlog_loses_nothing_and_duplicates_nothing(env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meraudiod", "run", "--source", "demo"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                running = db_rows(env, "SELECT COUNT(*) AS n FROM jobs WHERE state='running'")
            except sqlite3.OperationalError:
                running = []  # not created yet
            if running and running[0]["n"]:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("no job was ever running")
    finally:
        proc.kill()  # SIGKILL while a job is being transcribed
        proc.wait(timeout=10)
    before = db_rows(env, "SELECT id, audio_path FROM recordings")
    assert before and all(stored_audio(env, r["audio_path"]).is_file() for r in before)
    assert db_rows(env, "SELECT COUNT(*) AS n FROM jobs WHERE state='running'")[0]["n"] == 1

    silence = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).parent / "silence.wav"
    soundfile.write(silence, np.zeros(16000), 16000)
    result = cli("run", "--source", f"file:{silence}", env=env)
    assert result.returncode == 0, result.stderr
    assert "requeued 1 job left running" in result.stderr
    after = db_rows(env, "SELECT id, status FROM recordings")
    assert {r["id"] for r in after} == {r["id"] for r in before}
    assert all(r["status"] == "done" for r in after)
    dupes = db_rows(
        env, "SELECT recording_id, idx, COUNT(*) AS n FROM segments GROUP BY 1, 2 HAVING n > 1"
    )
    assert dupes == []
    jobs = db_rows(env, "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    assert [(j["state"], j["n"]) for j in jobs] == [("done", len(before))]


def test_nothing_is_written_outside_the_data_dir(env: dict[str, str], tmp_path: Path) -> None:
    """No telemetry: onnxruntime 1.32 keeps a device id and an upload queue under
    ~/.cache/Microsoft unless it is told not to before it starts."""
    home = tmp_path / "home"
    home.mkdir()
    own = {**env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    own.pop("ORT_DISABLE_TELEMETRY", None)
    result = cli("analyze", str(TEST_DATA / "librivox_0880.wav"), env=own)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []


def test_numpy_runs_on_the_thread_that_calls_it(env: dict[str, str]) -> None:
    """numpy's OpenBLAS started a thread per core and spun them at every matrix product:
    the speaker models' filter banks took 1.75 times the CPU of one thread for the same wall
    time (diarization 288 against 164 ms per second of audio on two cores; more on more)."""
    own = {k: v for k, v in env.items() if k != "OPENBLAS_NUM_THREADS"}
    code = (
        "import os, meraudiod.cli, numpy\n"
        "numpy.ones((256, 256)) @ numpy.ones((256, 256))\n"
        "print(len(os.listdir('/proc/self/task')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=own, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
