"""Stored voice profiles, as an admin manages them: enrol, list, rename, merge, delete, opt out.

A profile is a row in `speakers` with several embeddings in `speaker_embeddings` (one per
enrolment clip or, for a provisional "unknown-N" profile, per recording it was grown from).
Renaming a provisional profile makes it a named person; merging moves one profile's
embeddings and attributions into another. Deleting removes the embeddings (and, if asked,
every recording the person was heard in). A "do not keep" profile is still recognised, so
that recordings matched to it are deleted once processed (worker.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from ulid import ULID

from . import models
from .audio import SAMPLE_RATE_HZ, AudioDecodeError, Float32Array, decode_file, to_float32
from .config import Settings
from .db import Transaction, now
from .recordings import audio_file, delete_recordings, normalise_id
from .scoring import Calibration
from .speakers import SpeakerStage, add_embedding, is_provisional_name
from .voiceprints import Profile, load_profiles, model_id, score_profiles

# An enrolment clip is what every later voice is compared with: it needs more speech than
# a command that is only to be named.
MIN_ENROL_SPEECH_S: Final = 1.5


class ProfileError(Exception):
    """A profile operation is not possible; the message says why."""


class Missing(ProfileError):
    """The profile, file or recording named does not exist."""


class NameTaken(ProfileError):
    """Another profile has that name already."""


def current_model(settings: Settings) -> str:
    """The id embeddings of the configured model are stored with (without loading it)."""
    name = settings.speakers.model
    if name in models.manifest():
        return model_id(name, Path(name))
    return model_id(name, Path(name).expanduser())


@dataclass(frozen=True)
class EnrolResult:
    """One enrolment source: how much speech it had and whether an embedding was kept."""

    source: str
    speech_s: float
    stored: bool
    reason: str | None = None  # why not
    warnings: tuple[str, ...] = ()  # stored, but it may recognise the person badly


# What makes an enrolment clip a poor reference (it is still stored: the owner decides).
GOOD_ENROL_SPEECH_S: Final = 3.0
_FULL_SCALE: Final = 0.99
_MAX_CLIPPED_FRACTION: Final = 0.001
_MIN_SNR_DB: Final = 15.0


def clip_warnings(stage: SpeakerStage, audio: Float32Array, speech_s: float) -> list[str]:
    """Why a clip may be a poor reference: short, clipped, noisy, or two voices in it."""
    warnings = []
    if speech_s < GOOD_ENROL_SPEECH_S:
        warnings.append(
            f"short: {speech_s:.1f} s of speech ({GOOD_ENROL_SPEECH_S:.0f}-8 s recognise better)"
        )
    clipped = float(np.mean(np.abs(audio) >= _FULL_SCALE)) if audio.size else 0.0
    if clipped > _MAX_CLIPPED_FRACTION:
        warnings.append(f"clipped: {clipped:.1%} of samples at full scale (speak further away)")
    found = stage.diarizer.speech(audio).speakers
    if found:
        mask = np.zeros(audio.size, dtype=bool)
        for a, b in found[0].spans:
            mask[a:b] = True
        if 0 < mask.sum() < mask.size - SAMPLE_RATE_HZ // 4:  # a quarter second of pause
            speech_db = 10 * np.log10(float(np.mean(audio[mask] ** 2)) + 1e-12)
            noise_db = 10 * np.log10(float(np.mean(audio[~mask] ** 2)) + 1e-12)
            if speech_db - noise_db < _MIN_SNR_DB:
                warnings.append(f"noisy: speech only {speech_db - noise_db:.0f} dB over the pauses")
    if len(stage.diarizer(audio).speakers) > 1:
        warnings.append("holds more than one voice (diarization found several)")
    return warnings


def _odd_ones(stage: SpeakerStage, found: list[tuple[str, Float32Array, float]]) -> set[str]:
    """Clips that do not sound like the others (below the bar against the mean of the others)."""
    odd = set()
    for i, (label, vector, speech_s) in enumerate(found):
        others = [v for j, (_, v, _) in enumerate(found) if j != i]
        if others:
            person = Profile("", "", False, False, np.stack(others))
            score = stage.identify([person], vector, speech_s).score or 0.0
            if score < stage.settings.speakers.threshold:
                odd.add(label)
    return odd if len(odd) < len(found) else set()  # all apart: nothing to single out


@dataclass(frozen=True)
class ProfileInfo:
    """One profile as `speakers list` shows it."""

    id: str
    name: str
    provisional: bool
    opt_out: bool
    embeddings: int  # usable with the current model
    stale: int  # made with another model: ignored until re-enrolled
    speech_s: float
    recordings: int
    last_heard_at: float | None
    created_at: float
    # How alike its embeddings are: the lowest confidence of one against the others (None
    # with a single embedding). Low means one clip is unlike the rest: re-enrol it.
    consistency: float | None = None


def _row(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM speakers WHERE name=?", (name,)).fetchone()
    if row is None:
        raise Missing(f"no speaker named {name!r} (see `meraudiod speakers list`)")
    return row  # type: ignore[no-any-return]


def _check_name(name: str) -> None:
    """A person's name: not empty, and not of the form the device gives unknown voices."""
    if not name.strip():
        raise ProfileError("a speaker needs a name")
    if is_provisional_name(name):
        raise ProfileError(
            f"{name!r} has the form of a provisional voice (unknown-N): choose another name"
        )


def _load(
    conn: sqlite3.Connection, audio_dir: Path, source: str, files: Collection[str] | None
) -> tuple[str, Path]:
    """(label, audio path) of a file or of a stored recording given by its id; only the
    `files` named may be read (None: any)."""
    path = Path(source).expanduser()
    if (files is None or source in files) and path.is_file():
        return str(path), path
    rec_id = normalise_id(source)
    row = conn.execute("SELECT id, audio_path FROM recordings WHERE id=?", (rec_id,)).fetchone()
    if row is None:
        what = "file or recording" if files is None else "recording (no file can be named here)"
        raise Missing(f"{source}: no such {what}")
    stored = audio_file(audio_dir, row["audio_path"]) if row["audio_path"] else None
    if stored is None or not stored.is_file():
        raise ProfileError(f"recording {rec_id} has no audio any more")
    return f"recording {rec_id}", stored


def enroll(
    conn: sqlite3.Connection,
    stage: SpeakerStage,
    name: str,
    sources: Sequence[str],
    opt_out: bool = False,
    files: Collection[str] | None = None,
) -> list[EnrolResult]:
    """Add one embedding per source (file or recording id) to the named profile; a source
    that is a file is read only if `files` is None (the CLI) or names it (an upload).

    Every source is read before anything is stored: one that is missing or unreadable is an
    error naming it, and nothing is enrolled. Sources with too little speech are reported and
    skipped; nothing is stored unless at least one source gives an embedding.
    """
    _check_name(name)
    clips = []
    seen: set[Path] = set()
    for source in sources:
        label, path = _load(conn, stage.settings.storage.audio_dir, source, files)
        if path.resolve() in seen:  # the same clip twice would weigh twice in the mean
            continue
        seen.add(path.resolve())
        try:
            clips.append((label, to_float32(decode_file(path))))
        except AudioDecodeError as exc:
            raise ProfileError(f"{exc}; nothing enrolled") from exc
    found: list[tuple[str, Float32Array, float]] = []
    results = []
    for label, audio in clips:
        vector, speech_s = stage.voiceprint(audio, MIN_ENROL_SPEECH_S)
        if vector is None:
            need = MIN_ENROL_SPEECH_S
            reason = f"only {speech_s:.1f} s of speech (at least {need:.1f} s needed)"
            results.append(EnrolResult(label, speech_s, False, reason))
            continue
        found.append((label, vector, speech_s))
        warnings = tuple(clip_warnings(stage, audio, speech_s))
        results.append(EnrolResult(label, speech_s, True, None, warnings))
    if not found:
        return results
    known = [p for p in load_profiles(conn, stage.model) if p.name == name]
    earlier = [(f"earlier {i}", v, 10.0) for p in known for i, v in enumerate(p.vectors)]
    odd = _odd_ones(stage, found + earlier) & {label for label, _, _ in found}
    results = [
        replace(r, warnings=(*r.warnings, f"does not sound like the other clips of {name}"))
        if r.source in odd
        else r
        for r in results
    ]
    with Transaction(conn):
        row = conn.execute("SELECT id FROM speakers WHERE name=?", (name,)).fetchone()
        t = now()
        if row is None:
            speaker_id = str(ULID())
            conn.execute(
                "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
                " VALUES (?, ?, 0, ?, ?, ?)",
                (speaker_id, name, int(opt_out), t, t),
            )
        else:  # more clips for someone known; a provisional profile becomes a person
            speaker_id = str(row["id"])
            conn.execute(
                "UPDATE speakers SET provisional=0, opt_out=MAX(opt_out, ?), updated_at=?"
                " WHERE id=?",
                (int(opt_out), t, speaker_id),
            )
        for label, vector, speech_s in found:
            # No recording_id: deleting that recording later must not unlearn the person.
            add_embedding(conn, speaker_id, stage.model, vector, speech_s, None, label)
    return results


def consistency(vectors: Float32Array, calibration: Calibration) -> float | None:
    """The lowest confidence of any one embedding against the others (enrolment length)."""
    if len(vectors) < 2:
        return None
    scores = []
    for i in range(len(vectors)):
        others = np.delete(vectors, i, axis=0)
        score = calibration.normalise(others, vectors[i])
        scores.append(calibration.confidence(score, GOOD_ENROL_SPEECH_S))
    return round(min(scores), 3)


def list_profiles(
    conn: sqlite3.Connection, model: str, calibration: Calibration | None = None
) -> list[ProfileInfo]:
    """Every profile, named ones first, with embedding counts and when it was last heard
    (and, with the calibration, how consistent its embeddings are)."""
    vectors = {p.id: p.vectors for p in load_profiles(conn, model)}
    rows = conn.execute(
        "SELECT p.*,"
        " (SELECT COUNT(*) FROM speaker_embeddings e WHERE e.speaker_id=p.id AND e.model=?)"
        "  AS usable,"
        " (SELECT COUNT(*) FROM speaker_embeddings e WHERE e.speaker_id=p.id AND e.model!=?)"
        "  AS stale,"
        " (SELECT COALESCE(SUM(duration_s), 0) FROM speaker_embeddings e"
        "  WHERE e.speaker_id=p.id) AS speech_s,"
        " (SELECT COUNT(DISTINCT m.recording_id) FROM speaker_mappings m"
        "  WHERE m.speaker_id=p.id) AS recordings,"
        " (SELECT MAX(r.started_at) FROM speaker_mappings m JOIN recordings r"
        "  ON r.id=m.recording_id WHERE m.speaker_id=p.id) AS last_heard_at"
        " FROM speakers p ORDER BY p.provisional, p.name",
        (model, model),
    )
    return [
        ProfileInfo(
            id=r["id"],
            name=r["name"],
            provisional=bool(r["provisional"]),
            opt_out=bool(r["opt_out"]),
            embeddings=int(r["usable"]),
            stale=int(r["stale"]),
            speech_s=float(r["speech_s"]),
            recordings=int(r["recordings"]),
            last_heard_at=r["last_heard_at"],
            created_at=float(r["created_at"]),
            consistency=(
                consistency(vectors[r["id"]], calibration)
                if calibration is not None and r["id"] in vectors
                else None
            ),
        )
        for r in rows
    ]


def rename(conn: sqlite3.Connection, old: str, new: str) -> None:
    """Give a profile a new name; a provisional one becomes a named person."""
    _check_name(new)
    with Transaction(conn):
        speaker = _row(conn, old)
        if conn.execute("SELECT 1 FROM speakers WHERE name=?", (new,)).fetchone():
            raise NameTaken(f"{new!r} exists already: use `meraudiod speakers merge`")
        conn.execute(
            "UPDATE speakers SET name=?, provisional=0, updated_at=? WHERE id=?",
            (new, now(), speaker["id"]),
        )


def merge(conn: sqlite3.Connection, source: str, target: str) -> int:
    """Fold profile `source` into `target` (embeddings, attributions); returns embeddings moved.

    The merged profile is "do not keep" if either was.
    """
    with Transaction(conn):
        src, dst = _row(conn, source), _row(conn, target)
        if src["id"] == dst["id"]:
            raise ProfileError("cannot merge a speaker into itself")
        moved = conn.execute(
            "UPDATE speaker_embeddings SET speaker_id=? WHERE speaker_id=?", (dst["id"], src["id"])
        ).rowcount
        conn.execute("UPDATE segments SET speaker_id=? WHERE speaker_id=?", (dst["id"], src["id"]))
        conn.execute(
            "UPDATE speaker_mappings SET speaker_id=? WHERE speaker_id=?", (dst["id"], src["id"])
        )
        conn.execute(
            "UPDATE speakers SET opt_out=MAX(opt_out, ?), updated_at=? WHERE id=?",
            (src["opt_out"], now(), dst["id"]),
        )
        conn.execute("DELETE FROM speakers WHERE id=?", (src["id"],))
    return int(moved)


@dataclass(frozen=True)
class Deleted:
    """What `delete` removed."""

    embeddings: int
    recordings: int


def delete(
    conn: sqlite3.Connection, audio_dir: Path, name: str, with_recordings: bool = False
) -> Deleted:
    """Remove a profile and its embeddings; with_recordings also every recording it spoke in."""
    speaker_id = str(_row(conn, name)["id"])
    recordings = 0
    if with_recordings:
        ids = [
            str(r[0])
            for r in conn.execute(
                "SELECT recording_id FROM speaker_mappings WHERE speaker_id=?"
                " UNION SELECT recording_id FROM segments WHERE speaker_id=?",
                (speaker_id, speaker_id),
            )
        ]
        recordings = delete_recordings(conn, audio_dir, ids).recordings if ids else 0
    with Transaction(conn):
        (embeddings,) = conn.execute(
            "SELECT COUNT(*) FROM speaker_embeddings WHERE speaker_id=?", (speaker_id,)
        ).fetchone()
        conn.execute("UPDATE segments SET speaker_id=NULL WHERE speaker_id=?", (speaker_id,))
        conn.execute("DELETE FROM speakers WHERE id=?", (speaker_id,))  # embeddings cascade
    return Deleted(int(embeddings), recordings)


def set_opt_out(conn: sqlite3.Connection, name: str, opt_out: bool) -> None:
    """Mark a profile "do not keep" (recordings matched to it are deleted), or undo that."""
    with Transaction(conn):
        speaker = _row(conn, name)
        conn.execute(
            "UPDATE speakers SET opt_out=?, updated_at=? WHERE id=?",
            (int(opt_out), now(), speaker["id"]),
        )


def voice_clips(conn: sqlite3.Connection, name: str, limit: int = 20) -> list[dict[str, Any]]:
    """The latest segments this voice said that still have audio, newest first (times
    relative to the recording): what a reviewer listens to before naming a voice."""
    speaker = _row(conn, name)
    rows = conn.execute(
        "SELECT s.recording_id, s.start_s, s.end_s, s.text FROM segments s"
        " JOIN recordings r ON r.id = s.recording_id"
        " WHERE s.speaker_id=? AND r.audio_path IS NOT NULL"
        " ORDER BY s.recording_id DESC, s.idx LIMIT ?",
        (speaker["id"], limit),
    )
    return [dict(zip(row.keys(), tuple(row), strict=True)) for row in rows]


@dataclass(frozen=True)
class ClipTest:
    """What identification makes of one clip: every profile's confidence and the verdict."""

    source: str
    speech_s: float
    scores: tuple[tuple[str, float], ...]  # (name, confidence), best first
    named: str | None  # who it would be named as (None: unknown)
    reason: str | None = None  # why there is no score


def test_clips(
    conn: sqlite3.Connection, stage: SpeakerStage, name: str, sources: Sequence[str]
) -> list[ClipTest]:
    """Score each clip against everyone, as the worker would, for `speakers test`."""
    _row(conn, name)  # the person must exist
    profiles = load_profiles(conn, stage.model)
    out = []
    for source in sources:
        label, path = _load(conn, stage.settings.storage.audio_dir, source, None)  # the CLI only
        try:
            audio = to_float32(decode_file(path))
        except AudioDecodeError as exc:
            out.append(ClipTest(label, 0.0, (), None, str(exc)))
            continue
        vector, speech_s = stage.voiceprint(audio)
        if vector is None:
            out.append(ClipTest(label, speech_s, (), None, "too little speech"))
            continue
        scores = tuple(
            (p.name, round(stage.calibration.confidence(s, speech_s), 3))
            for s, p in score_profiles(profiles, vector, stage.calibration)
        )
        out.append(
            ClipTest(label, speech_s, scores, stage.identify(profiles, vector, speech_s).name)
        )
    return out
