"""`meraudiod bench`: measure this device with the configured models and the bundled sample.

Every figure that has a bare-library counterpart is measured against it on the same input in
the same run, and the ratio is reported. Nothing here is a pass/fail test: it prints figures.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import select
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Final

import numpy as np
import soundfile

from . import __version__, models
from .asr import Transcriber
from .audio import FRAME_SAMPLES, SAMPLE_RATE_HZ, decode_file, to_float32
from .bench_disk import WalMeter, written_bytes
from .bench_listening import bench_listening, daemon_dirs, daemon_env, proc_cpu_s, proc_value
from .bench_memory import bench_memory, bench_peak_rss
from .bench_mqtt import MOSQUITTO_MISSING, EventCounter, local_broker, mqtt_overrides
from .config import Settings
from .machine import describe as describe_machine
from .signals import child_process
from .sources import demo_path
from .vad import SileroVad

_PASSAGE_S: Final = 30.0
_PIPELINE_TIMEOUT_S: Final = 300.0  # a daemon waiting for a server that never comes


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _best_of(runs: int, func: Callable[[], object]) -> float:
    """Fastest wall time of a few runs (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_vad(settings: Settings, audio: np.ndarray) -> dict[str, Any]:
    """Cost per frame back to back, ours (streaming) against faster-whisper's batch VAD."""
    from faster_whisper.vad import SileroVADModel

    path = models.vad_file(settings)
    vad = SileroVad(path, threads=settings.vad.threads)
    n = audio.size // FRAME_SAMPLES
    frames = [audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] for i in range(n)]

    def stream() -> None:
        vad.reset()
        for frame in frames:
            vad(frame)

    ours_s = _best_of(3, stream)
    bare = SileroVADModel(str(path))
    bare_s = _best_of(3, lambda: bare(audio[: n * FRAME_SAMPLES]))

    return {
        "vad_us_per_frame": round(ours_s / n * 1e6, 1),
        "vad_bare_batch_us_per_frame": round(bare_s / n * 1e6, 1),
        "vad_ratio_vs_bare": round(ours_s / bare_s, 2),
    }


def bench_asr(settings: Settings, command: np.ndarray, passage: np.ndarray) -> dict[str, Any]:
    """Real-time factor of our Transcriber against bare faster-whisper, same settings."""
    from faster_whisper import WhisperModel

    asr = settings.asr
    path = models.resolve(asr.model, settings.storage.resolved_models_dir, asr.allow_download)
    ours = Transcriber(path, asr, asr.model)
    bare = WhisperModel(
        str(path), device="cpu", compute_type=asr.compute_type, cpu_threads=asr.cpu_threads
    )

    def bare_run(audio: np.ndarray) -> None:
        segments, _ = bare.transcribe(
            audio,
            language=asr.language,
            beam_size=asr.beam_size,
            word_timestamps=asr.word_timestamps,
            condition_on_previous_text=False,
            temperature=[0.0],
        )
        list(segments)

    result: dict[str, Any] = {
        "asr_model": asr.model,
        "asr_compute_type": asr.compute_type,
        "asr_cpu_threads": asr.cpu_threads,
    }
    ours.transcribe(command)  # warm-up: first call pays one-off allocations
    for name, audio in (("command", command), ("passage", passage)):
        seconds = audio.size / SAMPLE_RATE_HZ
        ours_s = _best_of(2, lambda: ours.transcribe(audio))  # noqa: B023 - called at once
        bare_s = _best_of(2, lambda: bare_run(audio))  # noqa: B023
        result[f"asr_{name}_audio_s"] = round(seconds, 2)
        result[f"asr_{name}_rtf"] = round(ours_s / seconds, 3)
        result[f"asr_{name}_bare_rtf"] = round(bare_s / seconds, 3)
        result[f"asr_{name}_ratio_vs_bare"] = round(ours_s / bare_s, 2)
    return result


def bench_speakers(settings: Settings, audio: np.ndarray) -> dict[str, Any]:
    """Speaker-embedding cost per second of audio, when the model is installed."""
    from .voiceprints import SpeakerEmbedder, SpeakerError, onnx_file

    spk = settings.speakers
    try:
        path = onnx_file(models.resolve(spk.model, settings.storage.resolved_models_dir))
        embedder = SpeakerEmbedder(path, spk.model, spk.threads)
    except (models.ModelError, SpeakerError) as exc:  # not exported on this device
        return {"speaker_embedding_ms_per_audio_s": None, "speaker_note": str(exc)[:200]}
    seconds = audio.size / SAMPLE_RATE_HZ
    elapsed = _best_of(2, lambda: embedder(audio))
    return {"speaker_embedding_ms_per_audio_s": round(elapsed / seconds * 1000.0, 1)}


def bench_pipeline(
    settings: Settings,
    config_path: str | None,
    clip: Path,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The daemon itself, as a child process on a scratch data dir, fed the clip at real
    time: latency from end of speech to transcript stored, real-time factor, peak memory,
    CPU per second of speech while it runs (from READY=1, models loaded, to STOPPING=1, as
    its sd_notify says them: start-up and shut-down are once per boot, reported apart as
    `daemon_startup_cpu_s` and `daemon_stop_cpu_s`), and disk writes per recorded hour over
    the same span (the kernel's count of bytes the process wrote), split into the audio
    files, the SQLite log and the rest of the database (pages written back, blocks rounded).
    Start-up writes and the shut-down's (its final checkpoint) are once per boot, reported
    apart: a 20 s clip's would be counted 240 times over in an hourly rate. `overrides`:
    environment keys."""
    with daemon_dirs(settings) as (scratch, run_dir):
        env = daemon_env(settings, config_path, scratch, run_dir)
        # READY=1 and STOPPING=1 arrive as systemd would receive them.
        env["NOTIFY_SOCKET"] = str(run_dir / "notify")
        env.pop("WATCHDOG_USEC", None)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(env["NOTIFY_SOCKET"])
            notify.setblocking(False)
            return _run_daemon_on(clip, scratch, env | (overrides or {}), notify)


def _run_daemon_on(
    clip: Path, scratch: Path, env: dict[str, str], notify: socket.socket
) -> dict[str, Any]:
    """bench_pipeline's measurement, in its scratch data dir with its environment."""
    give_up_at = time.monotonic() + _PIPELINE_TIMEOUT_S
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with child_process(
        [sys.executable, "-m", "meraudiod", "run", "--source", f"file:{clip}", "--realtime"],
        env=env,
        cwd=scratch,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as child:
        peak_kb = file_kb = 0
        ready_cpu_s: float | None = None
        stopping_cpu_s: float | None = None
        startup_bytes = wal_at_ready = stopping_bytes = wal_at_stopping = 0
        wal = WalMeter(scratch / "meraudiod.db")
        while child.poll() is None:
            # The child's own high-water mark (ru_maxrss of children would include this
            # process's memory, which a forked child inherits before exec).
            peak_kb = max(peak_kb, proc_value(child.pid, "status", "VmHWM"))
            # Of which the libraries' pages (shared, from the page cache): more of them are mapped
            # where the files were just written, as on a fresh install (README, Performance).
            file_kb = max(file_kb, proc_value(child.pid, "status", "RssFile"))
            wal.poll()
            for message in _notifications(notify, wait_s=0.2):
                if ready_cpu_s is None and "READY=1" in message:
                    ready_cpu_s = proc_cpu_s(child.pid)
                    startup_bytes = written_bytes(child.pid)
                    wal_at_ready = wal.bytes_written
                if stopping_cpu_s is None and "STOPPING=1" in message:
                    stopping_cpu_s = proc_cpu_s(child.pid)
                    stopping_bytes = written_bytes(child.pid)
                    wal_at_stopping = wal.bytes_written
            if time.monotonic() > give_up_at:
                child.kill()
                child.wait()
                raise RuntimeError("the daemon did not finish the bench clip (no ASR server?)")
    if child.returncode != 0:
        raise RuntimeError(f"the daemon failed on the bench clip (exit {child.returncode})")
    wall_s = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if ready_cpu_s is None or stopping_cpu_s is None:
        raise RuntimeError("the daemon said no READY=1 or no STOPPING=1 on the bench clip")
    conn = sqlite3.connect(scratch / "meraudiod.db")
    rows = conn.execute("SELECT duration_s, rtf, latency_ms, model FROM recordings").fetchall()
    conn.close()
    speech_s = sum(r[0] for r in rows)
    latencies = sorted(r[2] for r in rows if r[2] is not None)
    rtfs = [r[1] for r in rows if r[1] is not None]  # none when asr is off
    per_hour = 3600.0 / speech_s if speech_s else 0.0
    audio_bytes = sum(p.stat().st_size for p in (scratch / "audio").rglob("*") if p.is_file())
    # Linux: 512-byte units, counted as pages are dirtied (what reaches the card)
    stop_bytes = (after.ru_oublock - before.ru_oublock) * 512 - stopping_bytes
    run_bytes = stopping_bytes - startup_bytes
    wal_bytes = wal_at_stopping - wal_at_ready

    def mb_per_hour(n_bytes: float) -> float:
        return round(n_bytes / 1e6 * per_hour, 1)

    return {
        "pipeline_recordings": len(rows),
        "pipeline_speech_s": round(speech_s, 1),
        "pipeline_wall_s": round(wall_s, 1),
        "pipeline_rtf_mean": round(float(np.mean(rtfs)), 3) if rtfs else None,
        "latency_ms_median": round(float(np.median(latencies)), 0) if latencies else None,
        "latency_ms_max": round(latencies[-1], 0) if latencies else None,
        "daemon_peak_rss_mb": round(peak_kb / 1024, 0),
        "daemon_file_rss_mb": round(file_kb / 1024, 0),
        "device_cpu_s_per_speech_s": (
            round((stopping_cpu_s - ready_cpu_s) / speech_s, 4) if speech_s else None
        ),
        "daemon_startup_cpu_s": round(ready_cpu_s, 2),
        "daemon_stop_cpu_s": round(cpu_s - stopping_cpu_s, 2),
        "pipeline_asr_model": ", ".join(sorted({str(r[3]) for r in rows})),
        "disk_write_mb_per_recorded_hour": mb_per_hour(run_bytes),
        "audio_mb_per_recorded_hour": mb_per_hour(audio_bytes),
        "database_mb_per_recorded_hour": mb_per_hour(run_bytes - audio_bytes),
        "database_wal_mb_per_recorded_hour": mb_per_hour(wal_bytes),
        "database_checkpoint_and_blocks_mb_per_recorded_hour": mb_per_hour(
            run_bytes - audio_bytes - wal_bytes
        ),
        "disk_write_startup_kb": round(startup_bytes / 1e3),
        "disk_write_stop_kb": round(stop_bytes / 1e3),
    }


def bench_pipeline_mqtt(
    settings: Settings, config_path: str | None, clip: Path, port: int
) -> dict[str, Any]:
    """bench_pipeline with MQTT on to the broker on `port`: the disk writes and CPU as most
    devices run (`mqtt_*`), and how many events reached a separate subscriber."""
    counter = EventCounter(settings, port)
    try:
        figures = bench_pipeline(settings, config_path, clip, mqtt_overrides(port))
    finally:
        counter.close()
    kept = (
        "disk_write_mb_per_recorded_hour",
        "audio_mb_per_recorded_hour",
        "database_mb_per_recorded_hour",
        "database_wal_mb_per_recorded_hour",
        "database_checkpoint_and_blocks_mb_per_recorded_hour",
        "disk_write_stop_kb",
        "device_cpu_s_per_speech_s",
    )
    return {f"mqtt_{key}": figures[key] for key in kept} | {"mqtt_events_received": counter.count}


def _notifications(sock: socket.socket, wait_s: float) -> list[str]:
    """The sd_notify messages that arrive within `wait_s` (returning at the first)."""
    messages: list[str] = []
    if select.select([sock], [], [], wait_s)[0]:
        while True:
            try:
                messages.append(sock.recv(4096).decode(errors="replace"))
            except BlockingIOError:
                return messages
    return messages


def unmeasurable(settings: Settings, only: Collection[str]) -> list[str]:
    """The sections of `bench --only` these settings leave nothing to measure for, with why
    (the full bench skips them)."""
    off = []
    if "asr" in only and settings.asr.backend == "wyoming":
        off.append('asr (asr.backend = "wyoming": the servers transcribe)')
    if "http" in only and not settings.http.enabled:
        off.append("http (http.enabled = false)")
    return off


def run_bench(
    settings: Settings,
    config_path: str | None,
    progress: Callable[[str], None],
    only: Collection[str] | None = None,
    clip_s: float = 20.0,
) -> dict[str, Any]:
    """Every figure, in under two minutes on a Raspberry-Pi-class device; or those of the
    sections in `only` (`bench --only`: vad, listening, asr, speakers, pipeline, memory,
    http), with the verdict when they include what it is made of. The daemon runs on the
    sample's first `clip_s` at real time (20 s: three utterances)."""
    pcm = decode_file(demo_path())
    figures: dict[str, Any] = {
        "version": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "processor": _cpu_model(),
        **{k: v for k, v in describe_machine().items() if k != "architecture"},
        "timings_note": "every time below was measured on this machine and holds for it only",
    }
    started = time.monotonic()
    with local_broker() as broker_port:  # None without mosquitto: MQTT-off figures only
        if broker_port is None:  # said in one line of the output
            figures["mqtt_note"] = MOSQUITTO_MISSING
        figures |= _bench_device(settings, config_path, pcm, broker_port, progress, only, clip_s)
    figures["bench_s"] = round(time.monotonic() - started, 1)
    return figures


def _bench_device(
    settings: Settings,
    config_path: str | None,
    pcm: np.ndarray,
    broker_port: int | None,
    progress: Callable[[str], None],
    only: Collection[str] | None,
    clip_s: float,
) -> dict[str, Any]:
    """run_bench's figures of this device; with MQTT on too when a broker is given."""

    def wanted(section: str) -> bool:
        return only is None or section in only

    audio = to_float32(pcm)
    truth = json.loads((demo_path().parent / "demo.json").read_text())["utterances"]
    short = truth[1]  # "he was not an ill disposed young man": a command-length utterance
    command = audio[
        int((short["start_s"] - 0.3) * SAMPLE_RATE_HZ) : int(
            (short["end_s"] + 0.3) * SAMPLE_RATE_HZ
        )
    ]
    passage = audio[: int(_PASSAGE_S * SAMPLE_RATE_HZ)]
    mqtt = None if broker_port is None else mqtt_overrides(broker_port)
    figures: dict[str, Any] = {}
    if wanted("vad"):
        progress("VAD")
        figures |= bench_vad(settings, audio)
    if wanted("listening"):
        progress("listening to silence at real time, beside a bare VAD loop")
        figures |= bench_listening(settings, config_path, mqtt=mqtt)
    wyoming = settings.asr.backend == "wyoming"
    if not wyoming and wanted("asr"):  # the servers transcribe: no local model to time
        progress("ASR")
        figures |= bench_asr(settings, command, passage)
    if wanted("speakers"):
        progress("speaker embeddings")
        figures |= bench_speakers(settings, passage)
    if wanted("pipeline"):
        progress("pipeline at real time")
        clip = pcm[: int(clip_s * SAMPLE_RATE_HZ)]
        figures |= _bench_pipelines(settings, config_path, clip, broker_port, progress, figures)
    if wanted("memory"):
        progress("memory per library and model")
        figures |= bench_memory(config_path)
    if settings.http.enabled and wanted("http"):
        from .bench_http import LONG_UPLOAD_S, LONG_UPLOADS, bench_http, bench_long_uploads

        progress("HTTP stage")
        figures |= bench_http(settings, config_path)
        progress(f"{LONG_UPLOADS} uploads of {LONG_UPLOAD_S / 60:g} minutes")
        figures |= bench_long_uploads(settings, config_path)
    if wanted("speakers") and wanted("pipeline") and (wyoming or wanted("asr")):
        figures |= _verdict(settings, figures)
    return figures


def _bench_pipelines(
    settings: Settings,
    config_path: str | None,
    pcm: np.ndarray,
    broker_port: int | None,
    progress: Callable[[str], None],
    figures: dict[str, Any],
) -> dict[str, Any]:
    """The daemon on `pcm` (the sample's first seconds) at real time: local (with MQTT on too,
    and its peak memory with speakers on and off) or on the Wyoming servers."""
    wyoming = settings.asr.backend == "wyoming"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "bench.flac"
        soundfile.write(clip, pcm, SAMPLE_RATE_HZ)
        if wyoming:
            from .bench_wyoming import bench_wyoming

            return bench_wyoming(settings, config_path, clip)
        out |= bench_pipeline(settings, config_path, clip)
        if broker_port is not None:
            progress("pipeline at real time with MQTT on (a local mosquitto)")
            out |= bench_pipeline_mqtt(settings, config_path, clip, broker_port)
        progress("peak memory with speakers on and off")
        out |= bench_peak_rss(settings, config_path, clip, figures | out)
    return out


def _verdict(settings: Settings, figures: dict[str, Any]) -> dict[str, Any]:
    """Whether the device keeps up with continuous speech, from the ASR, speaker and
    pipeline figures."""
    wyoming = settings.asr.backend == "wyoming"
    # Continuous speech arrives as utterances of a few seconds up to max_utterance_s: the
    # measured per-recording cost is the honest figure (each pays a whole encoder pass).
    # On Wyoming servers, what the device itself spends per second of speech.
    asr_cost_s = (
        figures["device_cpu_s_per_speech_s"] or 0.0
        if wyoming
        else max(figures["asr_passage_rtf"], figures["pipeline_rtf_mean"] or 0.0)
    )
    per_speech_s = asr_cost_s + (
        (figures["speaker_embedding_ms_per_audio_s"] or 0.0) / 1000.0
        if settings.speakers.enabled
        else 0.0
    )
    verdict = (
        f"the device spends {per_speech_s:.3f} s of CPU per second of speech; the Wyoming"
        " servers transcribe"
        if wyoming
        else f"keeps up with continuous speech: {per_speech_s:.2f} s of work per second of speech"
        if per_speech_s < 1.0
        else f"falls behind on continuous speech ({per_speech_s:.2f} s of work per second);"
        " the backlog grows on disk and drains in pauses"
    )
    return {
        "speech_cost_per_audio_s": round(per_speech_s, 3),
        "keeps_up": per_speech_s < 1.0,
        "verdict": verdict,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
