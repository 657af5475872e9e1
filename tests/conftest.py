"""Shared fixtures: a fresh data directory per test, models installed once per session."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from meraudiod import models
from meraudiod.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO = REPO / "meraudiod" / "assets" / "demo.flac"
DEMO_TRUTH = json.loads((REPO / "meraudiod" / "assets" / "demo.json").read_text())["utterances"]

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="../shared/data is not next to this checkout"
)


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
    *args: str, env: dict[str, str], timeout_s: float = 120, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `meraudiod ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "meraudiod", *args],
        env=env,
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def db_rows(env: dict[str, str], sql: str) -> list[sqlite3.Row]:
    """Rows from the database of the `env` fixture's data dir (what a daemon process wrote)."""
    conn = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# The tests run as root, whom file permissions do not stop: a process that must meet them
# runs without the capabilities that override them, as the service's own user would.
AS_A_USER = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mount)")
