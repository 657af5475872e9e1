"""`meraudiod bench` with `asr.backend = "wyoming"`: the daemon on the configured servers,
against the same daemon transcribing locally and recording only.

What `device_cpu_s_per_speech_s` counts, in all three runs alike: every thread of the whole
daemon process (listening, VAD, FLAC, SQLite, transcription or the Wyoming client) from its
READY=1 (models loaded, database migrated) to its STOPPING=1, divided by the seconds of speech
it recorded from the bench clip; start-up and shut-down, once per boot, are reported apart.
The same configuration file each time, only the ASR settings named here differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from . import models
from .bench import bench_pipeline
from .config import Settings

CPU_NOTE: Final = (
    "device_cpu_s_per_speech_s: CPU seconds of the whole daemon process (every thread:"
    " listening, VAD, FLAC, SQLite, transcription or Wyoming client) from READY=1 to"
    " STOPPING=1, per second of speech recorded; start-up and shut-down, once per boot, are"
    " daemon_startup_cpu_s and daemon_stop_cpu_s; same configuration in every run, only the"
    " ASR backend differs; recording_only is the same daemon with asr.enabled = false"
)


def bench_wyoming(settings: Settings, config_path: str | None, clip: Path) -> dict[str, Any]:
    """The daemon on the configured Wyoming servers without a local Whisper model (fallback
    wait), and the same daemon transcribing locally when the local model is installed."""
    remote = bench_pipeline(settings, config_path, clip, {"MERAUDIOD_ASR__FALLBACK": "wait"})
    figures: dict[str, Any] = {
        "asr_backend": "wyoming",
        "asr_servers": ", ".join(settings.asr.wyoming.servers),
        "device_cpu_note": CPU_NOTE,
        **remote,
    }
    asr = settings.asr
    try:
        models.resolve(asr.model, settings.storage.resolved_models_dir, asr.allow_download)
    except models.ModelError:
        figures["local_note"] = f"no local {asr.model} on this device to compare with"
        return figures
    local = bench_pipeline(settings, config_path, clip, {"MERAUDIOD_ASR__BACKEND": "local"})
    # What both pay alike (VAD on every frame, FLAC, SQLite): the daemon recording only.
    base = bench_pipeline(settings, config_path, clip, {"MERAUDIOD_ASR__ENABLED": "false"})
    cpu = "device_cpu_s_per_speech_s"
    if not (remote[cpu] and local[cpu] and base[cpu]):
        raise RuntimeError("the bench clip gave no speech to measure")
    figures["local_device_cpu_s_per_speech_s"] = local[cpu]
    figures["local_daemon_peak_rss_mb"] = local["daemon_peak_rss_mb"]
    figures["device_cpu_ratio_vs_local"] = round(remote[cpu] / local[cpu], 3)
    figures["recording_only_cpu_s_per_speech_s"] = base[cpu]
    # A difference of two measurements: run-to-run noise could take it below zero.
    remote_asr, local_asr = max(0.0, remote[cpu] - base[cpu]), local[cpu] - base[cpu]
    figures["transcription_cpu_s_per_speech_s"] = round(remote_asr, 4)
    figures["local_transcription_cpu_s_per_speech_s"] = round(local_asr, 4)
    figures["transcription_cpu_ratio_vs_local"] = round(remote_asr / local_asr, 3)
    return figures
