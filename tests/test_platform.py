"""Knowing the platform: CPU features from real /proc/cpuinfo texts, and status reports them."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
from pathlib import Path

from meraudiod.db import open_db
from meraudiod.machine import cpu_features, describe

from .conftest import REPO, cli

# A Raspberry Pi 5 (Cortex-A76) and a Pi 4 (Cortex-A72), as their kernels print them.
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""
PI4 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"
X86 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx f16c avx2 fma bmi2\nmodel name\t: Some CPU\n"


def test_cpu_features_name_what_the_kernels_use(tmp_path: Path) -> None:
    found = {}
    for name, text in (("pi5", PI5), ("pi4", PI4), ("x86", X86), ("empty", "")):
        (tmp_path / name).write_text(text)
        found[name] = cpu_features(tmp_path / name)
    assert found == {
        "pi5": ["asimd", "asimddp", "asimdhp"],  # NEON with int8 dot product
        "pi4": ["asimd"],  # NEON only: no dot product
        "x86": ["avx2", "fma"],
        "empty": [],
    }
    assert cpu_features(tmp_path / "missing") == []


def test_status_reports_architecture_python_sqlite_and_libraries(env: dict[str, str]) -> None:
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    data_dir.mkdir(parents=True)
    open_db(data_dir / "meraudiod.db").close()  # status reads a store, never creates one
    done = cli("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    reported = json.loads(done.stdout)["platform"]
    assert reported == describe()
    assert reported["architecture"] == platform.machine()
    assert reported["python"].startswith(platform.python_version())
    assert reported["sqlite"] == sqlite3.sqlite_version
    assert reported["onnxruntime"][0].isdigit() and reported["ctranslate2"][0].isdigit()
    text = cli("status", env=env)
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("platform"))
    assert f"Python {platform.python_version()}" in line and "CPU features:" in line


def test_check_platform_refuses_a_cache_inside_the_repository(tmp_path: Path) -> None:
    """Its roots and venvs are deleted and rebuilt: they must never be able to reach the tree."""
    inside = REPO / "not-a-cache"
    done = subprocess.run(
        [str(REPO / "scripts" / "check-platform"), "py3.10"],
        env={**os.environ, "MERAUDIOD_CACHE_DIR": str(inside)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "inside the repository" in done.stderr
    assert not inside.exists()
