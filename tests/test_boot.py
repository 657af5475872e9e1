"""Start-up never loops: a microphone that is not there yet is waited for, degraded, with the
watchdog fed and READY sent; switched ON while it is gone, the same. Real processes under a
simulated systemd (tests/notify.py) and a real broker."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from meraudiod.audio import FRAME_S, FRAME_SAMPLES, Int16Array
from meraudiod.checks import user_name
from meraudiod.config import Settings
from meraudiod.db import open_db, set_kv
from meraudiod.mic_source import MicSource
from meraudiod.microphone import AudioSupervisor
from meraudiod.pipeline import Pipeline

from .broker import PASSWORD, USER, Broker, Subscriber
from .conftest import AS_A_USER, REPO, SilenceFeeder, cli, needs_root, run_daemon, wait_for
from .mqtt_daemon import BASE, mqtt_env
from .notify import NotifySocket, service_env

MISSING_MIC = "USB PnP"  # no such input device on a test machine


def run_mic(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The daemon on a microphone that is not there."""
    return run_daemon({**env, "MERAUDIOD_AUDIO__DEVICE": MISSING_MIC}, source="mic")


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM (unless it has ended) and wait: the exit code and stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr.decode()


def last_state(sub: Subscriber) -> dict:
    """The latest retained state ({} before the first one has arrived)."""
    states = sub.on(f"{BASE}/state")
    return states[-1].json() if states else {}  # type: ignore[no-any-return]


def assert_waiting_with_a_fed_watchdog(
    proc: subprocess.Popen[bytes], notify: NotifySocket, env: dict[str, str]
) -> None:
    """Degraded, saying why, still running and still feeding the watchdog."""
    waiting_since = time.monotonic()
    time.sleep(6.0)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    assert len([t for t in notify.times("WATCHDOG=1") if t > waiting_since]) >= 3
    assert any("STATUS=" in m and MISSING_MIC in m for _, m in notify.messages), notify.messages
    up = json.loads(cli("status", "--json", env=env).stdout)
    assert up["running"] and MISSING_MIC in (up["degraded"] or ""), up


def test_microphone_missing_at_start_is_waited_for(env: dict[str, str], tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    senv = service_env({**env, "MERAUDIOD_LOGGING__LEVEL": "DEBUG"}, notify)
    proc = run_mic(senv)
    try:
        ready = notify.wait_ready(proc)
        assert "waiting for the microphone" in ready and MISSING_MIC in ready
        assert_waiting_with_a_fed_watchdog(proc, notify, senv)
    finally:
        code, stderr = stop(proc)
        notify.close()
    assert code == 0, stderr
    missing = [
        line.split(" meraudiod.microphone: ")[0].split()[-1]  # its level
        for line in stderr.splitlines()
        if " meraudiod.microphone: " in line and f"matching '{MISSING_MIC}'" in line
    ]
    assert missing[:1] == ["ERROR"] and missing.count("ERROR") == 1, stderr  # said once
    assert missing.count("DEBUG") >= 2, stderr  # retried, quietly


class UsbMic(MicSource):
    """A USB microphone that can be unplugged: out, opening it is PortAudio's own failure on
    a device that is not there; in, it delivers silence at real time."""

    def __init__(self) -> None:
        super().__init__(device=MISSING_MIC, rate_hz=None, queue_frames=8)
        self.plugged = threading.Event()

    def start(self) -> None:
        if not self.plugged.is_set():
            super().start()  # raises SourceError: no input device matching it
        self.name = f"mic:{MISSING_MIC}"

    def read(self, timeout_s: float) -> Int16Array | None:
        time.sleep(FRAME_S)
        return np.zeros(FRAME_SAMPLES, dtype=np.int16)

    def stop(self) -> None:
        pass


def test_a_missing_microphone_is_one_error_then_reminders_that_space_out(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by leaving a microphone unplugged: an ERROR every 60 s for ever (with its
    retries before that) buried the journal. Now one ERROR naming it, each retry at DEBUG, a
    WARNING reminder after 1 min, 2, 4 ... (at most one an hour), and one INFO when it is
    back; shown missing (degraded) all the while. Three hours of retries are run on a clock
    that ends now, so the microphone can come back in real time."""
    settings.asr.enabled = False
    pipeline = Pipeline(settings, threading.Event())
    pipeline.open()
    mic = UsbMic()
    problems: list[str | None] = []
    audio = AudioSupervisor(mic, lambda: pipeline.listener(mic), lambda: None)
    caplog.set_level(logging.DEBUG, logger="meraudiod.microphone")
    start = time.monotonic() - 3 * 3600
    audio.open(start)
    for second in range(1, 3 * 3600):
        audio.check(start + second)
        problems.append(audio.problem)
    assert all(p and MISSING_MIC in p and "waiting for the microphone" in p for p in problems)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meraudiod.microphone"]
    errors = [m for level, m in said if level >= logging.ERROR]
    assert len(errors) == 1 and MISSING_MIC in errors[0], errors
    retries = [m for level, m in said if level == logging.DEBUG]
    assert len(retries) > 150, len(retries)  # every 60 s at most: each asks PortAudio again
    reminders = [m for level, m in said if level == logging.WARNING]
    minutes = [int(m.split("after ")[1].split(" min")[0]) for m in reminders]
    gaps = [b - a for a, b in zip([0, *minutes], minutes, strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 32, 60], minutes  # then one an hour
    assert all(MISSING_MIC in m for m in reminders), reminders
    caplog.clear()

    mic.plugged.set()
    wait_for(
        lambda: audio.check(time.monotonic()) or audio.problem is None,
        90,
        "the microphone to be reopened",
    )
    back = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert back == [("INFO", f"microphone mic:{MISSING_MIC} is back")], back
    audio.close()
    pipeline.close()


def test_listening_on_while_the_microphone_is_gone(
    env: dict[str, str], broker: Broker, tmp_path: Path
) -> None:
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    conn = open_db(data_dir / "meraudiod.db")
    set_kv(conn, "listening", "OFF")  # muted before this start: the microphone stays closed
    conn.close()
    notify = NotifySocket(tmp_path / "notify.sock")
    senv = service_env(mqtt_env(env, broker), notify)
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    proc = run_mic(senv)
    try:
        sub.wait_online(90)
        sub.wait_for(lambda: sub.on("/listening/state"), 10)
        assert sub.on("/listening/state")[-1].payload == b"OFF"
        sub.publish(f"{BASE}/listening/set", "ON")
        sub.wait_for(lambda: sub.on("/listening/state")[-1].payload == b"ON", 10)
        sub.wait_for(lambda: MISSING_MIC in (last_state(sub).get("degraded") or ""), 10)
        assert_waiting_with_a_fed_watchdog(proc, notify, senv)
        # Muting again stops the waiting: no longer degraded.
        sub.publish(f"{BASE}/listening/set", "OFF")
        sub.wait_for(lambda: last_state(sub).get("degraded", "") is None, 10)
    finally:
        code, stderr = stop(proc)
        sub.close()
        notify.close()
    assert code == 0, stderr


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_sighup_during_start_is_a_reload_and_reloads_keep_the_bounds(
    env: dict[str, str],
) -> None:
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text("[recorder]\nhangover_ms = 700\n")
    proc = run_daemon(env)
    assert proc.stdin is not None and proc.stderr is not None
    stderr = proc.stderr
    try:
        # The moment numpy (the first slow import) is mapped, the process is still loading:
        # a `systemctl reload` now used to kill it (SIGHUP's default action, rc 129).
        deadline = time.monotonic() + 60
        while "numpy" not in _maps(proc.pid) and time.monotonic() < deadline:
            pass
        proc.send_signal(signal.SIGHUP)
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.extend(x.decode() for x in stderr), daemon=True
        )
        reader.start()
        wait_for(
            lambda: any("reloaded configuration" in x for x in lines) or proc.poll() is not None,
            90,
            "the early SIGHUP to be acted on once running",
        )
        assert proc.poll() is None, f"killed by SIGHUP during start: rc {proc.returncode}"
        config.write_text("[recorder]\nhangover_ms = 1e9\n")  # a typo for 1e3
        proc.send_signal(signal.SIGHUP)
        # answered before the input ends: a reload acted on after that is never made
        wait_for(
            lambda: any("reload refused" in x for x in lines) or proc.poll() is not None,
            30,
            "the second SIGHUP to be answered",
        )
        assert proc.poll() is None
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    reader.join(10)
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert "reloaded configuration" in log  # the early SIGHUP, acted on once running
    assert "reload refused" in log and "recorder.hangover_ms" in log, log
    # The same bound at start: one line naming the key.
    result = cli("config", "check", env=env)
    assert result.returncode != 0 and "recorder.hangover_ms" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("owner", ["read-only", pytest.param("foreign-owned", marks=needs_root)])
def test_unwritable_data_dir_is_one_line(env: dict[str, str], owner: str) -> None:
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    data_dir.mkdir()
    if owner == "read-only":
        data_dir.chmod(0o555)
    else:
        os.chown(data_dir, 65534, 65534)
        data_dir.chmod(0o700)
    result = subprocess.run(
        [*AS_A_USER, sys.executable, "-m", "meraudiod", "run", "--source", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "heartbeat" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"Error: storage.data_dir: {data_dir} is not writable by user {user_name()}:"
        " Permission denied"
    ), result.stderr  # only the directory itself, not each one inside it


def test_the_config_file_is_the_one_source_of_truth(tmp_path: Path) -> None:
    """The unit sets no MERAUDIOD_* variable that would beat the admin's config.toml."""
    from meraudiod.config import load_settings

    unit = (REPO / "systemd" / "meraudiod.service").read_text()
    unit_env = dict(
        line.removeprefix("Environment=").split("=", 1)
        for line in unit.splitlines()
        if line.startswith("Environment=")
    )
    config = tmp_path / "config.toml"
    config.write_text('[storage]\ndata_dir = "/mnt/ssd/meraudiod"\n')  # moved to a USB SSD
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("MERAUDIOD_")]:
            patch.delenv(key)
        for key, value in unit_env.items():
            patch.setenv(key, value)
        assert load_settings(config).storage.data_dir == Path("/mnt/ssd/meraudiod")


@pytest.mark.parametrize(
    ("toml", "keys"),
    [
        ("[emotion]\nenabled = false\n", ["emotion: unknown key"]),
        (
            "[asr]\nenabled = false\n[speakers]\nenabled = true\n",
            ["speakers.enabled", "asr.enabled"],
        ),
        (
            "[asr]\nenabled = false\n[diarization]\nenabled = true\n",
            ["diarization.enabled", "asr.enabled"],
        ),
        (
            "[mqtt]\npassword = 'a'\npassword_file = '/etc/pw'\n",
            ["mqtt.password ", "mqtt.password_file"],
        ),
        ("[mqtt]\ntls_ca_file = '/etc/ca.pem'\n", ["mqtt.tls_ca_file", "mqtt.tls "]),
        ("[mqtt]\ntls_cert_file = '/etc/c.pem'\n", ["mqtt.tls_cert_file", "mqtt.tls "]),
    ],
)
def test_settings_that_would_silently_do_nothing_are_errors(
    env: dict[str, str], toml: str, keys: list[str]
) -> None:
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    result = cli("config", "check", env=env)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    for key in keys:
        assert key in result.stderr, result.stderr


def test_unreadable_secret_files_are_named_not_tracebacks(
    env: dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "mqtt-password"
    files = {
        **env,
        "MERAUDIOD_MQTT__ENABLED": "true",
        "MERAUDIOD_MQTT__HOST": "127.0.0.1",
        "MERAUDIOD_MQTT__USERNAME": "meraudiod",
        "MERAUDIOD_MQTT__PASSWORD_FILE": str(secret),
    }
    missing = cli("config", "check", env=files)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert f"mqtt.password_file: cannot read {secret}" in missing.stderr, missing.stderr
    test = cli("mqtt", "test", env=files)
    assert test.returncode != 0 and "Traceback" not in test.stderr + test.stdout
    assert "step files" in test.stderr and str(secret) in test.stdout, test.stdout

    secret.write_text("pw\n")
    secret.chmod(0o000)  # a secret the service's user may not read
    cmd = [*AS_A_USER, sys.executable, "-m", "meraudiod", "config", "check"]
    result = subprocess.run(cmd, env=files, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(secret) in result.stderr and "Permission denied" in result.stderr

    tls = {**env, "MERAUDIOD_MQTT__TLS": "true", "MERAUDIOD_MQTT__TLS_CA_FILE": "/nonexistent/ca"}
    result = cli("config", "check", env=tls)
    assert result.returncode != 0 and "mqtt.tls_ca_file: cannot read /nonexistent/ca" in (
        result.stderr
    )
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    result = cli("config", "check", env={**tls, "MERAUDIOD_MQTT__TLS_CA_FILE": str(garbage)})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"cannot load the TLS files (mqtt.tls_ca_file {garbage})" in result.stderr


@pytest.mark.parametrize("bad", ["missing secret", "not a certificate"])
def test_daemon_with_an_unusable_mqtt_file_stays_up_degraded_for_mqtt(
    env: dict[str, str], broker: Broker, tmp_path: Path, bad: str
) -> None:
    secret = tmp_path / "mqtt-file"
    notify = NotifySocket(tmp_path / "notify.sock")
    senv = service_env(
        mqtt_env(env, broker),
        notify,
        MERAUDIOD_MQTT__USERNAME=USER,
        MERAUDIOD_MQTT__PASSWORD_FILE=str(secret),
    )
    expected = f"MQTT off: mqtt.password_file: cannot read {secret}"
    if bad == "not a certificate":
        secret.write_text("not a certificate\n")
        del senv["MERAUDIOD_MQTT__PASSWORD_FILE"]
        senv |= {
            "MERAUDIOD_MQTT__HOST": "localhost",
            "MERAUDIOD_MQTT__PORT": str(broker.tls_port),
            "MERAUDIOD_MQTT__TLS": "true",
            "MERAUDIOD_MQTT__TLS_CA_FILE": str(secret),
            "MERAUDIOD_MQTT__PASSWORD": PASSWORD,
        }
        expected = f"MQTT off: cannot load the TLS files (mqtt.tls_ca_file {secret})"
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    proc = run_daemon(senv)
    feeder = SilenceFeeder(proc).start()
    try:
        notify.wait_ready(proc)
        started = time.monotonic()
        time.sleep(6.0)
        assert proc.poll() is None
        assert len([t for t in notify.times("WATCHDOG=1") if t > started]) >= 3
        assert any(expected in m for _, m in notify.messages), notify.messages
        up = json.loads(cli("status", "--json", env=senv).stdout)
        assert str(secret) in (up["degraded"] or ""), up
        # The file is fixed: MQTT comes up by itself.
        if bad == "missing secret":
            secret.write_text(PASSWORD + "\n")
        else:
            secret.write_text((broker.folder / "ca.crt").read_text())
        sub.wait_online(30)
        wait_for(
            lambda: (
                "MQTT off"
                not in (json.loads(cli("status", "--json", env=senv).stdout)["degraded"] or "")
            ),
            30,
            "the MQTT problem to clear",
        )
    finally:
        feeder.stop()
        code, stderr = stop(proc)
        sub.close()
        notify.close()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def _no_restart_statuses() -> set[int]:
    """The exit statuses the installed unit does not restart on."""
    unit = (REPO / "systemd" / "meraudiod.service").read_text()
    lines = [line for line in unit.splitlines() if line.startswith("RestartPreventExitStatus=")]
    return {int(word) for line in lines for word in line.split("=", 1)[1].split()}


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("MERAUDIOD_AUDIO__SORCE", "mic", "audio.sorce: unknown key"),
        ("MERAUDIOD_ASR__MODEL", "nope", "model 'nope'"),
        ("MERAUDIOD_STORAGE__DATA_DIR", "/etc/hostname", "storage.data_dir"),
    ],
)
def test_a_mistake_only_a_person_can_fix_is_not_restarted_for_ever(
    env: dict[str, str], setting: str, value: str, named: str
) -> None:
    # Restart=on-failure with RestartSec=5 restarted a daemon that exits 1 on a bad key every
    # 5 s, for ever (too slowly for systemd's start limit): a crash loop filling the journal.
    # What only a person can fix exits with a status the unit does not restart on.
    result = cli("run", "--source", "demo", env={**env, setting: value})
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.returncode in _no_restart_statuses(), (result.returncode, result.stderr)
    assert 1 not in _no_restart_statuses()  # a dead stage (exit 1) is still restarted


@pytest.mark.parametrize("kind", ["unreadable", "a directory"])
def test_a_config_file_the_service_cannot_read_is_not_restarted_for_ever(
    env: dict[str, str], tmp_path: Path, kind: str
) -> None:
    # The unit passes --config; click checked that path itself and exited 2 (a usage error),
    # which Restart=on-failure restarted every 5 s: a root-only config.toml was a crash loop.
    path = tmp_path / "meraudiod.toml"
    if kind == "a directory":
        path.mkdir()
    else:
        path.write_text("")
        path.chmod(0o000)
    result = subprocess.run(
        [*AS_A_USER, sys.executable, "-m", "meraudiod", "run", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert str(path) in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.returncode in _no_restart_statuses(), (result.returncode, result.stderr)


def test_an_http_token_file_the_service_cannot_read_is_not_restarted_for_ever(
    env: dict[str, str], tmp_path: Path
) -> None:
    token = tmp_path / "http-token"
    token.write_text("a-token-of-twenty-chars\n")
    token.chmod(0o000)
    http = {"MERAUDIOD_HTTP__ENABLED": "true", "MERAUDIOD_HTTP__TOKEN_FILE": str(token)}
    result = subprocess.run(
        [*AS_A_USER, sys.executable, "-m", "meraudiod", "run", "--source", "demo"],
        env={**env, **http},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: http.token_file: cannot read {token}"), result.stderr
    assert result.returncode in _no_restart_statuses(), (result.returncode, result.stderr)
    # and `config check` names it too (it said "configuration ok")
    check = subprocess.run(
        [*AS_A_USER, sys.executable, "-m", "meraudiod", "config", "check"],
        env={**env, **http},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode != 0 and f"http.token_file: cannot read {token}" in check.stderr, (
        check.stdout + check.stderr
    )
