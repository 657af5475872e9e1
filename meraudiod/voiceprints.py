"""Voiceprints: ECAPA-TDNN speaker embeddings on onnxruntime, their storage form, and
identification against stored profiles (an absolute threshold and a margin over the
runner-up, the score kept either way)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from . import models
from .audio import Float32Array
from .features import MIN_SAMPLES, fbank
from .onnx import OnnxLoadError, cpu_session
from .scoring import Calibration, centroid

EMBEDDING_DIM: Final = 192


class SpeakerError(Exception):
    """A speaker model could not be loaded, or a profile operation is not possible."""


def model_id(name_or_path: str, path: Path) -> str:
    """What stored embeddings are tagged with: the model's name and the start of its sha256."""
    if name_or_path in models.manifest():
        digest = next(iter(models.spec(name_or_path).files.values()), "")
    else:
        digest = models.sha256_file(path)
    return f"{Path(name_or_path).name}@{digest[:12]}"


def unit(vector: Float32Array) -> Float32Array:
    """The vector scaled to length 1 (float32)."""
    norm = float(np.linalg.norm(vector))
    return np.asarray(vector / norm if norm > 0 else vector, dtype=np.float32)


class SpeakerEmbedder:
    """ECAPA-TDNN on onnxruntime: 16 kHz float32 speech -> unit 192-d embedding."""

    def __init__(self, model_path: Path, model: str, threads: int = 1) -> None:
        try:
            # Without the memory pattern the daemon's peak RSS on 28 s recordings (up to
            # speakers.max_embedding_s of one voice embedded at once) was 455 MB, not 534.
            self._session = cpu_session(model_path, threads, "speaker model", memory_pattern=False)
        except OnnxLoadError as exc:
            raise SpeakerError(str(exc)) from exc
        self.model = model

    def __call__(self, audio: Float32Array) -> Float32Array:
        """The unit embedding of one stretch of speech (at least 50 ms)."""
        if audio.size < MIN_SAMPLES:
            audio = np.pad(audio, (0, MIN_SAMPLES - audio.size))
        feats = fbank(audio)[None]
        return unit(np.asarray(self._session.run(["embedding"], {"feats": feats})[0][0]))


def to_blob(vector: Float32Array) -> bytes:
    """Storage form of an embedding: little-endian float32."""
    return np.asarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes) -> Float32Array:
    """An embedding from its storage form."""
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class Profile:
    """A stored voice: a named person or a provisional group of an unknown voice."""

    id: str
    name: str
    provisional: bool
    opt_out: bool
    vectors: Float32Array = field(repr=False, compare=False)  # [n, 192] of the current model


def load_profiles(conn: sqlite3.Connection, model: str) -> list[Profile]:
    """Every profile with at least one embedding of this model."""
    vectors: dict[str, list[Float32Array]] = {}
    for row in conn.execute(
        "SELECT speaker_id, vector FROM speaker_embeddings WHERE model=? ORDER BY id", (model,)
    ):
        vectors.setdefault(str(row[0]), []).append(from_blob(row[1]))
    profiles = []
    for row in conn.execute("SELECT id, name, provisional, opt_out FROM speakers ORDER BY id"):
        if row["id"] in vectors:
            profiles.append(
                Profile(
                    id=row["id"],
                    name=row["name"],
                    provisional=bool(row["provisional"]),
                    opt_out=bool(row["opt_out"]),
                    vectors=np.stack(vectors[row["id"]]),
                )
            )
    return profiles


@dataclass(frozen=True)
class Match:
    """Identification of one voice: the profile (or None), the best score and the margin."""

    speaker_id: str | None
    name: str | None
    score: float | None  # best cosine score over all profiles (None: nothing to compare)
    margin: float | None  # best minus runner-up (or minus 0 with a single candidate)
    provisional: bool = False
    opt_out: bool = False

    @property
    def known(self) -> bool:
        """Matched a named (enrolled) person."""
        return self.speaker_id is not None and not self.provisional


UNKNOWN: Final = Match(None, None, None, None)


def score_profiles(
    profiles: list[Profile], vector: Float32Array, calibration: Calibration | None = None
) -> list[tuple[float, Profile]]:
    """Each profile's score for the vector, best first: the cosine with the mean of its
    embeddings, or that S-normalised against the calibration's cohort (scoring.py)."""
    if calibration is None:
        scored = [(float(centroid(p.vectors) @ vector), p) for p in profiles]
    else:
        scored = [(calibration.normalise(p.vectors, vector), p) for p in profiles]
    return sorted(scored, key=lambda s: -s[0])


def identify(
    profiles: list[Profile],
    vector: Float32Array,
    threshold: float,
    margin: float,
    speech_s: float = 0.0,
    calibration: Calibration | None = None,
) -> Match:
    """The profile the voice belongs to, when it clears the threshold and the margin.

    With a calibration the score is the confidence (0.5 at the bar for `speech_s` of
    speech) and the margin is in the calibration's spread; without, both are cosines.
    """
    scored = score_profiles(profiles, vector, calibration)
    if not scored:
        return UNKNOWN
    best, profile = scored[0]
    lead = best - max(scored[1][0] if len(scored) > 1 else 0.0, 0.0)
    shown = best
    if calibration is not None:
        shown, lead = calibration.confidence(best, speech_s), lead / calibration.spread
    if shown >= threshold and lead >= margin:
        return Match(profile.id, profile.name, shown, lead, profile.provisional, profile.opt_out)
    return Match(None, None, shown, lead)


def onnx_file(path: Path) -> Path:
    """The .onnx file of an installed model directory (or the path itself)."""
    if path.is_dir():
        found = sorted(path.glob("*.onnx"))
        if not found:
            raise SpeakerError(f"no .onnx file in {path}")
        return found[0]
    return path
