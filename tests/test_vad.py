"""The real Silero model, streamed frame by frame, on real speech and real non-speech."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from meraudiod import models
from meraudiod.audio import FRAME_SAMPLES, decode_file, to_float32
from meraudiod.config import Settings
from meraudiod.vad import SileroVad

from .conftest import DEMO, DEMO_TRUTH, TEST_DATA


def probabilities(vad: SileroVad, path: Path) -> np.ndarray:
    return probabilities_of(vad, to_float32(decode_file(path)))


def probabilities_of(vad: SileroVad, audio: np.ndarray) -> np.ndarray:
    """A new stream: the probability of each whole frame."""
    vad.reset()
    n = audio.size // FRAME_SAMPLES
    return np.array([vad(audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(n)])


def test_speech_is_speech_and_silence_is_not(settings: Settings) -> None:
    vad = SileroVad(models.vad_file(settings))
    probs = probabilities(vad, DEMO)
    t = np.arange(probs.size) * FRAME_SAMPLES / 16000
    for utt in DEMO_TRUTH:
        inside = probs[(t > utt["start_s"] + 0.2) & (t < utt["end_s"] - 0.2)]
        assert np.mean(inside > 0.5) > 0.8, utt["text"]
    gaps = [(a["end_s"] + 0.5, b["start_s"] - 0.5) for a, b in itertools.pairwise(DEMO_TRUTH)]
    for start, end in gaps:
        assert probs[(t > start) & (t < end)].max() < 0.2


def test_music_and_whale_song_stay_below_threshold_mostly(settings: Settings) -> None:
    vad = SileroVad(models.vad_file(settings))
    for name in ("music_strings_pd.flac", "humpback_whale_pd.flac"):
        probs = probabilities(vad, TEST_DATA / name)
        assert np.mean(probs > 0.5) < 0.05, name


def test_state_is_carried_and_reset(settings: Settings) -> None:
    vad = SileroVad(models.vad_file(settings))
    path = TEST_DATA / "librivox_0880.wav"
    streamed = probabilities(vad, path)
    # The same frames, each as the first of a new stream: what a VAD that dropped its LSTM
    # state and audio context between frames would say. It misses half of the speech.
    audio = to_float32(decode_file(path))
    fresh = []
    for i in range(streamed.size):
        vad.reset()
        fresh.append(vad(audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]))
    assert np.mean(streamed > 0.5) > 0.7
    assert np.mean(np.array(fresh) > 0.5) < np.mean(streamed > 0.5) - 0.2
    assert np.mean(np.abs(streamed - np.array(fresh))) > 0.2
    again = probabilities(vad, path)
    assert np.allclose(streamed, again)  # reset() makes a new stream start from scratch


def test_int16_frames_as_a_source_delivers_them_give_the_same_probabilities(
    settings: Settings,
) -> None:
    """The listener hands the VAD its int16 frames (scaled into the model's input, no copy
    per frame): exactly what the same frames as float32 give, context and state carried."""
    vad = SileroVad(models.vad_file(settings))
    pcm = decode_file(DEMO)[: 20 * 16000]
    as_float = probabilities_of(vad, to_float32(pcm))
    as_int16 = probabilities_of(vad, pcm)
    assert np.mean(as_float > 0.5) > 0.3  # real speech in it
    assert np.array_equal(as_int16, as_float)
