"""Shared fixtures: a fresh data directory per test, models installed once per session."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final

import pytest

from meraudiod import models
from meraudiod.audio import SAMPLE_RATE_HZ
from meraudiod.config import Settings, load_settings

from .broker import Broker
from .wyoming_server import WyomingServer

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO = REPO / "meraudiod" / "assets" / "demo.flac"
DEMO_TRUTH = json.loads((REPO / "meraudiod" / "assets" / "demo.json").read_text())["utterances"]

StartWyoming = Callable[..., WyomingServer]

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data is not next to this checkout"
)


# The files that take longest (seconds of one clean-clone run, scripts/test's --junitxml):
# scripts/test gives each worker a whole file at a time, in the order collected, so these go
# first; taken last, one of them kept a worker busy after the others had finished. Order
# only: a file missing from this list runs after them, as collected.
SLOWEST_FILES_FIRST: Final = (
    "test_full_disk.py",  # 160 s
    "test_locked_database.py",  # 157 s
    "test_wyoming.py",  # 115 s
    "test_microphone.py",  # 102 s with its second test (44 s before)
    "test_diarization.py",  # 102 s
    "test_speakers.py",  # 101 s
    "test_cli_papercuts.py",  # 101 s
    "test_data_safety.py",  # 99 s
    "test_stop_signals.py",  # 99 s
    "test_admin_kills.py",  # 85 s
    "test_mqtt.py",  # 78 s
    "test_http_stage.py",  # 74 s
    "test_bench.py",  # 70 s
    "test_mqtt_hostile.py",  # 68 s
    "test_bad_input.py",  # 60 s
    "test_boot.py",  # 59 s
    "test_hostile_uploads.py",  # 52 s
    "test_wall_clock.py",  # 51 s
    "test_reload.py",  # 51 s
    "test_read_only.py",  # 47 s
    "test_service.py",  # 41 s
    "test_server_faults.py",  # 40 s
    "test_worker_safety.py",  # 32 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest files first (SLOWEST_FILES_FIRST), each file's tests in their order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# The suite runs more processes than the machine has CPUs: one CTranslate2 thread each
# spends less CPU in all than the default two (the demo analysed beside a loaded machine:
# 10.7-12.0 CPU-s against 12.3-12.5, and sooner). The README's figures are the default's,
# from scripts/bench.
SUITE_SETTINGS: Final = {"MERAUDIOD_ASR__CPU_THREADS": "1"}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default models, installed (and checked) once for the whole session."""
    target = tmp_path_factory.mktemp("models")
    for name in ("silero-vad-v6", "tiny.en"):
        models.install(name, target)
    return target


@pytest.fixture(scope="session")
def speaker_models(models_dir: Path) -> Path:
    """Also the speaker models: the ECAPA export (scripts/export-models) and segmentation."""
    for name in ("ecapa-voxceleb", "pyannote-segmentation-3.0"):
        models.install(name, models_dir)
    return models_dir


@pytest.fixture
def env(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment pointing meraudiod at a fresh data dir (also for subprocesses)."""
    config = tmp_path / "config.toml"
    config.write_text("")
    values = {
        "MERAUDIOD_CONFIG": str(config),
        "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "MERAUDIOD_STORAGE__MODELS_DIR": str(models_dir),
        **SUITE_SETTINGS,
    }
    for key in [k for k in os.environ if k.startswith("MERAUDIOD_")]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    """Settings for the fresh data dir."""
    return load_settings()


def cli(
    *args: str,
    env: dict[str, str],
    timeout_s: float = 120,
    as_user: bool = False,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `meraudiod ARGS` as a real process (in the directory `cwd`: relative paths are
    read from there); `as_user`: without root's right to read and write anything
    (AS_A_USER), as the service's own user would."""
    return subprocess.run(
        [*(AS_A_USER if as_user else []), sys.executable, "-m", "meraudiod", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def install_into(root: Path) -> None:
    """`scripts/install --root ROOT --no-venv`: the files as a package would lay them out."""
    done = subprocess.run(
        [str(REPO / "scripts" / "install"), "--root", str(root), "--no-venv"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def run_daemon(
    env: dict[str, str],
    *args: str,
    source: str = "stdin",
    stdout: int | IO[bytes] = subprocess.DEVNULL,
    stderr: int | IO[bytes] = subprocess.PIPE,
    as_user: bool = False,
) -> subprocess.Popen[bytes]:
    """`meraudiod run --source SOURCE ARGS` as a real process: its stdin a pipe (the audio of
    `--source stdin`), its stderr a pipe to read unless told otherwise; `as_user`: without
    root's right to write anything (AS_A_USER)."""
    return subprocess.Popen(
        [
            *(AS_A_USER if as_user else []),
            *(sys.executable, "-m", "meraudiod", "run", "--source", source, *args),
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
    )


class SilenceFeeder:
    """Silence on a daemon's stdin at real time, as a quiet room's microphone delivers it, on a
    named thread until stopped or the process ends."""

    def __init__(self, proc: subprocess.Popen[bytes], block_s: float = 0.032) -> None:
        self.proc = proc
        self.block_s = block_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stdin-silence", daemon=True)

    def start(self) -> SilenceFeeder:
        """Start feeding; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop feeding (the microphone stalls) and wait for the thread."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        assert self.proc.stdin is not None
        block = bytes(2 * round(SAMPLE_RATE_HZ * self.block_s))  # s16le
        while not self._stop.is_set():
            try:
                self.proc.stdin.write(block)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):  # the process ended (or stdin was closed)
                return
            self._stop.wait(self.block_s)


def db_rows(env: dict[str, str], sql: str) -> list[sqlite3.Row]:
    """Rows from the database of the `env` fixture's data dir (what a daemon process wrote)."""
    conn = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def sigkill_when(
    env: dict[str, str], args: Sequence[str], count_sql: str, what: str, timeout_s: float = 120
) -> None:
    """Start `meraudiod ARGS` as a real process and SIGKILL it as soon as `count_sql` (its
    `{pid}` the process's pid) counts a row in the `env` fixture's database; fail naming
    `what` if that never happens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meraudiod", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def counted() -> bool:
        try:
            return bool(db_rows(env, count_sql.format(pid=proc.pid))[0][0])
        except sqlite3.OperationalError:
            return False  # no database (or table) yet

    try:
        wait_for(counted, timeout_s, what, poll_s=0.01)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to finish or to clean up
        proc.wait(timeout=10)


def stored_audio(env: dict[str, str], stored: str) -> Path:
    """The audio file a recording row names (stored relative to the data dir's audio/)."""
    return Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio" / stored


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto on free loopback ports, stopped after the test."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def status_json(env: dict[str, str], timeout_s: float = 120) -> dict[str, Any]:
    """`meraudiod status --json` for the `env` fixture's data dir, once a daemon has made its
    database (status never creates one: before that it is an error)."""
    db = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"
    deadline = time.monotonic() + timeout_s
    while not db.is_file():
        assert time.monotonic() < deadline, f"no database appeared at {db}"
        time.sleep(0.1)
    result = cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_running(
    env: dict[str, str], proc: subprocess.Popen[bytes], timeout_s: float = 120
) -> dict[str, Any]:
    """Wait until `status` says the daemon runs (models loaded, heartbeat written), failing at
    once if the process ends first; the status then."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the daemon exited {proc.returncode} before running"
        data = status_json(env, timeout_s)
        if data["running"]:
            return data
        assert time.monotonic() < deadline, f"the daemon never came up: {data}"
        time.sleep(0.3)


@pytest.fixture
def start_wyoming(models_dir: Path, tmp_path: Path) -> Iterator[StartWyoming]:
    """Start wyoming-faster-whisper servers (tests/wyoming_server.py) on free ports (or a
    given one); every one is killed at the end."""
    started: list[WyomingServer] = []

    def start(port: int | None = None) -> WyomingServer:
        server = WyomingServer(models_dir / "tiny.en", tmp_path / "wyoming", port).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc is not None:
            server.resume()  # a stopped process would not die of SIGKILL until continued
        server.kill()


# The tests run as root, whom file permissions do not stop: a process that must meet them
# runs without the capabilities that override them, as the service's own user would.
AS_A_USER = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mount)")


def wait_for(
    condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    """Poll until condition() is true; fail naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
