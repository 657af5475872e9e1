"""Who spoke when inside one recording: pyannote segmentation + ECAPA embeddings + clustering.

1. pyannote segmentation-3.0 (ONNX) runs on 10 s windows and gives, every 16.875 ms, one of
   seven powerset classes: nobody, one of three window-local speakers, or two of them at once.
2. Each window-local speaker with enough speech of its own (no overlap) gets an embedding
   per long run, a run first cut where the voice changes inside it (speaker_change.py);
   one heard only over someone else gets one of its speech with the overlap.
3. Agglomerative clustering (average linkage, cosine) joins window-local speakers across
   windows; two speakers of one window are never joined. Local speakers with too little
   speech for a reliable embedding (or only overlap) join the nearest cluster their window's
   other speakers do not hold.
4. The windows' frames are added up per cluster; at every frame the number of speakers the
   windows agree on (rounded mean) are taken, the most active first. Runs of frames are turns.

With diarization off, the same segmentation still says where the speech is, so speaker
identification embeds only speech and can tell how much of it there was.
`attribute()` then gives each transcript word the speaker whose turn it overlaps most and
splits Whisper segments where the speaker changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from .asr import Segment, Transcript, Word
from .audio import SAMPLE_RATE_HZ, Float32Array
from .onnx import OnnxLoadError, cpu_session
from .speaker_change import CHANGE_THRESHOLD, ChangeFinder

_LOGGER = logging.getLogger(__name__)

WINDOW_SAMPLES: Final = 10 * SAMPLE_RATE_HZ
FRAME_STEP_SAMPLES: Final = 270  # 16.875 ms per output frame
_FRAME_CENTRE_SAMPLES: Final = 495  # half the model's receptive field
# The windows overlap by half, so that every turn is seen away from a window's edge once.
_WINDOW_STEP_FRAMES: Final = 296  # 296 * 270 samples = 4.995 s
# Powerset class -> which of the window's three speakers are active.
_POWERSET: Final = np.array(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.int8
)
# Below this much speech of its own, a window-local speaker gets no embedding of its own
# for clustering; its frames join the nearest cluster if it has at least the second figure.
_MIN_CLUSTER_SPEECH_S: Final = 1.0
_MIN_ASSIGN_SPEECH_S: Final = 0.3
_MIN_TURN_S: Final = 0.1  # shorter runs of frames are noise
_MAX_GAP_S: Final = 0.2  # a speaker's turns closer than this are joined

Embed = Callable[[Float32Array], Float32Array]
# Who an embedding (of that much speech) surely is, among enrolled people, or None.
Recognise = Callable[[Float32Array, float], str | None]
Mask = npt.NDArray[np.bool_]


class DiarizationError(Exception):
    """The segmentation model could not be loaded or run."""


@dataclass(frozen=True)
class Turn:
    """One stretch of one local speaker, in seconds from the start of the recording."""

    start_s: float
    end_s: float
    label: str


@dataclass(frozen=True)
class LocalSpeaker:
    """A speaker inside one recording, with the audio that is theirs alone."""

    label: str
    speech_s: float  # speech of this speaker without overlap
    # Sample ranges [start, end) of that speech, in recording order.
    spans: tuple[tuple[int, int], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Diarization:
    """Turns and local speakers of one recording."""

    turns: tuple[Turn, ...]
    speakers: tuple[LocalSpeaker, ...]

    def label_at(self, start_s: float, end_s: float) -> str | None:
        """The speaker whose turns overlap [start_s, end_s] most (None: nobody)."""
        overlap: dict[str, float] = {}
        for turn in self.turns:
            shared = min(end_s, turn.end_s) - max(start_s, turn.start_s)
            if shared > 0:
                overlap[turn.label] = overlap.get(turn.label, 0.0) + shared
        return max(overlap, key=overlap.__getitem__) if overlap else None

    def nearest_label(self, time_s: float, within_s: float) -> str | None:
        """The speaker of the turn closest to time_s, if it is within within_s."""
        best, label = within_s, None
        for turn in self.turns:
            distance = max(turn.start_s - time_s, time_s - turn.end_s, 0.0)
            if distance <= best:
                best, label = distance, turn.label
        return label


class SegmentationModel:
    """pyannote segmentation-3.0 on onnxruntime: 10 s of audio -> powerset classes per frame."""

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        try:
            self._session = cpu_session(model_path, threads, "segmentation model")
        except OnnxLoadError as exc:
            raise DiarizationError(str(exc)) from exc

    def window(self, audio: Float32Array, lenient: bool = False) -> npt.NDArray[np.int8]:
        """Active local speakers per frame [frames, 3] for up to 10 s of audio.

        lenient: a frame is speech when "nobody" has under half the probability, even
        where it wins the argmax (the speaker classes together hold more).
        """
        chunk = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        chunk[: audio.size] = audio[:WINDOW_SAMPLES]
        log_probs = self._session.run(None, {"input": chunk.reshape(1, 1, -1)})[0][0]
        frames = n_frames(min(audio.size, WINDOW_SAMPLES))
        probs = np.exp(np.asarray(log_probs)[:frames])
        classes = np.argmax(probs, axis=1)
        if lenient:  # diarization: missed speech was most of its error on AMI
            speech = probs[:, 0] < 0.5
            classes[speech] = 1 + np.argmax(probs[speech, 1:], axis=1)
        return np.asarray(_POWERSET[classes], dtype=np.int8)


def n_frames(samples: int) -> int:
    """Output frames whose centre lies inside `samples` samples."""
    return max(0, (samples - _FRAME_CENTRE_SAMPLES) // FRAME_STEP_SAMPLES + 1)


def _frame_sample(frame: int) -> int:
    """First sample a frame stands for (frames tile the audio around their centres)."""
    return max(0, frame * FRAME_STEP_SAMPLES + _FRAME_CENTRE_SAMPLES - FRAME_STEP_SAMPLES // 2)


def _spans(mask: Mask, total_samples: int) -> tuple[tuple[int, int], ...]:
    """Sample ranges of the runs of True frames."""
    spans: list[tuple[int, int]] = []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        a = _frame_sample(int(start))
        b = total_samples if end >= mask.size else _frame_sample(int(end))
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


def _unit(vector: Float32Array) -> Float32Array:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector


def _runs(mask: Mask, max_gap_frames: int = 2) -> list[tuple[int, int]]:
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


def _split(run: tuple[int, int], first: int, changes: ChangeFinder) -> list[tuple[int, int]]:
    """A window's run of frames (the window starting at global frame `first`) cut where
    the voice changes."""
    start, end = ((first + f) * FRAME_STEP_SAMPLES for f in run)
    cuts = [sample // FRAME_STEP_SAMPLES - first for sample in changes.changes(start, end)]
    edges = [run[0], *cuts, run[1]]
    return list(pairwise(edges))


@dataclass
class _Piece:
    """Speech of one window-local speaker (one long run, or all its short runs) to cluster."""

    window: int
    index: int
    runs: list[tuple[int, int]]  # frame ranges inside the window
    speech_s: float
    embedding: Float32Array
    core: bool  # long enough to found or join clusters by itself
    identity: str | None = None  # an enrolled person it was recognised as
    cluster: int = -1


class Diarizer:
    """Segmentation + embeddings + clustering for one recording at a time."""

    def __init__(
        self,
        segmentation: SegmentationModel,
        embed: Embed,
        threshold: float,
        max_speakers: int,
        max_embedding_s: float = 20.0,
        change_threshold: float | None = CHANGE_THRESHOLD,
    ) -> None:
        self.segmentation = segmentation
        self.embed = embed
        self.threshold = threshold
        self.max_speakers = max_speakers
        self.max_embedding_s = max_embedding_s
        self.change_threshold = change_threshold  # None: no change detection inside runs
        self.change_embedded_s = 0.0  # audio embedded by change detection so far (its cost)

    def _windows(
        self, audio: Float32Array, lenient: bool = False
    ) -> list[tuple[int, npt.NDArray[np.int8]]]:
        """(first global frame, activity [frames, 3]) per window."""
        total = n_frames(audio.size)
        per_window = n_frames(WINDOW_SAMPLES)
        starts = list(range(0, max(1, total - per_window + 1), _WINDOW_STEP_FRAMES))
        if starts[-1] + per_window < total:
            starts.append(total - per_window)  # the last window ends with the audio
        windows = []
        for first in starts:
            offset = first * FRAME_STEP_SAMPLES
            activity = self.segmentation.window(audio[offset : offset + WINDOW_SAMPLES], lenient)
            windows.append((first, activity[: total - first]))
        return windows

    def speech(self, audio: Float32Array) -> Diarization:
        """One speaker: where anybody speaks (diarization off, identification on)."""
        total = n_frames(audio.size)
        votes = np.zeros(total)
        cover = np.zeros(total)
        for first, activity in self._windows(audio):
            votes[first : first + len(activity)] += activity.any(axis=1)
            cover[first : first + len(activity)] += 1
        mask = votes > 0.5 * np.maximum(cover, 1)
        spans = _spans(mask, audio.size)
        speech_s = sum(b - a for a, b in spans) / SAMPLE_RATE_HZ
        speaker = LocalSpeaker("S1", speech_s, spans)
        return Diarization(_turns({"S1": mask}, audio.size), (speaker,) if spans else ())

    def __call__(self, audio: Float32Array, recognise: Recognise | None = None) -> Diarization:
        """Turns and local speakers of one recording.

        With `recognise`, pieces that surely are two different enrolled people are never
        joined, and pieces of the same enrolled person always are: voices the device knows
        guide the clustering of similar-sounding ones.
        """
        windows = self._windows(audio, lenient=True)
        changes = (
            ChangeFinder(audio, self.embed, self.change_threshold)
            if self.change_threshold is not None
            else None
        )
        pieces: list[_Piece] = []
        frame_s = FRAME_STEP_SAMPLES / SAMPLE_RATE_HZ
        for w, (first, activity) in enumerate(windows):
            alone = activity.sum(axis=1) == 1
            for k in range(activity.shape[1]):
                active = activity[:, k] == 1
                runs = _runs(active & alone)
                seconds = [(b - a) * frame_s for a, b in runs]
                # The segmentation sometimes gives two people who take turns one local
                # label: each long run is embedded on its own, so clustering can split them.
                long = [
                    r for r, sec in zip(runs, seconds, strict=True) if sec >= _MIN_CLUSTER_SPEECH_S
                ]
                if changes is not None:  # two voices with no pause between them
                    long = [p for r in long for p in _split(r, first, changes)]
                groups = [[r] for r in long] if long else [runs]
                overheard = sum(seconds) < _MIN_ASSIGN_SPEECH_S
                if overheard:
                    # Heard (almost) only over someone else: embedded with the overlap, it
                    # can only join the nearest cluster the window's others do not hold
                    # (as in pyannote). Dropped, it was most of the missed speech on AMI.
                    if active.sum() * frame_s < _MIN_TURN_S:
                        continue
                    groups = [_runs(active)]
                for group in groups:
                    spans = [
                        ((first + a) * FRAME_STEP_SAMPLES, (first + b) * FRAME_STEP_SAMPLES)
                        for a, b in group
                    ]
                    clip = gather(audio, spans, self.max_embedding_s)
                    speech_s = sum(b - a for a, b in group) * frame_s
                    embedding = _unit(self.embed(clip))
                    # Another voice in the clip: too unsure to name anybody.
                    identity = (
                        recognise(embedding, speech_s) if recognise and not overheard else None
                    )
                    pieces.append(_Piece(w, k, group, speech_s, embedding, bool(long), identity))
        if changes is not None:
            self.change_embedded_s += changes.embedded_s
        self._cluster(pieces)
        return self._reconstruct(audio.size, windows, pieces)

    def _cluster(self, items: list[_Piece]) -> None:
        """Average-linkage clustering of the long pieces; the short ones join the nearest."""
        core = [x for x in items if x.core]
        if not core and items:  # nothing long enough: the longest one stands for all
            core = [max(items, key=lambda x: x.speech_s)]
        clusters: list[list[_Piece]] = [[x] for x in core]
        vectors = np.stack([x.embedding for x in core]) if core else np.zeros((0, 1))
        sims = vectors @ vectors.T
        index = {id(x): i for i, x in enumerate(core)}

        def linkage(a: list[_Piece], b: list[_Piece]) -> float:
            # Two speakers of one window are two people; pieces of one window-local
            # speaker may still be split (see __call__).
            if any(x.window == y.window and x.index != y.index for x in a for y in b):
                return -np.inf
            known_a = {x.identity for x in a if x.identity}
            known_b = {y.identity for y in b if y.identity}
            if known_a and known_b and not known_a & known_b:
                return -np.inf  # two different enrolled people
            mean = float(np.mean([[sims[index[id(x)], index[id(y)]] for y in b] for x in a]))
            return max(mean, self.threshold) if known_a & known_b else mean

        while len(clusters) > 1:
            pairs = [
                (linkage(clusters[i], clusters[j]), i, j)
                for i in range(len(clusters))
                for j in range(i + 1, len(clusters))
            ]
            best, i, j = max(pairs)
            too_many = len(clusters) > self.max_speakers
            if best == -np.inf or (best < self.threshold and not too_many):
                break
            clusters[i] += clusters.pop(j)
        centroids = []
        for c, members in enumerate(clusters):
            for x in members:
                x.cluster = c
            weights = np.array([x.speech_s for x in members])
            stacked = np.stack([x.embedding for x in members])
            centroids.append(_unit(np.average(stacked, axis=0, weights=weights)))
        for x in items:
            if x.cluster < 0 and centroids:
                # Join the nearest cluster that has no other speaker of the same window.
                taken = {y.cluster for y in items if y.window == x.window and y.index != x.index}
                scores = [
                    (float(centroid @ x.embedding), c)
                    for c, centroid in enumerate(centroids)
                    if c not in taken
                ]
                if scores:
                    x.cluster = max(scores)[1]

    def _reconstruct(
        self, samples: int, windows: list[tuple[int, npt.NDArray[np.int8]]], items: list[_Piece]
    ) -> Diarization:
        """Frame-level speakers from the windows' votes; then turns and local speakers."""
        total = n_frames(samples)
        n_clusters = 1 + max((x.cluster for x in items), default=-1)
        score = np.zeros((n_clusters, total))
        count = np.zeros(total)
        cover = np.zeros(total)
        for w, (first, activity) in enumerate(windows):
            span = slice(first, first + activity.shape[0])
            cover[span] += 1
            count[span] += activity.sum(axis=1)
            for k in range(activity.shape[1]):
                mine = [x for x in items if x.window == w and x.index == k and x.cluster >= 0]
                if not mine:
                    continue
                # Frames of this local speaker outside its embedded runs (short runs,
                # overlap) go to the cluster that got most of its speech.
                weight: dict[int, float] = {}
                for x in mine:
                    weight[x.cluster] = weight.get(x.cluster, 0.0) + x.speech_s
                rest = max(weight, key=weight.__getitem__)
                column = np.full(activity.shape[0], rest)
                for x in mine:
                    for a, b in x.runs:
                        column[a:b] = x.cluster
                on = np.flatnonzero(activity[:, k])
                score[column[on], first + on] += 1
        cover = np.maximum(cover, 1)
        # Half up: where one of two windows hears someone, count them (np.rint would round
        # 0.5 to 0, and missed speech was most of the error on AMI).
        speakers_per_frame = np.minimum(np.floor(count / cover + 0.5), self.max_speakers).astype(
            int
        )
        order = np.argsort(-score, axis=0, kind="stable")
        active = np.zeros((n_clusters, total), dtype=bool)
        for rank in range(min(n_clusters, self.max_speakers)):
            chosen = order[rank]
            on = (speakers_per_frame > rank) & (score[chosen, np.arange(total)] > 0)
            active[chosen[on], np.arange(total)[on]] = True
        # Labels in order of first speech, so S1 speaks first.
        first_frame = [int(np.argmax(a)) if a.any() else total for a in active]
        ranked = [c for c in np.argsort(first_frame, kind="stable") if active[c].any()]
        masks = {f"S{i + 1}": active[c] for i, c in enumerate(ranked)}
        alone = active.sum(axis=0) == 1
        speakers = []
        for label, mask in masks.items():
            spans = _spans(mask & alone, samples)
            speech_s = sum(b - a for a, b in spans) / SAMPLE_RATE_HZ
            speakers.append(LocalSpeaker(label, speech_s, spans))
        return Diarization(_turns(masks, samples), tuple(speakers))


def _turns(masks: dict[str, Mask], samples: int) -> tuple[Turn, ...]:
    """Runs of frames per speaker, small gaps closed and specks dropped, in time order."""
    turns: list[Turn] = []
    for label, mask in masks.items():
        merged: list[list[float]] = []
        for a, b in _spans(mask, samples):
            start_s, end_s = a / SAMPLE_RATE_HZ, b / SAMPLE_RATE_HZ
            if merged and start_s - merged[-1][1] < _MAX_GAP_S:
                merged[-1][1] = end_s
            else:
                merged.append([start_s, end_s])
        turns += [Turn(a, b, label) for a, b in merged if b - a >= _MIN_TURN_S]
    return tuple(sorted(turns, key=lambda t: (t.start_s, t.label)))


@dataclass(frozen=True)
class LabelledSegment:
    """A transcript segment (split at speaker changes) with its local speaker."""

    segment: Segment
    label: str | None


def attribute(transcript: Transcript, diarization: Diarization) -> tuple[LabelledSegment, ...]:
    """Each segment's speaker by most overlap; segments split where the words' speaker changes."""
    out: list[LabelledSegment] = []
    for seg in transcript.segments:
        if not seg.words:
            out.append(LabelledSegment(seg, diarization.label_at(seg.start_s, seg.end_s)))
            continue
        labels = [diarization.label_at(w.start_s, w.end_s) for w in seg.words]
        for i, word in enumerate(seg.words):  # words between turns: the nearest turn
            if labels[i] is None:
                labels[i] = diarization.nearest_label((word.start_s + word.end_s) / 2, 1.0)
        runs: list[tuple[str | None, list[Word]]] = []
        for label, word in zip(labels, seg.words, strict=True):
            if runs and runs[-1][0] == label:
                runs[-1][1].append(word)
            else:
                runs.append((label, [word]))
        if len(runs) == 1:
            out.append(LabelledSegment(seg, runs[0][0]))
            continue
        for i, (label, words) in enumerate(runs):
            part = replace(
                seg,
                start_s=seg.start_s if i == 0 else words[0].start_s,
                end_s=seg.end_s if i == len(runs) - 1 else words[-1].end_s,
                text="".join(w.text for w in words).strip(),
                words=tuple(words),
            )
            out.append(LabelledSegment(part, label))
    return tuple(out)
