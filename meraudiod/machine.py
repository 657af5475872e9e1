"""What this machine is, as far as speed and compatibility go: architecture, Python, SQLite,
the inference libraries' versions and the CPU features their fast paths use.

    python -m meraudiod.machine     # one line, as scripts/setup prints it
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import sqlite3
from pathlib import Path
from typing import Final

# The CPU features onnxruntime's and CTranslate2's kernels choose between: SIMD width on x86
# (AVX2/FMA, AVX-512, VNNI for int8); on ARM, NEON (asimd), dot product (asimddp, int8),
# half precision (asimdhp) and int8 matrix multiply (i8mm): a Pi 4 has only NEON, a Pi 5 and
# a Jetson Orin also dot product.
CPU_FEATURES: Final = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni",
    "asimd", "asimddp", "asimdhp", "i8mm",
)  # fmt: skip


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU_FEATURES this CPU reports (x86 "flags", ARM "Features"), in that order."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            found.update(value.split())
    return [f for f in CPU_FEATURES if f in found]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache  # read once per process: status() asks on every state update
def describe() -> dict[str, str]:
    """Architecture, Python, SQLite, onnxruntime, CTranslate2 and CPU features, as text."""
    return {
        "architecture": platform.machine(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "sqlite": sqlite3.sqlite_version,
        "onnxruntime": _version("onnxruntime"),
        "ctranslate2": _version("ctranslate2"),
        "cpu_features": " ".join(cpu_features()) or "none of " + " ".join(CPU_FEATURES),
    }


def summary_line(info: dict[str, str] | None = None) -> str:
    """describe() (or what it returned elsewhere) on one line."""
    info = info or describe()
    return (
        f"{info['architecture']}, Python {info['python']}, SQLite {info['sqlite']},"
        f" onnxruntime {info['onnxruntime']}, CTranslate2 {info['ctranslate2']},"
        f" CPU features: {info['cpu_features']}"
    )


if __name__ == "__main__":
    print(summary_line())
