"""Speech sets shared by scripts/measure-speakers and scripts/calibrate-speakers: which
speakers calibrate and which test, clips cut to a length of speech, enrolment as a user
would, and the speaker models installed for a run. Calibration and test speakers never mix:
`halves` gives every other speaker to each side."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meraudiod import models
from meraudiod.audio import decode_file, to_float32
from meraudiod.config import Settings
from meraudiod.speakers import SpeakerStage
from meraudiod.voiceprints import Profile

# Speech-length bands (s): (label, low, high, clip length cut for it, clips per utterance).
BANDS = [
    ("0.5-1", 0.5, 1.0, 0.75, 3),
    ("1-1.5", 1.0, 1.5, 1.25, 3),
    ("1.5-2", 1.5, 2.0, 1.75, 3),
    ("2-3", 2.0, 3.0, 2.5, 3),
    ("3-5", 3.0, 5.0, 4.0, 2),
    (">5", 5.0, float("inf"), 7.0, 1),
]
ENROL_S = 6.0  # speech per enrolment clip in the band protocol (users give 3-8 s)
TAIL_S = 0.2  # silence after a cut clip (the recorder's post-roll)


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a manifest.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def halves(names: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, test): every other speaker, so the two never share a voice."""
    ordered = sorted(names)
    return ordered[0::2], ordered[1::2]


def cuts(
    audio: np.ndarray, spans: list[tuple[int, int]], speech_s: float, n: int
) -> list[np.ndarray]:
    """Up to n clips, one after the other: from a point in the speech until speech_s of
    speech has passed (pauses included), then TAIL_S of silence."""
    need, out = int(speech_s * 16000), []
    # Walk the speech as one timeline: (span index, sample where the next clip starts).
    i, cursor = 0, spans[0][0] if spans else 0
    while i < len(spans) and len(out) < n:
        start, got, end = cursor, 0, None
        for j in range(i, len(spans)):
            a, b = max(spans[j][0], cursor), spans[j][1]
            if got + (b - a) >= need:
                end = a + need - got
                i, cursor = (
                    (j, end) if end < b else (j + 1, spans[j + 1][0] if j + 1 < len(spans) else b)
                )
                break
            got += b - a
        if end is None:
            break
        lead = max(0, start - int(0.1 * 16000))
        tail = np.zeros(int(TAIL_S * 16000), np.float32)
        out.append(np.concatenate([audio[lead:end], tail]))
    return out


@dataclass
class Trial:
    """One clip's embedding and how much speech the daemon counted in it."""

    speaker: str
    speech_s: float
    vector: np.ndarray | None


def trials(
    stage: SpeakerStage, folder: Path, speakers: list[str], skip: int
) -> dict[str, list[Trial]]:
    """Per band, the cut clips of the speakers' utterances (their first `skip` left out)."""
    out: dict[str, list[Trial]] = {b[0]: [] for b in BANDS}
    for speaker in speakers:
        rows = sorted(
            (r for r in jsonl(folder / "manifest.jsonl") if r["speaker"] == speaker),
            key=lambda r: r["file"],
        )
        for row in rows[skip:]:
            audio = to_float32(decode_file(folder / row["file"]))
            found = stage.diarizer.speech(audio).speakers
            spans = list(found[0].spans) if found else []
            for label, _, _, length, n in BANDS:
                for clip in cuts(audio, spans, length, n):
                    vector, speech_s = stage.voiceprint(clip)
                    out[label].append(Trial(speaker, speech_s, vector))
    return out


def band_profiles(stage: SpeakerStage, folder: Path, speakers: list[str]) -> list[Profile]:
    """Each speaker enrolled from their first three utterances, at most ENROL_S of speech each."""
    profiles = []
    for speaker in speakers:
        rows = sorted(
            (r for r in jsonl(folder / "manifest.jsonl") if r["speaker"] == speaker),
            key=lambda r: r["file"],
        )
        vectors = []
        for row in rows[:3]:
            audio = to_float32(decode_file(folder / row["file"]))
            spans = list(stage.diarizer.speech(audio).speakers[0].spans)
            clip = (cuts(audio, spans, ENROL_S, 1) or [audio])[0]
            vector, _ = stage.voiceprint(clip)
            if vector is not None:
                vectors.append(vector)
        profiles.append(Profile(speaker, speaker, False, False, np.stack(vectors)))
    return profiles


@contextmanager
def speaker_stage(*extra_models: str) -> Iterator[tuple[SpeakerStage, Path]]:
    """The shipped speaker stage (speakers and diarization on), models in a temporary dir."""
    with tempfile.TemporaryDirectory(prefix="speakers-") as tmp:
        settings = Settings()
        settings.storage.models_dir = Path(tmp)
        settings.speakers.enabled = settings.diarization.enabled = True
        for name in ("ecapa-voxceleb", "pyannote-segmentation-3.0", *extra_models):
            models.install(name, Path(tmp))
        yield SpeakerStage(settings), Path(tmp)
