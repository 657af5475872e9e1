"""Speaker scores that mean the same at 1 s of speech as at 10 s.

A cosine between two ECAPA embeddings drifts with the length of speech: a short command
scores lower against everyone, impostors and its own speaker alike. Two steps make scores
comparable across lengths:

1. Adaptive S-norm against a cohort of public speakers (never the enrolled people, never
   the speakers measured on): ((c - mu_e) / sd_e + (c - mu_x) / sd_x) / 2, with c the
   cosine between the voice and the mean of the person's embeddings (`centroid`) and mu
   and sd each side's `top_k` closest cohort scores, so a voice that resembles many people
   gains nothing from that.
2. A bar per band of speech length, calibrated from data (scripts/calibrate-speakers, on
   speakers kept apart from those the accuracy is measured on): the impostors' mean score
   in that band plus a few of their standard deviations. The confidence shown is
   1 / (1 + exp(-(s - bar) / spread)), with `spread` the impostors' standard deviation:
   0.5 is the bar at every length, and a step above it means as much at 1 s as at 10 s.
   The margin over the runner-up is counted in `spread` too.

The calibration script also calibrates plain cosine ("cosine") and ships whichever method
lets more of its speakers' clips clear the bars. The calibration is one file per embedding
model (`assets/speaker-calibration.npz`, tagged with the model id); another model gets
`uncalibrated`: plain cosine, one bar for all lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from .audio import Float32Array

CALIBRATION_FILE: Final = Path(__file__).parent / "assets" / "speaker-calibration.npz"


@dataclass(frozen=True)
class Calibration:
    """A cohort for score normalisation and the bar per band of speech length."""

    model: str  # the embedding model id it was made with
    method: str  # "cosine" or "s-norm"
    # [n, dim] unit embeddings of public speakers (s-norm only; may be empty otherwise)
    cohort: Float32Array = field(repr=False, compare=False)
    band_edges_s: tuple[float, ...]  # lower edge of each speech-length band, ascending
    bars: tuple[float, ...]  # score needed to name someone, per band
    spread: float  # the impostors' standard deviation: the unit of confidence and margin
    top_k: int  # cohort scores each side is compared with (s-norm)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Read a calibration file written by `save`."""
        with np.load(path) as data:
            return cls(
                model=str(data["model"]),
                method=str(data["method"]),
                cohort=np.asarray(data["cohort"], dtype=np.float32),
                band_edges_s=tuple(float(x) for x in data["band_edges_s"]),
                bars=tuple(float(x) for x in data["bars"]),
                spread=float(data["spread"]),
                top_k=int(data["top_k"]),
            )

    def save(self, path: Path) -> None:
        """Write the calibration (numpy .npz)."""
        np.savez_compressed(
            path,
            model=np.array(self.model),
            method=np.array(self.method),
            cohort=self.cohort.astype(np.float16),  # half the size; scores move < 1e-3
            band_edges_s=np.array(self.band_edges_s),
            bars=np.array(self.bars),
            spread=np.array(self.spread),
            top_k=np.array(self.top_k),
        )

    def _stats(self, vectors: Float32Array) -> tuple[Float32Array, Float32Array]:
        """Mean and spread of each vector's top_k cohort scores."""
        sims = vectors @ self.cohort.T
        k = min(self.top_k, sims.shape[1])
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-3)

    def normalise(self, enrolled: Float32Array, vector: Float32Array) -> float:
        """The score of a voice against a person: against the mean of their embeddings."""
        person = centroid(enrolled)
        cosine = float(person @ vector)
        if self.method == "cosine":
            return cosine
        mu_e, sd_e = self._stats(person[None])
        mu_x, sd_x = self._stats(vector[None])
        return float(((cosine - mu_e[0]) / sd_e[0] + (cosine - mu_x[0]) / sd_x[0]) / 2)

    def bar(self, speech_s: float) -> float:
        """The normalised score a voice with this much speech must reach."""
        band = int(np.searchsorted(np.array(self.band_edges_s), speech_s, side="right")) - 1
        return self.bars[max(band, 0)]

    def confidence(self, normalised: float, speech_s: float) -> float:
        """0-1, 0.5 exactly at the bar for this length of speech."""
        return 1.0 / (1.0 + math.exp(-(normalised - self.bar(speech_s)) / self.spread))


def centroid(vectors: Float32Array) -> Float32Array:
    """A person's voice: the unit mean of their [n, dim] unit embeddings.

    Not the best of them: with a maximum, every further enrolment clip is one more chance
    for a stranger to score high, so a bar calibrated on three clips would not hold for six;
    the mean also evens out what one short or noisy clip got wrong."""
    mean = np.asarray(vectors, dtype=np.float32).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return np.asarray(mean / norm if norm > 0 else mean, dtype=np.float32)


def uncalibrated(model: str) -> Calibration:
    """For a model nobody calibrated: plain cosine, one bar at every length (0.40 and a
    spread of 0.085, what ECAPA measured before calibration)."""
    empty = np.zeros((0, 1), dtype=np.float32)
    return Calibration(model, "cosine", empty, (0.0,), (0.40,), 0.085, 1)


def calibration_for(model: str, path: Path = CALIBRATION_FILE) -> Calibration | None:
    """The shipped calibration when it was made with this embedding model, else None."""
    if not path.is_file():
        return None
    calibration = Calibration.load(path)
    return calibration if calibration.model == model else None
