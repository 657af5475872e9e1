"""Where the voice changes inside one stretch of speech the segmentation gives one speaker.

The segmentation model sometimes gives two people one window-local label when one speaks
right after the other, with no pause between them: no embedding of that label hears either
alone, so clustering cannot split them. Here the stretch is embedded in short sub-windows
(SUB_WINDOW_S long, every HOP_S) and cut where the cosine between the sub-window that ends at
a point and the one that starts there is below a threshold.

The threshold was calibrated on voices that no measurement uses (scripts/calibrate-change:
LibriSpeech readers of the calibration half, two utterances back to back with no pause).
Sub-windows sit on one grid of the whole recording and are embedded once each, so the two
overlapping segmentation windows that see the same speech share them: about
SUB_WINDOW_S / HOP_S seconds of audio embedded per second of long single-speaker speech.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from .audio import SAMPLE_RATE_HZ, Float32Array

SUB_WINDOW_S: Final = 1.5
HOP_S: Final = 0.5
# Cosine between the sub-windows either side of a point below which the voice changes there
# (ECAPA; from scripts/calibrate-change, never from the AMI excerpts that measure DER).
CHANGE_THRESHOLD: Final = 0.15

_SUB_WINDOW_SAMPLES: Final = int(SUB_WINDOW_S * SAMPLE_RATE_HZ)
_HOP_SAMPLES: Final = int(HOP_S * SAMPLE_RATE_HZ)
_SPAN_HOPS: Final = _SUB_WINDOW_SAMPLES // _HOP_SAMPLES  # sub-window length in hops
CONTEXT_S: Final = 3.0  # each side of a point: the sub-windows within this of it
_CONTEXT_HOPS: Final = int(CONTEXT_S / HOP_S)

Embed = Callable[[Float32Array], Float32Array]


class ChangeFinder:
    """Speaker changes inside stretches of one recording (one instance per recording)."""

    def __init__(
        self,
        audio: Float32Array,
        embed: Embed,
        threshold: float,
        cache: dict[int, Float32Array] | None = None,
    ) -> None:
        self.audio = audio
        self.embed = embed
        self.threshold = threshold
        # Grid index -> unit embedding; `cache`: that of an earlier finder on the same audio.
        self._cache: dict[int, Float32Array] = {} if cache is None else cache
        self._off_grid_s = 0.0  # audio of the sub-windows embedded off the grid

    @property
    def embedded_s(self) -> float:
        """Audio embedded so far, in seconds (the cost)."""
        return len(self._cache) * SUB_WINDOW_S + self._off_grid_s

    def _sub_window(self, index: int) -> Float32Array:
        """The unit embedding of the sub-window starting at grid point `index`."""
        if index not in self._cache:
            start = index * _HOP_SAMPLES
            vector = self.embed(self.audio[start : start + _SUB_WINDOW_SAMPLES])
            self._cache[index] = _unit(vector)
        return self._cache[index]

    def sub_windows(self, start: int, end: int) -> tuple[npt.NDArray[np.int64], Float32Array]:
        """Centre samples and unit embeddings [n, dim] of the grid's sub-windows inside the
        samples [start, end): the ones the change detection embedded (at no extra cost)."""
        indices = _grid(start, end)
        if not indices:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 1), dtype=np.float32)
        centres = np.array([i * _HOP_SAMPLES + _SUB_WINDOW_SAMPLES // 2 for i in indices])
        return centres, np.stack([self._sub_window(i) for i in indices])

    def centred_sub_window(
        self, start: int, end: int
    ) -> tuple[npt.NDArray[np.int64], Float32Array]:
        """Centre sample and unit embedding [1, dim] of one sub-window centred on the samples
        [start, end), off the grid: for a stretch about a sub-window long that no grid
        sub-window fits in (which one does depends on where the recording starts)."""
        centre = (start + end) // 2
        first = centre - _SUB_WINDOW_SAMPLES // 2
        first = max(0, min(first, self.audio.size - _SUB_WINDOW_SAMPLES))
        self._off_grid_s += SUB_WINDOW_S
        vector = _unit(self.embed(self.audio[first : first + _SUB_WINDOW_SAMPLES]))
        return np.array([first + _SUB_WINDOW_SAMPLES // 2]), vector[None, :]

    def similarities(self, start: int, end: int) -> list[tuple[int, float]]:
        """(sample, cosine between the voice before and after it) at each grid point inside
        the samples [start, end) with a whole sub-window of the stretch on both sides.

        Each side is the mean of the sub-windows within CONTEXT_S of the point (inside the
        stretch): steadier than one sub-window each, at no extra embedding."""
        grid = _grid(start, end)
        first, last = grid.start, grid.stop - 1
        out = []
        for point in range(first + _SPAN_HOPS, last + 1):
            before = range(max(first, point - _CONTEXT_HOPS), point - _SPAN_HOPS + 1)
            after = range(point, min(last, point + _CONTEXT_HOPS - _SPAN_HOPS) + 1)
            left = _unit(np.mean([self._sub_window(i) for i in before], axis=0))
            right = _unit(np.mean([self._sub_window(i) for i in after], axis=0))
            out.append((point * _HOP_SAMPLES, float(left @ right)))
        return out

    def changes(self, start: int, end: int) -> list[int]:
        """Samples where the voice changes inside [start, end), in order."""
        if end - start < 2 * _SUB_WINDOW_SAMPLES:
            return []
        return pick_changes(self.similarities(start, end), self.threshold)


def _grid(start: int, end: int) -> range:
    """Grid indices of the sub-windows that fit inside the samples [start, end)."""
    return range(math.ceil(start / _HOP_SAMPLES), (end - _SUB_WINDOW_SAMPLES) // _HOP_SAMPLES + 1)


def _unit(vector: Float32Array) -> Float32Array:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)


def pick_changes(similarities: list[tuple[int, float]], threshold: float) -> list[int]:
    """The lowest similarity under the threshold first, then the next lowest at least a
    sub-window away from those chosen, and so on; samples in order."""
    candidates = sorted((sim, sample) for sample, sim in similarities if sim < threshold)
    chosen: list[int] = []
    for _, sample in candidates:
        if all(abs(sample - c) >= _SUB_WINDOW_SAMPLES for c in chosen):
            chosen.append(sample)
    return sorted(chosen)
