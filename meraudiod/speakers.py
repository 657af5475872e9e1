"""Who spoke: the worker's speaker step (diarization, embeddings, identification, provisional
profiles for unknown voices).

Embeddings (voiceprints.py) are SpeechBrain's ECAPA-TDNN exported to ONNX (see features.py
and scripts/export-models), L2-normalised. A person keeps several embeddings (one per
enrolment clip) and scores against their mean, S-normalised and turned into a confidence
that means the same at every length of speech (scoring.py). A voice is named when that
confidence reaches `speakers.threshold` *and* leads the runner-up by `speakers.margin`;
otherwise it is unknown. The score is kept either way. Less than `speakers.min_speech_s` of
speech gives no embedding at all: too short is "unknown", never a new person. Unknown voices
with MIN_NEW_VOICE_S of speech are grouped into provisional profiles ("unknown-3") that an
admin can name or merge (profiles.py). Embeddings of another model are stale: ignored until
re-enrolled. Speaker analysis runs whatever Whisper made of the words.

The worker calls `SpeakerStage.analyze` (heavy: segmentation, embeddings, clustering) outside
its transaction and `SpeakerStage.store` (identification against the stored profiles and all
writes) inside it.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Final

from . import models
from .asr import Transcript, Wanted
from .audio import Float32Array
from .config import Settings
from .config_sections import SpeakersSettings
from .db import get_kv, now, put_kv
from .diarization import (
    Diarization,
    Diarizer,
    LabelledSegment,
    Progress,
    Recognise,
    SegmentationModel,
    attribute,
    gather,
)
from .scoring import calibration_for, uncalibrated
from .voiceprints import (
    UNKNOWN,
    Match,
    Profile,
    SpeakerEmbedder,
    SpeakerError,
    identify,
    load_profiles,
    model_id,
    onnx_file,
    to_blob,
)

_LOGGER = logging.getLogger(__name__)
UNKNOWN_PREFIX: Final = "unknown-"
_LAST_UNKNOWN_KEY: Final = "last_unknown_number"  # in kv: the highest N ever given
# A short command is named when it clears its bar, but a new provisional voice is only
# founded on this much speech: under a second of someone is too little to group others on.
MIN_NEW_VOICE_S: Final = 1.5


@dataclass(frozen=True)
class SegmentSpeaker:
    """One transcript segment with who said it (times from the start of the recording)."""

    start_s: float
    end_s: float
    text: str
    suspect: str | None  # why the segment is not trusted as speech, or None
    label: str | None  # the local speaker inside the recording ("S1"), None if not analysed
    speaker_id: str | None  # the matched profile (enrolled or provisional), None = unknown
    speaker_name: str | None
    score: float | None  # best cosine score of the local speaker (kept for unknowns too)
    known: bool  # matched a named person (False for unknown and provisional voices)


def plain_segments(transcript: Transcript) -> tuple[SegmentSpeaker, ...]:
    """The transcript's segments with no speaker information."""
    return tuple(
        SegmentSpeaker(s.start_s, s.end_s, s.text, s.suspect, None, None, None, None, False)
        for s in transcript.segments
    )


@dataclass(frozen=True)
class Voice:
    """A local speaker of one recording with its embedding (None: too little speech)."""

    label: str
    speech_s: float
    embedding: Float32Array | None = field(repr=False, compare=False)


@dataclass(frozen=True)
class SpeakerAnalysis:
    """What analyze() found in one recording, ready to be identified and stored."""

    transcript: Transcript  # segments split at speaker changes
    segments: tuple[LabelledSegment, ...]
    voices: tuple[Voice, ...]
    diarization: Diarization
    cost_s: float


@dataclass(frozen=True)
class StoredSpeakers:
    """What store() wrote: segments with speakers, and whether a do-not-keep voice was heard."""

    segments: tuple[SegmentSpeaker, ...]
    matches: dict[str, Match]
    opt_out: bool


class SpeakerStage:
    """Diarization and identification for recordings; models loaded once."""

    def __init__(self, settings: Settings) -> None:
        models_dir = settings.storage.resolved_models_dir
        spk, dia = settings.speakers, settings.diarization
        try:
            emb_path = onnx_file(models.resolve(spk.model, models_dir))
            seg_path = onnx_file(models.resolve(dia.model, models_dir))
        except models.ModelError as exc:
            raise SpeakerError(  # enrolment and `speakers test` need them too, enabled or not
                f"a speaker model is missing: {exc} (scripts/setup exports and installs both)"
            ) from exc
        self.settings = settings
        self.embedder = SpeakerEmbedder(emb_path, model_id(spk.model, emb_path), spk.threads)
        # The bars per length of speech (scoring.py), made for the shipped model.
        calibration = calibration_for(self.embedder.model)
        if calibration is None:
            _LOGGER.warning("no score calibration for %s: one cosine bar for all", self.model)
            calibration = uncalibrated(self.embedder.model)
        self.calibration = calibration
        self.diarizer = Diarizer(
            SegmentationModel(seg_path, spk.threads),
            self.embedder,
            threshold=dia.cluster_threshold,
            max_speakers=dia.max_speakers,
            max_embedding_s=spk.max_embedding_s,
        )

    @property
    def model(self) -> str:
        """The embedding model's id, as stored with embeddings."""
        return self.embedder.model

    def voiceprint(
        self, audio: Float32Array, min_speech_s: float | None = None
    ) -> tuple[Float32Array | None, float]:
        """One embedding of all the speech in the audio, and how much speech there was
        (None below min_speech_s, by default speakers.min_speech_s)."""
        diarization = self.diarizer.speech(audio)
        if not diarization.speakers:
            return None, 0.0
        voice = diarization.speakers[0]
        need = self.settings.speakers.min_speech_s if min_speech_s is None else min_speech_s
        if voice.speech_s < need:
            return None, voice.speech_s
        clip = gather(audio, voice.spans, self.settings.speakers.max_embedding_s)
        return self.embedder(clip), voice.speech_s

    def identify(self, profiles: list[Profile], vector: Float32Array, speech_s: float) -> Match:
        """Who an embedding of that much speech is, as the daemon decides it."""
        spk = self.settings.speakers
        return identify(profiles, vector, spk.threshold, spk.margin, speech_s, self.calibration)

    def analyze(
        self,
        audio: Float32Array,
        transcript: Transcript,
        conn: sqlite3.Connection | None = None,
        wanted: Wanted | None = None,
        progress: Progress | None = None,
    ) -> SpeakerAnalysis:
        """Turns, local speakers and their embeddings (the heavy part, outside transactions).

        With `conn`, the enrolled people guide diarization (see Diarizer); it is only read.
        `wanted`, asked before each window, False gives it up (asr.Stopped); `progress` keeps
        how far diarization got, for the next call on the same audio to go on from.
        """
        t0 = time.perf_counter()
        # Whatever Whisper made of the words (a language it does not know comes out
        # "suspect"), who speaks is a fact about the voice: the segmentation decides.
        if self.settings.diarization.enabled:
            recognise = self._recogniser(conn)
            diarization = self.diarizer(audio, recognise, wanted, progress=progress)
        else:
            diarization = self.diarizer.speech(audio, wanted, progress)
        segments = attribute(transcript, diarization)
        voices = []
        for local in diarization.speakers:
            embedding = None
            if (
                self.settings.speakers.enabled
                and local.speech_s >= self.settings.speakers.min_speech_s
            ):
                clip = gather(audio, local.spans, self.settings.speakers.max_embedding_s)
                embedding = self.embedder(clip)
            voices.append(Voice(local.label, local.speech_s, embedding))
        split = Transcript(
            language=transcript.language,
            duration_s=transcript.duration_s,
            segments=tuple(s.segment for s in segments),
        )
        return SpeakerAnalysis(
            split, segments, tuple(voices), diarization, time.perf_counter() - t0
        )

    def _recogniser(self, conn: sqlite3.Connection | None) -> Recognise | None:
        """Who a piece of speech surely is among the enrolled (named) people."""
        spk = self.settings.speakers
        if conn is None or not spk.enabled:
            return None
        known = [p for p in load_profiles(conn, self.model) if not p.provisional]
        if not known:
            return None

        def recognise(vector: Float32Array, speech_s: float) -> str | None:
            if speech_s < spk.min_speech_s:
                return None
            return self.identify(known, vector, speech_s).speaker_id

        return recognise

    def store(
        self, conn: sqlite3.Connection, recording_id: str, analysis: SpeakerAnalysis
    ) -> StoredSpeakers:
        """Identify each local speaker against the stored profiles and write it all.

        Runs inside the caller's transaction, after the segments are stored (same order;
        storing them cleared the recording's old mappings).
        """
        spk = self.settings.speakers
        profiles = load_profiles(conn, self.model)
        matches: dict[str, Match] = {}
        for voice in analysis.voices:
            match = UNKNOWN
            if voice.embedding is not None:
                match = self.identify(profiles, voice.embedding, voice.speech_s)
                # Nobody close at all: a new voice. (Close to two people at once is only
                # ambiguous, not new: it stays unknown without a profile.)
                nobody = match.score is None or match.score < spk.threshold
                enough = voice.speech_s >= MIN_NEW_VOICE_S
                if match.speaker_id is None and spk.group_unknown and nobody and enough:
                    profile = _new_provisional(conn, voice, recording_id, self.model)
                    profiles.append(profile)
                    # Its first voice: no score (the rejected best match's is another's).
                    match = Match(profile.id, profile.name, None, None, True)
                elif match.provisional:
                    _grow_provisional(conn, match, voice, recording_id, self.model, spk)
            matches[voice.label] = match
            conn.execute(
                "INSERT INTO speaker_mappings (recording_id, label, speaker_id, score, margin,"
                " speech_s) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    recording_id,
                    voice.label,
                    match.speaker_id,
                    match.score,
                    match.margin,
                    voice.speech_s,
                ),
            )
        out = []
        for idx, labelled in enumerate(analysis.segments):
            seg, label = labelled.segment, labelled.label
            match = matches.get(label, UNKNOWN) if label else UNKNOWN
            conn.execute(
                "UPDATE segments SET speaker_label=?, speaker_id=?, speaker_score=?"
                " WHERE recording_id=? AND idx=?",
                (label, match.speaker_id, match.score, recording_id, idx),
            )
            out.append(
                SegmentSpeaker(
                    seg.start_s,
                    seg.end_s,
                    seg.text,
                    seg.suspect,
                    label,
                    match.speaker_id,
                    match.name,
                    match.score,
                    match.known,
                )
            )
        opt_out = any(m.opt_out for m in matches.values())
        return StoredSpeakers(tuple(out), matches, opt_out)


def is_provisional_name(name: str) -> bool:
    """True for names of the form the device gives voices it grouped itself ("unknown-3")."""
    return re.fullmatch(rf"{UNKNOWN_PREFIX}\d+", name.strip(), re.IGNORECASE) is not None


def next_unknown_name(conn: sqlite3.Connection) -> str:
    """The next "unknown-N" name. Numbers are never reused: after unknown-1 is renamed or
    deleted, a new voice is unknown-2, so an old log line or event never names a new voice.
    Call inside the transaction that inserts the profile."""
    numbers = [int(get_kv(conn, _LAST_UNKNOWN_KEY, "0"))]
    for (name,) in conn.execute("SELECT name FROM speakers WHERE name LIKE 'unknown-%'"):
        suffix = str(name)[len(UNKNOWN_PREFIX) :]
        if suffix.isdigit():
            numbers.append(int(suffix))
    number = max(numbers) + 1
    put_kv(conn, _LAST_UNKNOWN_KEY, str(number))
    return f"{UNKNOWN_PREFIX}{number}"


def _new_provisional(
    conn: sqlite3.Connection, voice: Voice, recording_id: str, model: str
) -> Profile:
    """A provisional profile for a voice nobody has enrolled."""
    from ulid import ULID

    assert voice.embedding is not None
    speaker_id, name, t = str(ULID()), next_unknown_name(conn), now()
    conn.execute(
        "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
        " VALUES (?, ?, 1, 0, ?, ?)",
        (speaker_id, name, t, t),
    )
    add_embedding(conn, speaker_id, model, voice.embedding, voice.speech_s, recording_id, None)
    _LOGGER.info("new provisional speaker %s from recording %s", name, recording_id)
    return Profile(speaker_id, name, True, False, voice.embedding[None])


def _grow_provisional(
    conn: sqlite3.Connection,
    match: Match,
    voice: Voice,
    recording_id: str,
    model: str,
    settings: SpeakersSettings,
) -> None:
    """A provisional profile learns the voice from a few more recordings."""
    assert voice.embedding is not None
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM speaker_embeddings WHERE speaker_id=? AND model=?",
        (match.speaker_id, model),
    ).fetchone()
    if int(count) < settings.max_unknown_embeddings and match.speaker_id is not None:
        add_embedding(
            conn, match.speaker_id, model, voice.embedding, voice.speech_s, recording_id, None
        )


def add_embedding(
    conn: sqlite3.Connection,
    speaker_id: str,
    model: str,
    vector: Float32Array,
    speech_s: float,
    recording_id: str | None,
    source: str | None,
) -> None:
    """Store one embedding of a profile."""
    conn.execute(
        "INSERT INTO speaker_embeddings (speaker_id, model, vector, duration_s, recording_id,"
        " source, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (speaker_id, model, to_blob(vector), speech_s, recording_id, source, now()),
    )
