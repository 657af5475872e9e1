"""What the HTTP stage costs (part of `meraudiod bench` when `http.enabled`): the daemon's
resident memory and idle CPU with the stage off and on, each in a child process on a
scratch data directory, listening to an open but silent stdin."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

from .config import Settings
from .db import open_db
from .status import HEARTBEAT_FILE

_READY_TIMEOUT_S: Final = 120.0
_IDLE_S: Final = 5.0
# What a page and a scraper ask for: the API, the page, the docs, metrics, readiness.
_PATHS: Final = ("/api/v1/recordings", "/", "/api/docs", "/metrics", "/health/ready")


def bench_http(settings: Settings, config_path: str | None) -> dict[str, Any]:
    """RSS added by the HTTP stage after serving requests, and idle CPU with it off and on."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return {"http_rss_added_mb": None, "http_note": "the http extra is not installed"}
    off_rss_kb, off_cpu_pct = _idle_daemon(settings, config_path, port=None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    on_rss_kb, on_cpu_pct = _idle_daemon(settings, config_path, port=port)
    return {
        "http_rss_added_mb": round((on_rss_kb - off_rss_kb) / 1024, 1),
        "idle_cpu_pct_http_off": round(off_cpu_pct, 2),
        "idle_cpu_pct_http_on": round(on_cpu_pct, 2),
    }


def _idle_daemon(
    settings: Settings, config_path: str | None, port: int | None
) -> tuple[int, float]:
    """(VmRSS in kB after start-up and, with HTTP, after serving requests; CPU % of one
    core while idle) of `meraudiod run --source stdin`."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-http-"))
    env = {
        **os.environ,
        "MERAUDIOD_STORAGE__DATA_DIR": str(scratch),
        "MERAUDIOD_STORAGE__RUN_DIR": str(scratch),
        "MERAUDIOD_STORAGE__MODELS_DIR": str(settings.storage.resolved_models_dir),
        "MERAUDIOD_MQTT__ENABLED": "false",
        "MERAUDIOD_HTTP__ENABLED": "true" if port else "false",
        "MERAUDIOD_HTTP__HOST": "127.0.0.1",
        "MERAUDIOD_HTTP__PORT": str(port or 8080),
    }
    for key in ("MERAUDIOD_STORAGE__TMP_AUDIO_DIR", "MERAUDIOD_HTTP__TOKEN", "NOTIFY_SOCKET"):
        env.pop(key, None)
    if config_path:
        env["MERAUDIOD_CONFIG"] = config_path
    child: subprocess.Popen[bytes] | None = None
    try:
        open_db(scratch / "meraudiod.db").close()
        child = subprocess.Popen(
            [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ready(child, scratch, port)
        if port:
            headers = {"Authorization": f"Bearer {settings.http.resolved_token() or ''}"}
            for _ in range(4):
                for path in _PATHS:
                    request = urllib.request.Request(
                        f"http://127.0.0.1:{port}{path}", headers=headers
                    )
                    with urllib.request.urlopen(request, timeout=30) as response:
                        response.read()
        time.sleep(1.0)
        rss_kb = _status_kb(child.pid, "VmRSS:")
        cpu0, t0 = _cpu_ticks(child.pid), time.monotonic()
        time.sleep(_IDLE_S)
        cpu_pct = (_cpu_ticks(child.pid) - cpu0) / os.sysconf("SC_CLK_TCK")
        return rss_kb, 100.0 * cpu_pct / (time.monotonic() - t0)
    finally:
        if child is not None:
            child.terminate()
            child.wait(60)
            if child.stdin is not None:
                child.stdin.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_ready(child: subprocess.Popen[bytes], scratch: Path, port: int | None) -> None:
    """The heartbeat is written once the daemon is ready; with HTTP, its port answers too."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the daemon exited ({child.returncode}) before it was ready")
        if (scratch / HEARTBEAT_FILE).exists():
            if not port:
                return
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    return
            except OSError:
                pass
        time.sleep(0.2)
    raise RuntimeError("the daemon was not ready in time")


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime
