"""What each library and model costs in memory, for `meraudiod bench`.

A fresh Python process (`python -m meraudiod.bench_memory`) takes one step at a time:
the interpreter, numpy, onnxruntime, faster-whisper (with CTranslate2 and what it imports),
meraudiod's own modules with the bundled sample decoded, then each model loaded and run once
(VAD, Whisper and segmentation on 10 s of the sample, the speaker embedder on the longest
stretch the daemon embeds, `speakers.max_embedding_s`), every model kept loaded as in the
daemon. After each step it prints one JSON line with its RSS and high-water mark; the cost
of a step is the growth of RSS over the step before, and `memory_peak_rss_mb` the
high-water mark of it all (the embedder's working memory on its longest input). malloc is
tuned as in the daemon (memory.py). A model that is not installed is skipped with a note.
This module imports nothing heavy at the top: the child counts every import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .config import Settings

_TIMEOUT_S: Final = 240.0
_SAMPLE_S: Final = 10.0


def rss_kb(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB (Linux), zeros when they cannot be read."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name = line.split(maxsplit=1)[0] if line else ""
            if name in values:
                values[name] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return values["VmRSS:"], values["VmHWM:"]


def bench_memory(config_path: str | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the steps in a fresh process; `memory_<step>_mb` is what each step added."""
    child_env = dict(env if env is not None else os.environ)
    if config_path:
        child_env["MERAUDIOD_CONFIG"] = config_path
    result = subprocess.run(
        [sys.executable, "-m", "meraudiod.bench_memory"],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the memory bench failed (exit {result.returncode}): {tail}")
    figures: dict[str, Any] = {}
    previous_kb = peak_kb = 0
    for line in result.stdout.splitlines():
        step = json.loads(line)
        name = step["step"]
        if "note" in step:
            figures[f"memory_{name}_mb"] = None
            figures[f"memory_{name}_note"] = step["note"]
            continue
        figures[f"memory_{name}_mb"] = round((step["rss_kb"] - previous_kb) / 1024, 1)
        previous_kb, peak_kb = step["rss_kb"], step["peak_kb"]
    figures["memory_all_loaded_rss_mb"] = round(previous_kb / 1024, 1)
    figures["memory_peak_rss_mb"] = round(peak_kb / 1024, 1)
    return figures


def bench_peak_rss(
    settings: Settings, config_path: str | None, clip: Path, measured: dict[str, Any]
) -> dict[str, Any]:
    """The daemon's peak RSS with speakers and diarization on and with both off: `measured`
    is the bench's pipeline run with the configuration as it is; the other one runs here."""
    from .bench import bench_pipeline

    on = settings.speakers.enabled and settings.diarization.enabled
    off = not (settings.speakers.enabled or settings.diarization.enabled)
    peaks: dict[bool, float | None] = {}
    if on or off:
        peaks[on] = measured["daemon_peak_rss_mb"]
    figures: dict[str, Any] = {}
    for speakers in (True, False):
        if speakers in peaks:
            continue
        value = "true" if speakers else "false"
        overrides = {"MERAUDIOD_SPEAKERS__ENABLED": value, "MERAUDIOD_DIARIZATION__ENABLED": value}
        try:
            peaks[speakers] = bench_pipeline(settings, config_path, clip, overrides)[
                "daemon_peak_rss_mb"
            ]
        except RuntimeError as exc:  # e.g. the speaker models are not installed here
            peaks[speakers] = None
            figures["daemon_peak_rss_note"] = str(exc)
    figures["daemon_peak_rss_mb_speakers_on"] = peaks[True]
    figures["daemon_peak_rss_mb_speakers_off"] = peaks[False]
    return figures


def _report(step: str, note: str | None = None) -> None:
    """One JSON line for the parent: this process's RSS after `step`."""
    rss, peak = rss_kb()
    line: dict[str, Any] = {"step": step, "rss_kb": rss, "peak_kb": peak}
    if note is not None:
        line = {"step": step, "note": note[:200]}
    print(json.dumps(line), flush=True)


def _child() -> None:
    """The steps, in order, in this fresh process, with malloc tuned as the daemon's."""
    from .memory import defer_pyav, tune_malloc
    from .whisper_tokenizer import install

    tune_malloc()
    defer_pyav()  # as the daemon does
    install()
    _report("python")
    import numpy  # noqa: F401 - imported to be counted

    _report("numpy")
    import onnxruntime  # noqa: F401

    _report("onnxruntime")
    import faster_whisper  # noqa: F401

    _report("faster_whisper")
    from . import models
    from .asr import Transcriber
    from .audio import FRAME_SAMPLES, SAMPLE_RATE_HZ, decode_file, to_float32
    from .config import load_settings
    from .diarization import SegmentationModel
    from .sources import demo_path
    from .vad import SileroVad
    from .voiceprints import SpeakerEmbedder, onnx_file

    settings = load_settings()
    demo = to_float32(decode_file(demo_path()))
    audio = demo[: int(_SAMPLE_S * SAMPLE_RATE_HZ)]
    _report("meraudiod")
    models_dir = settings.storage.resolved_models_dir

    def vad() -> None:
        model = SileroVad(models.vad_file(settings), threads=settings.vad.threads)
        kept.append(model)
        for start in range(0, audio.size - FRAME_SAMPLES + 1, FRAME_SAMPLES):
            model(audio[start : start + FRAME_SAMPLES])

    def whisper() -> None:
        asr = settings.asr
        path = models.resolve(asr.model, models_dir, asr.allow_download)
        kept.append(Transcriber(path, asr, asr.model))
        kept[-1].transcribe(audio)

    def segmentation() -> None:
        path = onnx_file(models.resolve(settings.diarization.model, models_dir))
        kept.append(SegmentationModel(path, settings.speakers.threads))
        kept[-1].window(audio)

    def embedder() -> None:
        spk = settings.speakers
        path = onnx_file(models.resolve(spk.model, models_dir))
        kept.append(SpeakerEmbedder(path, spk.model, spk.threads))
        kept[-1](demo[: int(spk.max_embedding_s * SAMPLE_RATE_HZ)])  # the longest it embeds

    kept: list[Any] = []  # every model stays loaded, as in the daemon
    steps: list[tuple[str, Callable[[], None]]] = [
        ("vad", vad),
        ("whisper", whisper),
        ("segmentation", segmentation),
        ("speaker_embedder", embedder),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # a model not installed here: say so, measure the rest
            _report(name, f"{type(exc).__name__}: {exc}")
            continue
        _report(name)


if __name__ == "__main__":
    _child()
