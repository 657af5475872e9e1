"""Enrolment: a person's clips (files or stored recordings) become embeddings of their
profile, each clip checked first (short, clipped, noisy, another voice, unlike the others); and
`speakers test`, what identification makes of a clip against everyone."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import numpy as np
from ulid import ULID

from .audio import (
    SAMPLE_RATE_HZ,
    AudioDecodeError,
    Float32Array,
    decode_file,
    iter_file_pcm,
    to_float32,
)
from .db import Transaction, now
from .diarization import LocalSpeaker, gather
from .profiles import (
    GOOD_ENROL_SPEECH_S,
    Missing,
    ProfileError,
    check_name,
    find_profile,
    profile_row,
)
from .recordings import audio_file, normalise_id
from .sources import SourceError, file_path, not_a_file
from .speakers import SpeakerStage, add_embedding
from .voiceprints import Profile, load_profiles, score_profiles

# An enrolment clip is what every later voice is compared with: it needs more speech than
# a command that is only to be named.
MIN_ENROL_SPEECH_S: Final = 1.5
MAX_CLIP_S: Final = 30.0  # the audio of each clip an enrolment reads (its start)
# Two clips this alike are the same audio (two clips of one voice: 0.6-0.9).
SAME_AUDIO_COSINE: Final = 0.999


@dataclass(frozen=True)
class EnrolResult:
    """One enrolment source: how much speech it had and whether an embedding was kept."""

    source: str
    speech_s: float
    stored: bool
    reason: str | None = None  # why not
    warnings: tuple[str, ...] = ()  # stored, but it may recognise the person badly


_ALREADY: Final = "already enrolled (the same audio as an earlier clip)"
# What makes an enrolment clip a poor reference (it is still stored: the owner decides).
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
    if len(voices(stage, audio)) > 1:
        warnings.append("holds more than one voice (diarization found several)")
    return warnings


def voices(stage: SpeakerStage, audio: Float32Array) -> tuple[LocalSpeaker, ...]:
    """The voices of a clip with speech of their own to score (speakers.min_speech_s): a
    local speaker heard only over another (0.0 s alone, in one LibriSpeech reader's clip)
    is no second voice.

    Without speaker-change detection: a close clip's second voice is the segmentation's
    second local speaker (two LibriSpeech voices back to back, no pause: found in each of
    ten pairs either way), and on a 30 s clip of one voice the detection was about half
    of the clip's CPU (18 -> 10 s on a 2-core x86 test machine, voiceprint included)."""
    found = stage.diarizer(audio, find_changes=False).speakers
    return tuple(v for v in found if v.speech_s >= stage.settings.speakers.min_speech_s)


def _odd_ones(
    stage: SpeakerStage, found: list[tuple[str, Float32Array, float]], judged: set[str]
) -> set[str]:
    """Of the `judged` clips, those that do not sound like the others (below the bar against
    the mean of all the others). Clips enrolled earlier are the others, never judged: with a
    new odd clip in their mean they could all look odd, and blame would fall on none."""
    odd = set()
    for i, (label, vector, speech_s) in enumerate(found):
        if label not in judged:
            continue
        others = [v for j, (_, v, _) in enumerate(found) if j != i]
        if others:
            person = Profile("", "", False, False, np.stack(others))
            score = stage.identify([person], vector, speech_s).score or 0.0
            if score < stage.settings.speakers.threshold:
                odd.add(label)
    return odd


def _load(
    conn: sqlite3.Connection, audio_dir: Path, source: str, files: Mapping[str, str] | None
) -> tuple[str, Path]:
    """(label, audio path) of a file or of a stored recording given by its id; only the
    `files` named may be read, labelled by their names there (None: any, by its path)."""
    path = None
    if files is None or source in files:
        try:  # as `analyze` names it: ~name of no user was a traceback
            path = file_path(source)
        except SourceError as exc:
            raise Missing(str(exc)) from None
        if path.is_file():
            return (str(path) if files is None else files[source]), path
    rec_id = normalise_id(source)
    row = conn.execute("SELECT id, audio_path FROM recordings WHERE id=?", (rec_id,)).fetchone()
    if row is None:
        if path is not None and (path.exists() or path.is_symlink()):  # a directory, a loop
            raise Missing(f"{path}: {not_a_file(path)}")
        what = "file or recording" if files is None else "recording (no file can be named here)"
        raise Missing(f"{source}: no such {what}")
    stored = audio_file(audio_dir, row["audio_path"]) if row["audio_path"] else None
    if stored is None or not stored.is_file():
        raise ProfileError(f"recording {rec_id} has no audio any more")
    return f"recording {rec_id}", stored


def _clip_audio(path: Path) -> Float32Array:
    """The first MAX_CLIP_S of a clip: a voiceprint uses at most 20 s of speech, and clips
    decoded whole and held together took the daemon's peak memory up by all of their audio
    (speakers/enroll over MQTT with 20 stored uploads of 30 minutes each: 10 hours)."""
    blocks, samples = [], 0
    for block in iter_file_pcm(path):  # left at the break, the decoder closes its file
        blocks.append(block[: int(MAX_CLIP_S * SAMPLE_RATE_HZ) - samples])
        samples += blocks[-1].size
        if samples >= MAX_CLIP_S * SAMPLE_RATE_HZ:
            break
    return to_float32(np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int16))


def enroll(
    conn: sqlite3.Connection,
    stage: SpeakerStage,
    name: str,
    sources: Sequence[str],
    opt_out: bool = False,
    files: Mapping[str, str] | None = None,
) -> list[EnrolResult]:
    """Add one embedding per source (file or recording id) to the named profile; a source
    that is a file is read only if `files` is None (the CLI) or names it (an upload).

    Every source is read before anything is stored: one that is missing or unreadable is an
    error naming it, and nothing is enrolled. Sources with too little speech are reported and
    skipped; nothing is stored unless at least one source gives an embedding.
    """
    name = check_name(name)
    found: list[tuple[str, Float32Array, float]] = []
    results = []
    seen: set[Path] = set()
    known = _stored_vectors(conn, stage, name)
    stored_vectors = list(known)
    for source in sources:  # one clip's audio at a time
        label, path = _load(conn, stage.settings.storage.audio_dir, source, files)
        if path.resolve() in seen:  # the same clip twice would weigh twice in the mean
            continue
        seen.add(path.resolve())
        try:
            audio = _clip_audio(path)
        except AudioDecodeError as exc:
            raise ProfileError(f"{exc}; nothing enrolled") from exc
        vector, speech_s = stage.voiceprint(audio, MIN_ENROL_SPEECH_S)
        if vector is None:
            need = MIN_ENROL_SPEECH_S
            reason = f"only {speech_s:.1f} s of speech (at least {need:.1f} s needed)"
            results.append(EnrolResult(label, speech_s, False, reason))
            continue
        if _same_audio(vector, stored_vectors):
            results.append(EnrolResult(label, speech_s, False, _ALREADY))
            continue
        stored_vectors.append(vector)
        found.append((label, vector, speech_s))
        warnings = tuple(clip_warnings(stage, audio, speech_s))
        results.append(EnrolResult(label, speech_s, True, None, warnings))
    if not found:
        return results
    earlier = [(f"earlier {i}", v, 10.0) for i, v in enumerate(known)]
    odd = _odd_ones(stage, found + earlier, {label for label, _, _ in found})
    # Every clip unlike the others' mean (none earlier): none can be singled out, but they are
    # not one voice (it said nothing: two clips of two people were stored without a word).
    unlike = (
        f"unlike the other clips of {name}, as each of them is: are they all {name}'s?"
        if not earlier and len(odd) == len(found)
        else f"does not sound like the other clips of {name}"
    )
    results = [
        replace(r, warnings=(*r.warnings, unlike)) if r.source in odd else r for r in results
    ]
    with Transaction(conn):
        # Looked for again under the write lock: the same clip enrolled at the same moment by
        # another request (a double click, a retry) was stored as many times as it was sent.
        now_stored = _stored_vectors(conn, stage, name)
        again = {label for label, v, _ in found if _same_audio(v, now_stored)}
        if again:
            found = [f for f in found if f[0] not in again]
            results = [
                EnrolResult(r.source, r.speech_s, False, _ALREADY) if r.source in again else r
                for r in results
            ]
        if not found:
            return results
        row = find_profile(conn, name)
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


def _stored_vectors(conn: sqlite3.Connection, stage: SpeakerStage, name: str) -> list[Float32Array]:
    """The person's embeddings stored now (none for a new name)."""
    return [v for p in load_profiles(conn, stage.model) if p.name == name for v in p.vectors]


def _same_audio(vector: Float32Array, stored: list[Float32Array]) -> bool:
    """Identical audio (a clip enrolled in an earlier call) gives the very same vector;
    stored again it would weigh twice in the mean."""
    return any(float(vector @ v) > SAME_AUDIO_COSINE for v in stored)


@dataclass(frozen=True)
class ClipTest:
    """What identification makes of one clip (or of one voice of it): every profile's
    confidence and the verdict."""

    source: str
    speech_s: float
    scores: tuple[tuple[str, float], ...]  # (name, confidence), best first
    named: str | None  # who it would be named as (None: unknown)
    reason: str | None = None  # why there is no score
    voice: int | None = None  # which voice of the clip (1, 2, ...), when it holds several
    voices: int = 1


def test_clips(
    conn: sqlite3.Connection, stage: SpeakerStage, name: str, sources: Sequence[str]
) -> tuple[str, list[ClipTest]]:
    """The person's name as stored (" Alice" is Alice), and each clip scored against
    everyone, as the worker would, for `speakers test`: with diarization on, each voice on
    its own where it finds several (one score of them all, mixed, was no one's)."""
    stored = str(profile_row(conn, name)["name"])  # the person must exist
    profiles = load_profiles(conn, stage.model)
    out = []
    for source in sources:
        label, path = _load(conn, stage.settings.storage.audio_dir, source, None)  # the CLI only
        try:
            audio = to_float32(decode_file(path))
        except AudioDecodeError as exc:
            out.append(ClipTest(label, 0.0, (), None, str(exc)))
            continue
        # As the worker hears it: with diarization off, a clip is one voice.
        found = voices(stage, audio) if stage.settings.diarization.enabled else ()
        if len(found) > 1:
            for i, voice in enumerate(found, 1):
                clip = gather(audio, voice.spans, stage.settings.speakers.max_embedding_s)
                tested = _tested(stage, profiles, label, stage.embedder(clip), voice.speech_s)
                out.append(replace(tested, voice=i, voices=len(found)))
            continue
        vector, speech_s = stage.voiceprint(audio)
        out.append(_tested(stage, profiles, label, vector, speech_s))
    return stored, out


def _tested(
    stage: SpeakerStage,
    profiles: list[Profile],
    source: str,
    vector: Float32Array | None,
    speech_s: float,
) -> ClipTest:
    """One voice's scores against everyone and its verdict (None: too little speech)."""
    if vector is None:
        return ClipTest(source, speech_s, (), None, "too little speech")
    scores = tuple(
        (p.name, round(stage.calibration.confidence(s, speech_s), 3))
        for s, p in score_profiles(profiles, vector, stage.calibration)
    )
    return ClipTest(source, speech_s, scores, stage.identify(profiles, vector, speech_s).name)
