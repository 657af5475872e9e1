"""What the HTTP stage costs (part of `meraudiod bench` when `http.enabled`): the daemon's
resident memory and idle CPU with the stage off and on, each in a child process on a
scratch data directory, listening to an open but silent stdin; and how long an upload's task
takes against `meraudiod analyze` on the same file; and what long uploads, one after another,
cost its memory (bench_long_uploads). scripts/bench writes these figures into
docs/benchmarks.md (its HTTP section)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile

from .audio import SAMPLE_RATE_HZ, decode_file
from .config import Settings
from .db import open_db
from .signals import child_process
from .sources import demo_path
from .status import HEARTBEAT_FILE

_READY_TIMEOUT_S: Final = 120.0
_IDLE_S: Final = 5.0
_TASK_TIMEOUT_S: Final = 300.0
# What a page and a scraper ask for: the API, the page, the docs, metrics, readiness.
_PATHS: Final = ("/api/v1/recordings", "/", "/api/docs", "/metrics", "/health/ready")
# The long uploads: long enough that a transcription's working memory per second of audio
# shows (whole-file features: +57 MB a minute), short enough for a bench on a Pi.
LONG_UPLOAD_S: Final = 240.0
LONG_UPLOADS: Final = 3


def bench_http(settings: Settings, config_path: str | None) -> dict[str, Any]:
    """RSS added by the HTTP stage after serving requests, idle CPU with it off and on, and
    an upload's task against `analyze` on the same file (the bundled demo)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return {"http_rss_added_mb": None, "http_note": "the http extra is not installed"}
    off_rss_kb, off_cpu_pct, _ = _idle_daemon(settings, config_path, port=None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    on_rss_kb, on_cpu_pct, upload_s = _idle_daemon(settings, config_path, port=port)
    # Rounded once, and the ratio taken of the rounded figures: the table checks out.
    upload_s, analyze_s = round(upload_s, 2), round(_analyze_work_s(settings, config_path), 2)
    return {
        "http_rss_added_mb": round((on_rss_kb - off_rss_kb) / 1024, 1),
        "http_idle_cpu_pct_off": round(off_cpu_pct, 2),
        "http_idle_cpu_pct_on": round(on_cpu_pct, 2),
        "http_upload_task_s": upload_s,
        "http_analyze_s": analyze_s,
        "http_upload_vs_analyze": round(upload_s / analyze_s, 2) if analyze_s > 0 else None,
        "http_note": (
            f"{demo_path().name}: upload_task_s from the POST to the task completed (models"
            " loaded); analyze_s the same file through `meraudiod analyze` less its start-up"
            " (analyze of 1 s of silence)"
        ),
    }


def _scratch_env(settings: Settings, config_path: str | None, scratch: Path) -> dict[str, str]:
    """The environment of a child on a scratch data directory, MQTT off."""
    env = {
        **os.environ,
        "MERAUDIOD_STORAGE__DATA_DIR": str(scratch),
        "MERAUDIOD_STORAGE__RUN_DIR": str(scratch),
        "MERAUDIOD_STORAGE__MODELS_DIR": str(settings.storage.resolved_models_dir),
        "MERAUDIOD_MQTT__ENABLED": "false",
        "MERAUDIOD_HTTP__ENABLED": "false",
    }
    for key in ("MERAUDIOD_STORAGE__TMP_AUDIO_DIR", "MERAUDIOD_HTTP__TOKEN", "NOTIFY_SOCKET"):
        env.pop(key, None)
    if config_path:
        env["MERAUDIOD_CONFIG"] = config_path
    return env


def _idle_daemon(
    settings: Settings, config_path: str | None, port: int | None
) -> tuple[int, float, float]:
    """(VmRSS in kB after start-up and, with HTTP, after serving requests; CPU % of one
    core while idle; with HTTP, the seconds an upload's task took) of `meraudiod run
    --source stdin`."""
    headers = _headers(settings)
    with _daemon(settings, config_path, port) as child:
        if port:
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
        cpu_pct = 100.0 * cpu_pct / (time.monotonic() - t0)
        upload_s = _upload_task_s(f"http://127.0.0.1:{port}", headers) if port else 0.0
        return rss_kb, cpu_pct, upload_s


def bench_long_uploads(
    settings: Settings,
    config_path: str | None,
    upload_s: float = LONG_UPLOAD_S,
    uploads: int = LONG_UPLOADS,
    clip: Path | None = None,
) -> dict[str, Any]:
    """What long uploads cost the daemon's memory: the same recording of `upload_s` (the
    demo repeated; or `clip`, a file of any length) uploaded `uploads` times, one after
    another, each task waited for. The
    peak is the daemon's VmHWM over the uploads less its VmRSS before them (the high-water
    mark reset once it is ready: loading the models peaks higher than it then holds);
    `growth` is its VmRSS after the last task less after the first: what every upload after
    the first left behind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    headers, base_url = _headers(settings), f"http://127.0.0.1:{port}"
    with (
        tempfile.TemporaryDirectory(prefix="bench-long-") as folder,
        _daemon(settings, config_path, port) as child,
    ):
        if clip is None:
            clip = Path(folder) / "long.flac"
            demo = decode_file(demo_path())
            samples = np.resize(demo, int(upload_s * SAMPLE_RATE_HZ))
            soundfile.write(clip, samples, SAMPLE_RATE_HZ)
        else:
            upload_s = round(soundfile.info(clip).duration, 1)
        _upload_task_s(base_url, headers)  # the first transcription's one-off allocations
        time.sleep(1.0)
        before_kb = _status_kb(child.pid, "VmRSS:")
        Path(f"/proc/{child.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        after_kb: list[int] = []
        for _ in range(uploads):
            _upload_task_s(base_url, headers, clip, timeout_s=max(_TASK_TIMEOUT_S, 3 * upload_s))
            time.sleep(1.0)  # the worker's last frees
            after_kb.append(_status_kb(child.pid, "VmRSS:"))
        peak_kb = _status_kb(child.pid, "VmHWM:")
    return {
        "http_long_upload_s": upload_s,
        "http_long_uploads": uploads,
        "http_long_upload_rss_before_mb": round(before_kb / 1024, 1),
        "http_long_upload_peak_added_mb": round((peak_kb - before_kb) / 1024, 1),
        "http_long_upload_rss_after_first_mb": round(after_kb[0] / 1024, 1),
        "http_long_upload_rss_after_last_mb": round(after_kb[-1] / 1024, 1),
        "http_long_uploads_rss_growth_mb": round((after_kb[-1] - after_kb[0]) / 1024, 1),
    }


def _headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.http.resolved_token() or ''}"}


@contextmanager
def _daemon(
    settings: Settings, config_path: str | None, port: int | None
) -> Iterator[subprocess.Popen[bytes]]:
    """`meraudiod run --source stdin` on a scratch data directory, with the HTTP stage on
    `port` (None: off), ready; stopped and its directory removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-http-"))
    env = _scratch_env(settings, config_path, scratch)
    if port:
        env |= {
            "MERAUDIOD_HTTP__ENABLED": "true",
            "MERAUDIOD_HTTP__HOST": "127.0.0.1",
            "MERAUDIOD_HTTP__PORT": str(port),
        }
    try:
        open_db(scratch / "meraudiod.db").close()
        with child_process(
            [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as child:
            _wait_ready(child, scratch, port)
            yield child
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _upload_task_s(
    base_url: str,
    headers: dict[str, str],
    clip: Path | None = None,
    timeout_s: float = _TASK_TIMEOUT_S,
) -> float:
    """Seconds from posting `clip` (the demo) to `/api/v1/analysis/upload` to its task
    completed."""
    demo = clip or demo_path()
    boundary = "bench-upload-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{demo.name}"'
            "\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + demo.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    t0 = time.monotonic()
    request = urllib.request.Request(
        f"{base_url}/api/v1/analysis/upload",
        data=body,
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        task_id = json.loads(response.read())["task_id"]
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{base_url}/api/v1/tasks/{task_id}", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            state = json.loads(response.read())["status"]
        if state == "completed":
            return time.monotonic() - t0
        if state == "failed":
            raise RuntimeError(f"the bench upload's task failed ({task_id})")
        time.sleep(0.05)
    raise RuntimeError("the bench upload's task did not complete in time")


def _analyze_work_s(settings: Settings, config_path: str | None) -> float:
    """`meraudiod analyze` of the demo, less its start-up and model loading (the same
    command on one second of silence), in seconds."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    try:
        silence = scratch / "silence.wav"
        soundfile.write(silence, np.zeros(SAMPLE_RATE_HZ, dtype=np.int16), SAMPLE_RATE_HZ)
        env = _scratch_env(settings, config_path, scratch)
        runs: dict[Path, float] = {}
        # Each the best of two, alternating: the first run of all reads the models from a
        # cold disk cache, which is no part of either.
        for clip in (silence, demo_path()) * 2:
            t0 = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "meraudiod", "analyze", str(clip)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_TASK_TIMEOUT_S,
                check=True,
            )
            runs[clip] = min(runs.get(clip, float("inf")), time.monotonic() - t0)
        return max(0.0, runs[demo_path()] - runs[silence])
    finally:
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
