"""pyannote segmentation-3.0 and its frames: 10 s windows of audio -> who speaks when, locally.

The model gives, every 16.875 ms, the probabilities of seven powerset classes: nobody, one
of three window-local speakers, or two of them at once. The helpers here turn its frames
into sample ranges and runs (diarization.py, speakers.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from .audio import SAMPLE_RATE_HZ, Float32Array
from .onnx import OnnxLoadError, cpu_session

WINDOW_SAMPLES: Final = 10 * SAMPLE_RATE_HZ
FRAME_STEP_SAMPLES: Final = 270  # 16.875 ms per output frame
FRAME_CENTRE_SAMPLES: Final = 495  # half the model's receptive field
# Frames the model gives for a whole window: 589, each with its receptive field (991 samples)
# inside the 10 s (n_frames(WINDOW_SAMPLES), 591, counts the last frames' centres only).
WINDOW_FRAMES: Final = (WINDOW_SAMPLES - (2 * FRAME_CENTRE_SAMPLES + 1)) // FRAME_STEP_SAMPLES + 1
# Powerset class -> which of the window's three speakers are active.
_POWERSET: Final = np.array(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.int8
)
Mask = npt.NDArray[np.bool_]


class DiarizationError(Exception):
    """The segmentation model could not be loaded or run."""


class SegmentationModel:
    """pyannote segmentation-3.0 on onnxruntime: 10 s of audio -> powerset classes per frame."""

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        try:
            self._session = cpu_session(model_path, threads, "segmentation model")
        except OnnxLoadError as exc:
            raise DiarizationError(str(exc)) from exc

    def probabilities(self, audio: Float32Array) -> Float32Array:
        """The seven powerset classes' probabilities per frame [frames, 7] for up to 10 s."""
        chunk = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        chunk[: audio.size] = audio[:WINDOW_SAMPLES]
        log_probs = self._session.run(None, {"input": chunk.reshape(1, 1, -1)})[0][0]
        frames = min(n_frames(audio.size), WINDOW_FRAMES)  # those of its audio
        return np.exp(np.asarray(log_probs, dtype=np.float32)[:frames])

    def window(self, audio: Float32Array, lenient: bool = False) -> npt.NDArray[np.int8]:
        """Active local speakers per frame [frames, 3] for up to 10 s of audio (`activity`)."""
        return activity(self.probabilities(audio), lenient)


def activity(
    probs: Float32Array, lenient: bool = False, overlap_probability: float | None = None
) -> npt.NDArray[np.int8]:
    """Active local speakers per frame [frames, 3] from the powerset probabilities.

    The most probable class, except: lenient, a frame is speech when "nobody" has under half
    the probability (the speaker classes together hold more); with overlap_probability, a
    frame has two speakers (the likeliest pair) when the pairs together hold more than that.
    """
    classes = np.argmax(probs, axis=1)
    if lenient:  # diarization: missed speech was most of its error on AMI
        speech = probs[:, 0] < 0.5
        classes[speech] = 1 + np.argmax(probs[speech, 1:], axis=1)
    if overlap_probability is not None:
        pair = probs[:, 4:].sum(axis=1) > overlap_probability
        classes[pair] = 4 + np.argmax(probs[pair, 4:], axis=1)
    return np.asarray(_POWERSET[classes], dtype=np.int8)


def speaker_count(
    windows: Sequence[tuple[int, Float32Array]],
    total_frames: int,
    overlap_probability: float | None = None,
) -> npt.NDArray[np.int64]:
    """How many people speak at each frame, from the windows' powerset probabilities averaged
    over the windows that see the frame ((first frame, probabilities) per window).

    Someone where "nobody" holds under half; two where the pairs together hold more than
    overlap_probability (None: more than the single speakers together). The classes' local
    speakers differ from window to window, but "nobody", "one" and "two" do not, so their
    probabilities can be averaged: a window that half hears a second voice no longer
    outvotes one that clearly hears one (rounding each window's own count did).
    """
    nobody = np.zeros(total_frames)
    singles = np.zeros(total_frames)
    pairs = np.zeros(total_frames)
    cover = np.zeros(total_frames)
    for first, probs in windows:
        span = slice(first, first + probs.shape[0])
        nobody[span] += probs[:, 0]
        singles[span] += probs[:, 1:4].sum(axis=1)
        pairs[span] += probs[:, 4:].sum(axis=1)
        cover[span] += 1
    cover = np.maximum(cover, 1)
    speech = nobody / cover < 0.5
    threshold = singles / cover if overlap_probability is None else overlap_probability
    two = pairs / cover > threshold
    return speech.astype(np.int64) + (speech & two)


def n_frames(samples: int) -> int:
    """Output frames whose centre lies inside `samples` samples."""
    return max(0, (samples - FRAME_CENTRE_SAMPLES) // FRAME_STEP_SAMPLES + 1)


def frame_sample(frame: int) -> int:
    """First sample a frame stands for (frames tile the audio around their centres)."""
    return max(0, frame * FRAME_STEP_SAMPLES + FRAME_CENTRE_SAMPLES - FRAME_STEP_SAMPLES // 2)


def mask_spans(mask: Mask, total_samples: int) -> tuple[tuple[int, int], ...]:
    """Sample ranges of the runs of True frames."""
    spans: list[tuple[int, int]] = []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        a = frame_sample(int(start))
        b = total_samples if end >= mask.size else frame_sample(int(end))
        if b > a:
            spans.append((a, b))
    return tuple(spans)


def gather(audio: Float32Array, spans: Sequence[tuple[int, int]], max_s: float) -> Float32Array:
    """The audio of the spans, joined, at most max_s seconds (the longest spans first)."""
    budget = int(max_s * SAMPLE_RATE_HZ)
    chosen: list[tuple[int, int]] = []
    for start, end in sorted(spans, key=lambda s: s[0] - s[1]):
        if budget <= 0:
            break
        chosen.append((start, min(end, start + budget)))
        budget -= chosen[-1][1] - start
    pieces = [audio[a:b] for a, b in sorted(chosen)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def mask_runs(mask: Mask, max_gap_frames: int = 2) -> list[tuple[int, int]]:
    """Frame ranges [start, end) of the runs of True, gaps up to max_gap_frames closed."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    runs: list[tuple[int, int]] = []
    for start, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        if runs and start - runs[-1][1] <= max_gap_frames:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs
