"""Running as a service: sd_notify under a simulated systemd, status, SIGHUP, the unit file,
the install script, and a backlog built faster than real time."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from meraudiod.audio import decode_file
from meraudiod.config import load_settings

from .conftest import (
    DEMO,
    DEMO_TRUTH,
    REPO,
    SilenceFeeder,
    cli,
    install_into,
    run_daemon,
    status_json,
    wait_for,
    wait_running,
)
from .notify import NotifySocket, service_env


def test_ready_watchdog_and_stopping_under_simulated_systemd(
    env: dict[str, str], tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = run_daemon(service_env(env, notify))
    feeder = SilenceFeeder(proc).start()
    try:
        notify.wait_ready(proc, timeout_s=60)
        time.sleep(5.0)
        pets = [t for t in notify.times("WATCHDOG=1") if t > notify.times("READY=1")[0]]
        assert len(pets) >= 3  # every second while audio flows

        feeder.stop()  # the microphone stalls
        stalled_at = time.monotonic()
        time.sleep(10.0)
        late = [t for t in notify.times("WATCHDOG=1") if t > stalled_at + 7.0]
        assert late == []  # systemd would now restart us

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert proc.returncode == 0
        assert notify.times("STOPPING=1")
        assert any("STATUS=" in m for _, m in notify.messages)
    finally:
        feeder.stop()
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_status_with_daemon_up_and_down(env: dict[str, str], tmp_path: Path) -> None:
    # The heartbeat in its own directory (a tmpfs under systemd): status must find it there.
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(tmp_path / "run")}
    # Before the daemon ever ran there is no database, and status does not make one.
    never = cli("status", "--json", env=env)
    assert never.returncode == 1 and "no database at" in never.stderr
    proc = run_daemon(env, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    try:
        proc.stdin.write(decode_file(DEMO).astype("<i2").tobytes())
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        up: dict = {}
        while time.monotonic() < deadline:
            up = status_json(env)
            if up["running"] and up["transcripts_today"] == len(DEMO_TRUTH):
                break
            time.sleep(0.5)
        assert up["running"] and up["pid"] == proc.pid and up["listening"] is True
        assert up["microphone"] == "stdin" and up["last_transcript"]["text"]
        assert (tmp_path / "run" / "heartbeat.json").is_file()
        assert not (Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "heartbeat.json").exists()
        assert up["recordings_today"] == len(DEMO_TRUTH) and up["disk_free_mb"] > 0
        table = cli("status", env=env).stdout
        assert (
            "running" in table and "backlog" in table and "\x1b[" not in table
        )  # no colour off a tty
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    after = json.loads(cli("status", "--json", env=env).stdout)
    assert after["running"] is False and after["transcripts_today"] == len(DEMO_TRUTH)


def test_sighup_applies_what_it_can_and_names_the_rest(env: dict[str, str], tmp_path: Path) -> None:
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text("[recorder]\nhangover_ms = 700\n")
    proc = run_daemon(env)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        wait_running(env, proc, timeout_s=60)
        config.write_text("[recorder]\nhangover_ms = 500\n[asr]\nbeam_size = 2\n")
        proc.send_signal(signal.SIGHUP)
        # Each reload answered (status shows it) before the file changes again: a reload
        # acted on late would read the next file instead.
        # (`status` reads the configuration too: a good copy for it.)
        good = config.with_name("status.toml")
        good.write_text("")
        shown = {**env, "MERAUDIOD_CONFIG": str(good)}
        wait_for(lambda: status_json(shown)["restart_needed"], 30, "the first reload")
        config.write_text("[recorder]\nhangover_ms = 'soon'\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status_json(shown)["reload_error"], 30, "the second reload")
        assert proc.poll() is None  # a bad reload never stops the daemon
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    log = proc.stderr.read().decode()
    assert "applied recorder.hangover_ms" in log
    assert "need a restart: asr.beam_size" in log, log
    assert "reload refused" in log and "recorder.hangover_ms" in log


def test_unit_file_is_hardened_and_valid(tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "meraudiod.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=meraudiod",
        "SupplementaryGroups=audio",
        "StateDirectory=meraudiod",
        "ConfigurationDirectory=meraudiod",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
    ):
        assert line in unit, line
    assert "\nPrivateDevices=" not in unit  # it would hide the sound card
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify needs ExecStart to exist: point it at this checkout's command
    local = unit.replace(
        "/opt/meraudiod/.venv/bin/meraudiod", str(Path(sys.executable).with_name("meraudiod"))
    )
    (tmp_path / "meraudiod.service").write_text(local)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "meraudiod.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_install_into_a_temporary_root_twice(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for _ in range(2):
        install_into(root)
        (root / "etc/meraudiod/config.toml").write_text(
            (root / "etc/meraudiod/config.toml").read_text() + "# edited by the admin\n"
        )
    config = (root / "etc/meraudiod/config.toml").read_text()
    assert config.count("# edited by the admin") == 2  # the admin's file was kept
    installed = load_settings(root / "etc/meraudiod/config.toml")
    assert installed.storage.data_dir == Path("/var/lib/meraudiod")
    assert installed.storage.run_dir == Path("/run/meraudiod")  # the unit's RuntimeDirectory
    assert (
        "RuntimeDirectory=meraudiod" in (root / "etc/systemd/system/meraudiod.service").read_text()
    )
    assert (root / "etc/systemd/system/meraudiod.service").is_file()
    assert (root / "opt/meraudiod/meraudiod/daemon.py").is_file()
    assert oct((root / "etc/meraudiod/environment").stat().st_mode & 0o777) == "0o600"


def test_backlog_built_faster_than_real_time_drains_in_order(env: dict[str, str]) -> None:
    """About 2.5 minutes of speech (20 recordings) pushed in seconds: recordings wait on
    disk, memory stays bounded, and the backlog drains oldest first."""
    copies = 4
    pcm = decode_file(DEMO).astype("<i2").tobytes() * copies
    proc = run_daemon(env, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    watched = psutil.Process(proc.pid)
    peak_rss_mb = 0.0
    backlog_peak = 0
    writer = threading.Thread(target=lambda: (proc.stdin.write(pcm), proc.stdin.close()))  # type: ignore[union-attr]
    writer.start()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        peak_rss_mb = max(peak_rss_mb, watched.memory_info().rss / 1e6)
        backlog_peak = max(backlog_peak, status_json(env)["backlog"])
        time.sleep(1.0)
    writer.join()
    assert proc.wait(timeout=30) == 0
    assert backlog_peak >= 10  # speech arrived faster than it could be transcribed
    assert peak_rss_mb < 600  # the backlog is on disk, not in memory
    import sqlite3

    conn = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    rows = conn.execute("SELECT id, transcribed_at, status FROM recordings ORDER BY id").fetchall()
    assert len(rows) == copies * len(DEMO_TRUTH)
    assert all(status == "done" for _, _, status in rows)
    transcribed = [t for _, t, _ in rows]
    assert transcribed == sorted(transcribed)  # oldest first


def test_audio_callback_only_copies_and_counts_drops() -> None:
    """The PortAudio callback never blocks: with the queue full it counts and returns."""
    from meraudiod.mic_source import MicSource

    mic = MicSource(None, None, queue_frames=16)
    block = np.ones((512, 1), dtype=np.float32)

    class Status:
        input_overflow = False

    started = time.perf_counter()
    for _ in range(100):
        mic._callback(block, 512, None, Status())
    assert time.perf_counter() - started < 0.5
    assert mic.dropped_frames == 100 - 16
    block[:] = 0  # PortAudio reuses its buffer: what was queued is a copy
    frame = mic.read(0.1)
    assert frame is not None and int(frame.min()) == 32767
