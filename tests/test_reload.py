"""SIGHUP on a running daemon with a hostile configuration file: a bad reload never stops the
daemon, says what is wrong in one line naming the file or key, and what is recorded after it
is still saved and transcribed. Real processes, real speech."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile

from meraudiod.audio import decode_file

from .broker import Broker, free_port
from .conftest import (
    AS_A_USER,
    TEST_DATA,
    cli,
    db_rows,
    status_json,
    stored_audio,
    wait_for,
    wait_running,
)

SPEECH = decode_file(TEST_DATA / "ls_2609_0000.flac")
DONE_SQL = "SELECT id, text FROM recordings WHERE status='done'"


class Daemon:
    """A daemon on stdin whose log is read on a thread, line by line."""

    def __init__(self, env: dict[str, str], as_user: bool = False, *args: str) -> None:
        self.env = env
        command = [sys.executable, "-m", "meraudiod", "run", "--source", "stdin", *args]
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [*(AS_A_USER if as_user else []), *command],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        stderr = self.proc.stderr
        assert stderr is not None
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(x.decode(errors="replace") for x in stderr),
            daemon=True,
        )
        self._reader.start()

    def reload(self, what: str) -> list[str]:
        """SIGHUP, wait for the reload's outcome in the log; the lines it logged."""
        before = len(self.lines)
        self.proc.send_signal(signal.SIGHUP)

        def answered() -> bool:
            assert self.proc.poll() is None, (
                f"{what}: the daemon exited {self.proc.returncode}:"
                + ("".join(self.lines[before:]))
            )
            return any(
                "reload refused" in x or "reloaded configuration" in x for x in self.lines[before:]
            )

        wait_for(answered, 30, f"the reload of {what} to be answered")
        new = self.lines[before:]
        assert not any("Traceback" in x for x in new), f"{what}: {''.join(new)}"
        # `status` reads the configuration too (for the data directory): a good copy here.
        good = Path(self.env["MERAUDIOD_CONFIG"]).with_name("status.toml")
        good.write_text("")
        assert status_json({**self.env, "MERAUDIOD_CONFIG": str(good)})["running"], what
        return new

    def speak(self) -> None:
        """One utterance, then silence to end it."""
        assert self.proc.stdin is not None
        silence = np.zeros(16000, dtype=np.int16)
        self.proc.stdin.write(np.concatenate([SPEECH, silence]).astype("<i2").tobytes())
        self.proc.stdin.flush()

    def close(self) -> int:
        """End stdin (the daemon drains and exits); its exit code."""
        assert self.proc.stdin is not None
        if self.proc.poll() is None:
            self.proc.stdin.close()
        rc = self.proc.wait(timeout=60)
        self._reader.join(10)
        return rc


def test_a_broken_config_file_on_sighup_is_one_line_and_the_daemon_records_on(
    env: dict[str, str], tmp_path: Path
) -> None:
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text("[recorder]\nhangover_ms = 700\n")
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        attacks: list[tuple[str, str]] = [
            ("deeply nested TOML", "a = " + "[" * 100_000 + "]" * 100_000 + "\n"),
            ("binary garbage", ""),
            ("invalid TOML", "[recorder\nhangover_ms = \n"),
            ("wrong type", "[recorder]\nhangover_ms = 'soon'\n"),
            ("out of range", "[retention]\naudio_days = -5\n"),
            ("unknown key", "[recorder]\nhangover_mss = 700\n"),
            ("5,000 unknown keys", "".join(f"k{i} = 1\n" for i in range(5000))),
        ]
        for what, text in attacks:
            if what == "binary garbage":
                config.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)))
            else:
                config.write_text(text)
            lines = daemon.reload(what)
            refused = [x for x in lines if "reload refused" in x]
            assert len(refused) == 1 and str(config) in refused[0], (what, lines)
            assert len(refused[0]) < 2000, (what, refused[0][:2000])  # a line, not a page
        config.unlink()
        assert "not found" in "".join(daemon.reload("a deleted file"))
        config.mkdir()
        assert "not a regular file" in "".join(daemon.reload("a directory"))
        config.rmdir()
        daemon.speak()
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 1, 60, "the recording after the reloads")
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)
    assert db_rows(env, DONE_SQL)[0]["text"].strip()  # transcribed


def test_an_unreadable_config_file_or_directory_on_sighup_is_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """As the service's user (root reads anything): the file, then its directory, made
    unreadable. Before, the directory's PermissionError from `is_file()` stopped the daemon."""
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "config.toml"
    config.write_text("[recorder]\nhangover_ms = 700\n")
    env = {**env, "MERAUDIOD_CONFIG": str(config)}
    daemon = Daemon(env, as_user=True)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        config.chmod(0)
        refused = "".join(daemon.reload("an unreadable file"))
        assert f"cannot read config file {config}" in refused and "Permission denied" in refused
        config.chmod(0o644)
        etc.chmod(0)
        refused = "".join(daemon.reload("an unreadable directory"))
        assert str(config) in refused and "Permission denied" in refused, refused
        etc.chmod(0o755)
        daemon.speak()
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 1, 60, "the recording after the reloads")
    finally:
        etc.chmod(0o755)
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)


def test_a_50_mb_config_file_on_sighup_is_refused_at_once(env: dict[str, str]) -> None:
    """50 MB of keys: parsed, it held the main loop for about a minute (status said the
    daemon was not running after 20 s; systemd's 30 s watchdog would have killed it) and
    logged every key in one line of 100 MB."""
    config = Path(env["MERAUDIOD_CONFIG"])
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        with config.open("w") as out:
            out.writelines(f"k{i:09d} = 1\n" for i in range(50_000_010 // 15))
        assert config.stat().st_size >= 50_000_000
        started = time.monotonic()
        refused = "".join(daemon.reload("a 50 MB file"))
        assert time.monotonic() - started < 5, refused
        assert f"config file {config} is 50.0 MB" in refused, refused[:500]
        assert len(refused) < 1000, refused[:500]
        config.write_text("")
        daemon.speak()
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 1, 60, "the recording after the reload")
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)[:2000]


def test_reloads_touching_live_parts(env: dict[str, str], models_dir: Path, tmp_path: Path) -> None:
    """Speakers on without their models, the log level, MQTT on (a restart), retention
    making everything due at once, WAV for FLAC, JSON logs. Before, the sweep with the new
    limits waited out the interval in hand (an hour by default), recordings stayed FLAC and
    the log text, though the log said all three were applied."""
    # Only the default models: the session's models directory holds the speaker models too
    # once a test before this one (in the same worker) has installed them.
    defaults = tmp_path / "models"
    defaults.mkdir()
    for name in ("silero-vad-v6", "tiny.en"):
        (defaults / name).symlink_to(models_dir / name)
    env = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(defaults)}
    config = Path(env["MERAUDIOD_CONFIG"])
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        daemon.speak()
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 1, 60, "the first recording")
        config.write_text("[speakers]\nenabled = true\n")  # their models are not installed
        lines = "".join(daemon.reload("speakers without their models"))
        assert "speakers and diarization stay off" in lines and "ecapa" in lines, lines
        config.write_text("[logging]\nlevel = 'DEBUG'\n")
        assert "applied logging.level" in "".join(daemon.reload("the log level"))
        config.write_text("[logging]\nformat = 'json'\n")  # was logged applied, not used
        (done,) = [x for x in daemon.reload("JSON logs") if "reloaded configuration" in x]
        assert json.loads(done)["message"].startswith("reloaded configuration"), done
        config.write_text("[mqtt]\nenabled = true\nport = 1\n")
        lines = "".join(daemon.reload("MQTT on"))
        assert "need a restart: mqtt.enabled, mqtt.port" in lines, lines
        config.write_text("[retention]\ntext_days = 0.00001\n")  # everything due
        lines = "".join(daemon.reload("retention"))
        assert "applied retention.text_days" in lines, lines
        wait_for(lambda: not db_rows(env, "SELECT id FROM recordings"), 10, "the sweep")
        config.write_text("[recorder]\naudio_format = 'wav'\n")  # was logged applied, not used
        assert "applied recorder.audio_format" in "".join(daemon.reload("WAV"))
        daemon.speak()
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 1, 60, "the recording after")
        (stored,) = db_rows(env, "SELECT audio_path FROM recordings")
        assert stored["audio_path"].endswith(".wav"), stored["audio_path"]
        assert soundfile.info(stored_audio(env, stored["audio_path"])).format == "WAV"
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)


def test_200_sighups_in_a_second_while_speech_is_recorded_lose_nothing(
    env: dict[str, str],
) -> None:
    config = Path(env["MERAUDIOD_CONFIG"])
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        feeder = threading.Thread(target=lambda: [daemon.speak() for _ in range(3)])
        feeder.start()
        for i in range(200):
            # Each a change (the log level), so reloads apply something, not nothing.
            config.write_text(f"[logging]\nlevel = '{('INFO', 'DEBUG')[i % 2]}'\n")
            daemon.proc.send_signal(signal.SIGHUP)
            time.sleep(0.005)
        feeder.join(30)
        lines = daemon.reload("the last SIGHUP")
        assert not any("Traceback" in x for x in daemon.lines), "".join(daemon.lines)
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 3, 60, "the three recordings")
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)
    assert lines
    assert len(db_rows(env, "SELECT id FROM recordings")) == 3


def test_status_says_what_a_reload_could_not_apply(env: dict[str, str], broker: Broker) -> None:
    """Before, `status` showed nothing of it (only `systemctl status`, until the next state
    change), and its mqtt line followed the file, not the daemon: `disabled` for a daemon
    connected to its broker once the file said `enabled = false`."""
    config = Path(env["MERAUDIOD_CONFIG"])
    mqtt = f"[mqtt]\nhost = '127.0.0.1'\nport = {broker.port}\nnode_id = 'kitchen'\n"
    config.write_text(mqtt + "enabled = true\n")
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        wait_for(lambda: (status_json(env)["mqtt"] or {}).get("connected"), 20, "MQTT up")
        config.write_text(mqtt + "enabled = true\npassword = 'changed'\n")
        daemon.reload("the broker's password")
        data = status_json(env)
        assert data["restart_needed"] == ["mqtt.password"] and data["mqtt"]["connected"], data
        config.write_text(mqtt + "enabled = false\n")
        daemon.reload("MQTT off")
        assert status_json(env)["restart_needed"] == ["mqtt.enabled"]
        text = cli("status", env=env).stdout
        assert re.search(r"restart needed +mqtt.enabled\n", text), text
        assert re.search(r"mqtt +connected, outbox", text), text  # the daemon's, not the file's
        config.write_text(mqtt + "enabled = true\n[recorder]\nhangover_ms = 'soon'\n")
        daemon.reload("a wrong type")
        good = config.with_name("status.toml")
        data = status_json({**env, "MERAUDIOD_CONFIG": str(good)})
        assert "recorder.hangover_ms" in data["reload_error"], data
        assert data["restart_needed"] == ["mqtt.enabled"]  # still what the last good one said
        config.write_text(mqtt + "enabled = true\n")
        daemon.reload("the running configuration again")
        data = status_json(env)
        assert data["restart_needed"] == [] and data["reload_error"] is None, data
        daemon.speak()
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 1, 60, "the recording after the reloads")
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)


def test_a_new_token_in_the_same_file_is_named_as_needing_a_restart(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The HTTP token is read from its file once, at start: before, a reload after the admin
    wrote a new token into it said `applied nothing` and nothing needed a restart, while the
    old token went on opening the API."""
    token = tmp_path / "token"
    token.write_text("old-token\n")
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text(f"[http]\nenabled = true\nport = {free_port()}\ntoken_file = '{token}'\n")
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        token.write_text("new-token\n")
        lines = "".join(daemon.reload("a new token"))
        assert "need a restart: http.token_file (its contents)" in lines, lines
        assert status_json(env)["restart_needed"] == ["http.token_file (its contents)"]
        token.write_text("old-token\n")  # back as it was: nothing to restart for
        daemon.reload("the old token")
        assert status_json(env)["restart_needed"] == []
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)


def test_a_token_file_gone_under_the_daemon_is_said_at_the_reload(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by fault injection: with the token file removed, SIGHUP said only "restart
    needed: http.token_file (its contents)", though that restart would then fail. Now the
    reload is refused naming the file and why, in the log and in `status`."""
    token = tmp_path / "token"
    token.write_text("the-token\n")
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text(f"[http]\nenabled = true\nport = {free_port()}\ntoken_file = '{token}'\n")
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        token.unlink()
        lines = "".join(daemon.reload("a token file gone"))
        assert "reload refused" in lines and f"http.token_file: cannot read {token}" in lines, lines
        assert "No such file or directory" in lines, lines
        data = status_json(env)
        assert f"http.token_file: cannot read {token}" in (data["reload_error"] or ""), data
        assert data["restart_needed"] == [], data
        text = cli("status", env=env).stdout
        assert re.search(r"reload refused .*http.token_file: cannot read", text), text
        token.write_text("the-token\n")
        daemon.reload("the token file back")
        data = status_json(env)
        assert data["reload_error"] is None and data["restart_needed"] == [], data
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)


def test_a_reload_of_the_logging_keeps_the_command_lines_verbosity(env: dict[str, str]) -> None:
    """`run -v` logs INFO whatever logging.level says; a reload that changed logging.* went
    back to the file's level (WARNING here), and the daemon fell silent."""
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text("[logging]\nlevel = 'WARNING'\n")
    daemon = Daemon(env, False, "-v")
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        config.write_text("[logging]\nlevel = 'WARNING'\nformat = 'json'\n")
        daemon.reload("a new log format")
        before = len(daemon.lines)
        daemon.speak()
        wait_for(lambda: len(db_rows(env, DONE_SQL)) == 1, 60, "the recording after the reload")
        wait_for(
            lambda: any('"message": "transcript ' in x for x in daemon.lines[before:]),
            10,
            "the transcript's INFO line, in JSON",
        )
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)


def test_speakers_turned_on_without_their_model_is_said_by_status(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A SIGHUP turning speakers on where their model is not installed leaves them off, said
    in one log line; but the next line said `applied speakers.enabled`, and `status` showed
    nothing of it (no `reload refused`), so the admin saw speakers on in the file and none
    in the events."""
    models = tmp_path / "models"  # the default models only, whatever others the session has
    models.mkdir()
    for name in ("silero-vad-v6", "tiny.en"):
        (models / name).symlink_to(Path(env["MERAUDIOD_STORAGE__MODELS_DIR"]) / name)
    env = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(models)}
    config = Path(env["MERAUDIOD_CONFIG"])
    daemon = Daemon(env)
    try:
        wait_running(env, daemon.proc, timeout_s=60)
        config.write_text("[speakers]\nenabled = true\n")
        lines = "".join(daemon.reload("speakers without their model"))
        assert "ecapa-voxceleb is not installed" in lines, lines
        assert "applied speakers.enabled" not in lines, lines
        data = status_json(env)
        assert "ecapa-voxceleb is not installed" in (data["reload_error"] or ""), data
        config.write_text("")
        daemon.reload("speakers off again")
        assert status_json(env)["reload_error"] is None
    finally:
        rc = daemon.close()
    assert rc == 0, "".join(daemon.lines)
