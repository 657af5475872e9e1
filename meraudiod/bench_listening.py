"""Listening cost: the daemon process itself, fed digital silence at real time, beside a bare
Silero ONNX loop reading frames at real time. All are child processes measured the same way
over the same window: CPU time from /proc/<pid>/stat (every thread) and wakeups from the
context switches of each of its threads.

`python -m meraudiod.bench_listening MODEL THREADS SECONDS BLOCK_FRAMES` runs a bare loop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile

from . import models
from .audio import FRAME_S, FRAME_SAMPLES, SAMPLE_RATE_HZ
from .config import Settings
from .db import open_db
from .signals import child_process
from .status import HEARTBEAT_FILE

LISTEN_WINDOW_S: Final = 30.0  # measured after READY; a minute halves the tick rounding
_SETTLE_S: Final = 2.0  # after READY: the first frames pay one-off allocations
_READY_TIMEOUT_S: Final = 120.0  # models loading on a slow device
_CONTEXT_SAMPLES: Final = 64  # Silero v6 sees the tail of the previous frame
_STATE_SHAPE: Final = (1, 1, 128)
_MERAUDIOD: Final = (sys.executable, "-m", "meraudiod")
_BARE_LOOP: Final = (sys.executable, "-m", "meraudiod.bench_listening")


@dataclass(frozen=True)
class ProcessSample:
    """What a process had used by a moment: CPU seconds (all threads) and context switches."""

    at: float  # time.monotonic()
    cpu_s: float
    switches: int


def sample(pid: int) -> ProcessSample:
    """CPU and context switches of a running process and its threads so far (Linux)."""
    return ProcessSample(time.monotonic(), proc_cpu_s(pid), _switches(pid))


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used so far, every thread (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_value(pid: int, name: str, key: str) -> int:
    """The number after `key:` in /proc/<pid>/<name> of a running process (Linux), 0 when it
    cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def thread_switches(pid: int) -> dict[int, tuple[str, int]]:
    """Per thread id: its name (comm) and its voluntary + involuntary context switches, each
    one a wakeup of that thread."""
    found: dict[int, tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
        except OSError:  # the thread ended meanwhile
            continue
        switches = int(fields["voluntary_ctxt_switches"]) + int(
            fields["nonvoluntary_ctxt_switches"]
        )
        found[int(task.name)] = (fields["Name"].strip(), switches)
    return found


def _switches(pid: int) -> int:
    return sum(count for _, count in thread_switches(pid).values())


def bench_listening(
    settings: Settings,
    config_path: str | None,
    window_s: float = LISTEN_WINDOW_S,
    mqtt: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The daemon (MQTT and HTTP off) listening to digital silence at real time, and a bare
    Silero loop at real time, measured over the same window after the daemon is ready.
    `mqtt`: the environment of a broker; a second daemon with MQTT on to it is measured in
    the same window (`listening_mqtt_*`), as most devices run."""
    with contextlib.ExitStack() as stack:
        scratch, run_dir = stack.enter_context(daemon_dirs(settings))
        silence = scratch / "silence.flac"
        # Long enough to outlast loading the models and the window: the file must not end.
        seconds = int(_READY_TIMEOUT_S + _SETTLE_S + window_s + 60)
        soundfile.write(silence, np.zeros(seconds * SAMPLE_RATE_HZ, np.int16), SAMPLE_RATE_HZ)
        model = [*_BARE_LOOP, str(models.vad_file(settings)), str(settings.vad.threads)]
        block_frames = settings.audio.block_ms * SAMPLE_RATE_HZ // 1000 // FRAME_SAMPLES
        # Each stopped on the way out (SIGTERM, then SIGKILL), the last started first.
        daemons = [_start_daemon(stack, settings, config_path, silence, scratch, run_dir)]
        if mqtt is not None:
            dirs = stack.enter_context(daemon_dirs(settings))
            daemons.append(_start_daemon(stack, settings, config_path, silence, *dirs, mqtt))
        children = [daemon.process for daemon in daemons]
        # One frame per wakeup (the reference), and a block per wakeup as the daemon takes
        # them (what the daemon adds over the VAD alone).
        for frames in (1, block_frames):
            loop = [*model, str(seconds), str(frames)]
            children.append(stack.enter_context(child_process(loop, stdout=subprocess.DEVNULL)))
        for daemon in daemons:
            _await_ready(daemon.process, daemon.heartbeat, daemon.log)
        time.sleep(_SETTLE_S)
        before = [sample(child.pid) for child in children]
        time.sleep(window_s)
        after = [sample(child.pid) for child in children]
        if any(child.poll() is not None for child in children):
            raise RuntimeError("a daemon or a bare VAD loop ended during the window")
    rates = [_rates(b, a) for b, a in zip(before, after, strict=True)]
    (bare, bare_wakeups), (blocks, _) = rates[-2:]
    ours, ours_wakeups = rates[0]
    figures: dict[str, Any] = {
        "listening_cpu_pct_of_one_core": round(ours, 2),
        "listening_bare_vad_cpu_pct": round(bare, 2),
        "listening_ratio_vs_bare": round(ours / bare, 2) if bare else None,
        "listening_wakeups_per_s": round(ours_wakeups, 1),
        "listening_bare_wakeups_per_s": round(bare_wakeups, 1),
        "listening_block_ms": settings.audio.block_ms,
        "listening_bare_vad_same_blocks_cpu_pct": round(blocks, 2),
        "listening_ratio_vs_bare_same_blocks": round(ours / blocks, 2) if blocks else None,
        "listening_measured_s": round(after[0].at - before[0].at, 1),
    }
    if mqtt is not None:
        on, on_wakeups = rates[1]
        figures |= {
            "listening_mqtt_cpu_pct_of_one_core": round(on, 2),
            "listening_mqtt_ratio_vs_bare": round(on / bare, 2) if bare else None,
            "listening_mqtt_ratio_vs_mqtt_off": round(on / ours, 2) if ours else None,
            "listening_mqtt_wakeups_per_s": round(on_wakeups, 1),
        }
    return figures


@dataclass(frozen=True)
class _Daemon:
    """A bench daemon started: its process, heartbeat file (written at READY) and log."""

    process: subprocess.Popen[bytes]
    heartbeat: Path
    log: Path


def _start_daemon(
    stack: contextlib.ExitStack,
    settings: Settings,
    config_path: str | None,
    silence: Path,
    scratch: Path,
    run_dir: Path,
    overrides: dict[str, str] | None = None,
) -> _Daemon:
    """`run` on the silent file at real time in its scratch dirs, `overrides` in its env."""
    log = scratch / "daemon.log"
    env = daemon_env(settings, config_path, scratch, run_dir) | (overrides or {})
    with log.open("wb") as log_file:
        process = stack.enter_context(
            child_process(
                [*_MERAUDIOD, "run", "--source", f"file:{silence}", "--realtime"],
                env=env,
                cwd=scratch,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        )
    return _Daemon(process, run_dir / HEARTBEAT_FILE, log)


def _rates(before: ProcessSample, after: ProcessSample) -> tuple[float, float]:
    """CPU in % of one core, and wakeups per second, between two samples."""
    wall_s = after.at - before.at
    return (
        100.0 * (after.cpu_s - before.cpu_s) / wall_s,
        (after.switches - before.switches) / wall_s,
    )


def _await_ready(daemon: subprocess.Popen[bytes], heartbeat: Path, log: Path) -> None:
    """Until the daemon has written its first heartbeat (READY)."""
    give_up_at = time.monotonic() + _READY_TIMEOUT_S
    while not heartbeat.exists():
        if daemon.poll() is not None:
            last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the daemon exited {daemon.returncode} before READY: {last}")
        if time.monotonic() > give_up_at:
            raise RuntimeError(f"the daemon was not ready after {_READY_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def daemon_dirs(settings: Settings) -> Iterator[tuple[Path, Path]]:
    """A scratch data dir on the data directory's own disk (the one the writes wear, not a
    tmpfs /tmp), holding an existing database, and a run dir on a tmpfs, as installed (the
    service's RuntimeDirectory, where the heartbeat goes). Both removed afterwards."""
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=settings.storage.data_dir))
    shm = Path("/dev/shm")
    run_dir = Path(tempfile.mkdtemp(prefix="meraudiod-bench-", dir=shm if shm.is_dir() else None))
    try:
        # A device that has been running already has its database: creating and migrating
        # it is a one-off, not part of what is measured.
        open_db(scratch / "meraudiod.db").close()
        yield scratch, run_dir
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def daemon_env(
    settings: Settings, config_path: str | None, scratch: Path, run_dir: Path
) -> dict[str, str]:
    """The environment of a bench daemon: its data in `scratch`, heartbeat in `run_dir`, the
    configured models, MQTT off and HTTP off (the running service may hold its port)."""
    env = {
        **os.environ,
        "MERAUDIOD_STORAGE__DATA_DIR": str(scratch),
        "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir),
        "MERAUDIOD_STORAGE__MODELS_DIR": str(settings.storage.resolved_models_dir),
        "MERAUDIOD_MQTT__ENABLED": "false",
        "MERAUDIOD_HTTP__ENABLED": "false",
    }
    env.pop("MERAUDIOD_STORAGE__TMP_AUDIO_DIR", None)  # the scratch dir holds everything
    env.pop("NOTIFY_SOCKET", None)
    if config_path:
        env["MERAUDIOD_CONFIG"] = config_path
    return env


def bare_vad_loop(model: Path, threads: int, seconds: float, block_frames: int = 1) -> None:
    """Silero on onnxruntime and nothing else: frames of digital silence, the model's state
    carried, paced by sleeping until each block of `block_frames` 32 ms frames is due."""
    from .onnx import cpu_session

    session = cpu_session(model, threads, "VAD model")
    h = c = np.zeros(_STATE_SHAPE, dtype=np.float32)
    window = np.zeros((1, _CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
    t0 = time.monotonic()
    for i in range(int(seconds / FRAME_S)):
        _, h, c = session.run(None, {"input": window, "h": h, "c": c})
        if (i + 1) % block_frames == 0:
            wait = t0 + (i + 1) * FRAME_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)


if __name__ == "__main__":
    bare_vad_loop(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
