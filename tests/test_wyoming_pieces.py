"""The Wyoming client's pieces that need no server: cutting a recording at pauses (from the
listener's VAD trace or the VAD run again), the guard without scores, the server settings,
and the README's set-up commands."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from meraudiod import models
from meraudiod.asr import Segment, judge
from meraudiod.asr_wyoming import speech_spans
from meraudiod.audio import FRAME_SAMPLES, SAMPLE_RATE_HZ, decode_file, to_float32
from meraudiod.config import ConfigError, Settings, load_settings
from meraudiod.pipeline import Pipeline
from meraudiod.sources import FileSource
from meraudiod.vad import SileroVad

from .conftest import DEMO, DEMO_TRUTH, REPO, db_rows
from .test_wyoming import wyoming_env


def test_recordings_are_cut_at_pauses(settings: Settings) -> None:
    """The demo's five utterances, 2 s apart, as one recording: five requests, at the right
    times."""
    audio = to_float32(decode_file(DEMO))
    vad = SileroVad(models.vad_file(settings))
    spans = speech_spans(audio, vad, settings)
    assert len(spans) == len(DEMO_TRUTH)
    for (start_s, end_s), truth in zip(spans, DEMO_TRUTH, strict=True):
        assert abs(start_s - truth["start_s"]) < 0.5 and abs(end_s - truth["end_s"]) < 0.5
    silence = np.zeros(2 * SAMPLE_RATE_HZ, dtype=np.float32)
    assert speech_spans(silence, vad, settings) == [(0.0, 2.0)]  # nothing found: all of it


def test_the_listeners_vad_trace_cuts_a_recording_as_the_vad_does(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Wyoming client cuts a recording with the speech probabilities the listener kept
    for it (no second VAD pass): the same five parts as the VAD run over it again. A 3 s
    hangover makes the demo's five utterances, 2 s apart, one recording."""
    for key, value in wyoming_env({}, ["tcp://127.0.0.1:1"]).items():
        monkeypatch.setenv(key, value)  # what the pipeline keeps traces for
    monkeypatch.setenv("MERAUDIOD_ASR__ENABLED", "false")  # the listener only: no server
    monkeypatch.setenv("MERAUDIOD_RECORDER__HANGOVER_MS", "3000")
    settings = load_settings()
    pipeline = Pipeline(settings, threading.Event())
    pipeline.open()
    source = FileSource(DEMO)
    source.start()
    listener = pipeline.listener(source, keep_ids=True)
    assert listener.finished.wait(120) and listener.recording_ids is not None
    assert pipeline.vad_traces is not None
    vad = SileroVad(models.vad_file(settings))
    rows = db_rows(env, "SELECT id, audio_path FROM recordings ORDER BY start_s")
    assert [r["id"] for r in rows] == listener.recording_ids
    parts = []
    for row in rows:  # (the 28 s length limit cuts the demo in two)
        audio = to_float32(decode_file(settings.storage.audio_dir / row["audio_path"]))
        trace = pipeline.vad_traces.get(row["id"])
        assert trace is not None and trace.size == audio.size // FRAME_SAMPLES
        from_trace = speech_spans(audio, vad, settings, trace)
        again = speech_spans(audio, vad, settings)
        assert len(from_trace) == len(again)
        for (start_s, end_s), (start2_s, end2_s) in zip(from_trace, again, strict=True):
            assert abs(start_s - start2_s) <= 0.1 and abs(end_s - end2_s) <= 0.1
        # A trace that does not fit the audio is not used: the VAD runs again.
        assert speech_spans(audio, vad, settings, trace[:-1]) == again
        parts.append(len(from_trace))
    assert sum(parts) == len(DEMO_TRUTH) and max(parts) >= 2


def test_guard_without_scores(settings: Settings) -> None:
    """A server gives text only: phantom phrases cannot be vouched for, sound labels and
    loops are still caught, and ordinary speech passes."""

    def unscored(text: str) -> Segment:
        return Segment(0.0, 1.0, text, None, None, compression_ratio=1.0)

    assert judge(unscored("Thank you."), settings.asr) == "phantom_phrase"
    assert judge(unscored("(music)"), settings.asr) == "sound_label"
    assert judge(unscored("Turn off the kitchen lights."), settings.asr) is None
    loop = Segment(0.0, 1.0, "the " * 40, None, None, compression_ratio=5.0)
    assert judge(loop, settings.asr) == "repetitive"


def test_server_settings_are_checked(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[asr]\nbackend = "wyoming"\n')
    with pytest.raises(ConfigError, match=r"asr.wyoming.servers"):
        load_settings(path)
    path.write_text('[asr]\nbackend = "wyoming"\n[asr.wyoming]\nservers = ["gpu-box:10300"]\n')
    with pytest.raises(ConfigError, match=r"asr.wyoming.servers.*'gpu-box:10300'"):
        load_settings(path)


def test_the_readmes_set_up_commands_configure_a_wyoming_server(tmp_path: Path) -> None:
    """The README's sed line, run on the installed configuration (config.example.toml),
    gives a configuration that loads with the Home Assistant add-on as the server."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Transcribing on another machine (Wyoming)") :]
    start = section.index("```sh\n") + 6
    block = section[start : section.index("\n```", start)]
    command = block.split("\nsudo systemctl")[0].replace("\\\n", " ")
    assert command.startswith("sudo sed -i ")
    config = tmp_path / "config.toml"
    config.write_text((REPO / "config.example.toml").read_text(encoding="utf-8"))
    command = command.removeprefix("sudo ").replace("/etc/meraudiod/config.toml", str(config))
    subprocess.run(["bash", "-c", command], check=True, timeout=30)
    asr = load_settings(config).asr
    assert (asr.backend, asr.fallback) == ("wyoming", "wait")
    assert asr.wyoming.servers == ["tcp://homeassistant.local:10300"]
