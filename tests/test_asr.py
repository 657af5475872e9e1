"""Transcription with the real tiny.en model, and the hallucination guard."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from meraudiod import models
from meraudiod.asr import LEAD_IN_SAMPLES, Segment, Transcriber, judge
from meraudiod.audio import decode_file, to_float32
from meraudiod.config import Settings
from meraudiod.config_sections import AsrSettings

from .conftest import DEMO, SHARED_DATA, TEST_DATA, needs_shared


@pytest.fixture(scope="module")
def transcriber(models_dir: object) -> Transcriber:
    settings = AsrSettings()
    path = models.resolve("tiny.en", models_dir)  # type: ignore[arg-type]
    return Transcriber(path, settings, "tiny.en")


def seg(text: str, avg_logprob: float = -0.3, no_speech_prob: float = 0.1) -> Segment:
    return Segment(0.0, 1.0, text, avg_logprob, no_speech_prob, compression_ratio=1.2)


@pytest.mark.parametrize(
    ("segment", "reason"),
    [
        (seg("Turn on the kitchen lights."), None),
        (seg("Two.", avg_logprob=-1.1, no_speech_prob=0.55), None),  # a real short command
        (seg("Thanks for watching!", avg_logprob=-0.9, no_speech_prob=0.7), "phantom_phrase"),
        (seg("Thank you.", avg_logprob=-1.2, no_speech_prob=0.35), "phantom_phrase"),
        (seg("Thank you.", avg_logprob=-0.2, no_speech_prob=0.05), None),  # said clearly
        (seg("Hello there", avg_logprob=-1.3, no_speech_prob=0.8), "no_speech"),
        (seg("Music", avg_logprob=-0.9), "sound_label"),
        (seg("Beep, beep, beep!"), "sound_label"),
        (seg("..."), "sound_label"),
        (seg("33."), None),  # a spoken number is speech
        (seg("268-441-8."), None),
        (seg("Oh", avg_logprob=-1.2), "sound_label"),
        (seg("I'm going to go back.", avg_logprob=-1.7), "low_confidence"),
        (seg(""), "empty"),
    ],
)
def test_judge(segment: Segment, reason: str | None) -> None:
    assert judge(segment, AsrSettings()) == reason


def test_real_speech_is_transcribed_with_words_and_scores(transcriber: Transcriber) -> None:
    transcript = transcriber.transcribe(to_float32(decode_file(TEST_DATA / "librivox_0880.wav")))
    assert not transcript.suspect
    assert "young man" in transcript.text.lower()
    (segment,) = transcript.segments
    assert segment.words and segment.words[0].start_s < segment.words[-1].end_s <= 3.0
    assert -1.0 < segment.avg_logprob < 0 and 0 <= segment.no_speech_prob < 0.5


def test_silence_and_music_are_suspect(transcriber: Transcriber) -> None:
    for audio in (
        np.zeros(16000 * 3, dtype=np.float32),
        to_float32(decode_file(TEST_DATA / "music_strings_pd.flac")),
        to_float32(decode_file(TEST_DATA / "humpback_whale_pd.flac")),
    ):
        transcript = transcriber.transcribe(audio)
        assert transcript.suspect and transcript.text == ""


@needs_shared
def test_guard_on_real_nonspeech(transcriber: Transcriber) -> None:
    """Non-speech the VAD let through: at most a few invented texts get past the guard."""
    folder = SHARED_DATA / "nonspeech"
    entries = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    files = [e["file"] for e in entries if not e["contains_speech"]]
    trusted = [
        f
        for f in files
        if transcriber.transcribe(to_float32(decode_file(folder / f))[: 16000 * 28]).text
    ]
    assert len(trusted) <= 0.1 * len(files), trusted


def test_worker_settings_default_is_quantized(settings: Settings) -> None:
    assert settings.asr.compute_type == "int8" and settings.asr.model == "tiny.en"


def test_features_of_long_audio_are_the_same_without_its_working_memory(
    transcriber: Transcriber,
) -> None:
    """faster-whisper's features of a whole recording at once took some 64 bytes of working
    memory per sample (a 24-minute upload: the daemon's peak RSS 228 MB -> 1.5 GB); block by
    block, the features themselves and a block's few MB. The lead-in of silence Whisper hears
    first is in them (it was a copy of the recording). numpy's buffers are traced."""
    from faster_whisper.feature_extractor import FeatureExtractor

    demo = to_float32(decode_file(DEMO))
    audio = np.tile(demo, 9)[: 16000 * 300 + 77]  # 5 minutes, not a whole number of blocks
    extractor = transcriber._model.feature_extractor  # what transcribe() computes them with
    tracemalloc.start()
    try:
        features = extractor(audio)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = FeatureExtractor()(np.concatenate([np.zeros(LEAD_IN_SAMPLES, np.float32), audio]))
    assert features.shape == expected.shape and features.dtype == np.float32
    assert np.abs(features - expected).max() < 1e-5
    # 9.6 MB of features and at most 20 MB for a block; it was 308 MB (all at once).
    assert peak_bytes < features.nbytes + 20_000_000, peak_bytes / 1e6
