"""Who spoke when inside one recording: pyannote segmentation + ECAPA embeddings + clustering.

1. pyannote segmentation-3.0 (ONNX) runs on 10 s windows and gives, every 16.875 ms, the
   probabilities of seven powerset classes: nobody, one of three window-local speakers, or
   two of them at once. The likeliest class says who speaks alone (what gets embedded); a
   window also hears two wherever the pairs together hold more than OVERLAP_PROBABILITY.
2. Each window-local speaker with enough speech of its own (no overlap) gets an embedding
   per long run, a run first cut where the voice changes inside it (speaker_change.py);
   its pieces that sound alike (the change detection's cosine) are embedded together;
   one heard only over someone else gets one of its speech with the overlap.
3. Agglomerative clustering (clustering.py: average linkage, cosine) joins window-local
   speakers across windows; two speakers of one window are never joined. Local speakers with
   too little speech for a reliable embedding (or only overlap) join the nearest cluster
   their window's other speakers do not hold (one of their own if those hold every
   cluster). Each frame of a long run then goes to the cluster its change-detection
   sub-windows sound most like (a change that detection missed).
4. The windows' votes are added up per cluster; at every frame as many clusters as speak
   there (speaker_count: the windows' probabilities averaged) are taken, the most voted
   first. Runs of frames are turns.

With diarization off, the same segmentation still says where the speech is, so speaker
identification embeds only speech and can tell how much of it there was.
`attribute()` then gives each transcript word the speaker whose turn it overlaps most and
splits Whisper segments where the speaker changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Final

import numpy as np
import numpy.typing as npt

from .asr import Segment, Stopped, Transcript, Wanted, Word
from .audio import SAMPLE_RATE_HZ, Float32Array
from .clustering import Piece, cluster, join_alike, relabel
from .segmentation import (
    FRAME_CENTRE_SAMPLES,
    FRAME_STEP_SAMPLES,
    WINDOW_FRAMES,
    WINDOW_SAMPLES,
    Mask,
    frame_sample,
    mask_runs,
    mask_spans,
    n_frames,
    speaker_count,
)
from .segmentation import DiarizationError as DiarizationError
from .segmentation import SegmentationModel as SegmentationModel
from .segmentation import activity as activity
from .segmentation import gather as gather
from .speaker_change import CHANGE_THRESHOLD, SUB_WINDOW_S, ChangeFinder

_LOGGER = logging.getLogger(__name__)

# The windows overlap by half, so that every turn is seen away from a window's edge once.
_WINDOW_STEP_FRAMES: Final = 296  # 296 * 270 samples = 4.995 s
# Below this much speech of its own, a window-local speaker gets no embedding of its own
# for clustering; its frames join the nearest cluster if it has at least the second figure.
_MIN_CLUSTER_SPEECH_S: Final = 1.0
_MIN_ASSIGN_SPEECH_S: Final = 0.3
# Where the overlap classes together hold more than this, the output has two speakers,
# though one alone wins the argmax (chosen on the trn AMI excerpts only, see the README).
OVERLAP_PROBABILITY: Final = 0.2
# Runs a sub-window fits in are relabelled (the shortest its sub-windows can speak for; the
# change detection needs one each side of a point, 3 s).
_MIN_RELABEL_FRAMES: Final = int(SUB_WINDOW_S * SAMPLE_RATE_HZ) // FRAME_STEP_SAMPLES
_MIN_TURN_S: Final = 0.1  # shorter runs of frames are noise
_MAX_GAP_S: Final = 0.2  # a speaker's turns closer than this are joined

Embed = Callable[[Float32Array], Float32Array]
# Who an embedding (of that much speech) surely is, among enrolled people, or None.
Recognise = Callable[[Float32Array, float], str | None]


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


def _unit(vector: Float32Array) -> Float32Array:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector


def _split(run: tuple[int, int], first: int, changes: ChangeFinder) -> list[tuple[int, int]]:
    """A window's run of frames (the window starting at global frame `first`) cut where
    the voice changes."""
    start, end = (frame_sample(first + f) for f in run)
    # The frame whose stretch [frame_sample(f), frame_sample(f + 1)) holds each change.
    cuts = [
        (sample - frame_sample(0)) // FRAME_STEP_SAMPLES - first
        for sample in changes.changes(start, end)
    ]
    edges = [run[0], *cuts, run[1]]
    return list(pairwise(edges))


@dataclass
class Progress:
    """How far one recording's diarization got: handed to the next call on the same audio
    after a give-up (Stopped), that call goes on from there (a long upload's analysis, minutes
    on a Pi, yields to the room's speech between windows and is not started again)."""

    segmented: list[tuple[int, Float32Array]] = field(default_factory=list)  # per window
    pieces: list[Piece] = field(default_factory=list)  # of the first `embedded` windows
    embedded: int = 0
    sub_windows: dict[int, Float32Array] = field(default_factory=dict)  # ChangeFinder's


class _Asker:
    """Asks `wanted` before each window; False gives the analysis up (Stopped)."""

    def __init__(self, wanted: Wanted | None, samples: int) -> None:
        self.wanted = wanted
        self.samples = samples

    def __call__(self, at_sample: int, step: str) -> None:
        if self.wanted is not None and not self.wanted():
            raise Stopped(
                f"speaker analysis given up {at_sample / SAMPLE_RATE_HZ:.0f} s"
                f" into {self.samples / SAMPLE_RATE_HZ:.0f} s ({step})"
            )


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
        overlap_probability: float | None = OVERLAP_PROBABILITY,
    ) -> None:
        self.segmentation = segmentation
        self.embed = embed
        self.threshold = threshold
        self.max_speakers = max_speakers
        self.max_embedding_s = max_embedding_s
        self.change_threshold = change_threshold  # None: no change detection inside runs
        self.overlap_probability = overlap_probability  # None: the argmax alone
        self.change_embedded_s = 0.0  # audio embedded by change detection so far (its cost)

    def _windows(
        self,
        audio: Float32Array,
        ask: _Asker | None = None,
        windows: list[tuple[int, Float32Array]] | None = None,
    ) -> list[tuple[int, Float32Array]]:
        """(first global frame, powerset probabilities [frames, 7]) per window, appended to
        `windows` (those of an earlier call given up)."""
        total = n_frames(audio.size)
        per_window = WINDOW_FRAMES  # the model's frames per window, not n_frames(10 s)
        starts = list(range(0, max(1, total - per_window + 1), _WINDOW_STEP_FRAMES))
        if starts[-1] + per_window < total:
            starts.append(total - per_window)  # the last window ends with the audio
        windows = [] if windows is None else windows
        for first in starts[len(windows) :]:
            offset = first * FRAME_STEP_SAMPLES
            if ask is not None:
                ask(offset, "segmentation")
            probs = self.segmentation.probabilities(audio[offset : offset + WINDOW_SAMPLES])
            windows.append((first, probs[: total - first]))
        return windows

    def speech(
        self,
        audio: Float32Array,
        wanted: Wanted | None = None,
        progress: Progress | None = None,
    ) -> Diarization:
        """One speaker: where anybody speaks (diarization off, identification on).
        `wanted` and `progress` as for a diarization (__call__)."""
        total = n_frames(audio.size)
        votes = np.zeros(total)
        cover = np.zeros(total)
        done = None if progress is None else progress.segmented
        for first, probs in self._windows(audio, _Asker(wanted, audio.size), done):
            active = activity(probs).any(axis=1)
            votes[first : first + active.size] += active
            cover[first : first + active.size] += 1
        mask = votes > 0.5 * np.maximum(cover, 1)
        spans = mask_spans(mask, audio.size)
        speech_s = sum(b - a for a, b in spans) / SAMPLE_RATE_HZ
        speaker = LocalSpeaker("S1", speech_s, spans)
        return Diarization(_turns({"S1": mask}, audio.size), (speaker,) if spans else ())

    def __call__(
        self,
        audio: Float32Array,
        recognise: Recognise | None = None,
        wanted: Wanted | None = None,
        find_changes: bool = True,
        progress: Progress | None = None,
    ) -> Diarization:
        """Turns and local speakers of one recording.

        With `recognise`, pieces that surely are two different enrolled people are never
        joined, and pieces of the same enrolled person always are: voices the device knows
        guide the clustering of similar-sounding ones. `wanted`, asked before each window,
        False gives it up (Stopped); `progress` keeps how far it got, for the next call.
        `find_changes=False`: no speaker-change detection inside runs (most of the cost on
        long single-speaker speech), for a clean close clip whose voices the segmentation
        tells apart by itself.
        """
        threshold = self.change_threshold if find_changes else None
        done = Progress() if progress is None else progress
        ask = _Asker(wanted, audio.size)
        probabilities = self._windows(audio, ask, done.segmented)
        # Who speaks alone (the runs embedded) by the argmax; who is heard (the output) also
        # where the overlap classes hold more than overlap_probability.
        windows = [(first, activity(probs, lenient=True)) for first, probs in probabilities]
        heard = [
            (first, activity(probs, True, self.overlap_probability))
            for first, probs in probabilities
        ]
        changes = None
        if threshold is not None:
            changes = ChangeFinder(audio, self.embed, threshold, done.sub_windows)
        pieces = done.pieces
        frame_s = FRAME_STEP_SAMPLES / SAMPLE_RATE_HZ
        for w, (first, solo) in enumerate(windows):
            if w < done.embedded:
                continue
            ask(first * FRAME_STEP_SAMPLES, "embeddings")
            alone = solo.sum(axis=1) == 1
            for k in range(solo.shape[1]):
                active = solo[:, k] == 1
                runs = mask_runs(active & alone)
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
                    groups = [mask_runs(active)]
                embeddings = [self._embed_runs(audio, first, group) for group in groups]
                if long and threshold is not None:
                    # Its pieces that sound alike by the change detection's own measure
                    # are one voice: embedded together, a steadier print to cluster.
                    joined = join_alike(embeddings, threshold)
                    groups = [sorted(r for i in ix for r in groups[i]) for ix in joined]
                    embeddings = [
                        embeddings[ix[0]] if len(ix) == 1 else self._embed_runs(audio, first, g)
                        for ix, g in zip(joined, groups, strict=True)
                    ]
                for group, embedding in zip(groups, embeddings, strict=True):
                    speech_s = sum(b - a for a, b in group) * frame_s
                    piece = Piece(w, k, group, speech_s, embedding, bool(long), overheard=overheard)
                    pieces.append(piece)
            done.embedded = w + 1
        if recognise is not None:  # by the profiles as they are now, whenever it was embedded
            for piece in pieces:
                # Another voice in the clip: too unsure to name anybody.
                if not piece.overheard:
                    piece.identity = recognise(piece.embedding, piece.speech_s)
        if changes is not None:
            self.change_embedded_s += changes.embedded_s
        centroids = cluster(pieces, self.threshold, self.max_speakers)
        count = speaker_count(probabilities, n_frames(audio.size), self.overlap_probability)
        return self._reconstruct(audio.size, heard, count, pieces, centroids, changes)

    def _embed_runs(
        self, audio: Float32Array, first: int, runs: list[tuple[int, int]]
    ) -> Float32Array:
        """The unit embedding of a window's runs of frames (the window starts at global
        frame `first`), at most max_embedding_s of them."""
        spans = [(frame_sample(first + a), frame_sample(first + b)) for a, b in runs]
        return _unit(self.embed(gather(audio, spans, self.max_embedding_s)))

    def _reconstruct(
        self,
        samples: int,
        windows: list[tuple[int, npt.NDArray[np.int8]]],
        count: npt.NDArray[np.int64],
        items: list[Piece],
        centroids: Float32Array,
        changes: ChangeFinder | None,
    ) -> Diarization:
        """Frame-level speakers: as many as `count` says (speaker_count), the clusters the
        windows vote for most; then turns and local speakers."""
        total = n_frames(samples)
        n_clusters = 1 + max((x.cluster for x in items), default=-1)
        score = np.zeros((n_clusters, total))
        for w, (first, voiced) in enumerate(windows):
            for k in range(voiced.shape[1]):
                mine = [x for x in items if x.window == w and x.index == k and x.cluster >= 0]
                if not mine:
                    continue
                taken = {x.cluster for x in items if x.window == w and x.index != k}
                allowed = np.array([c not in taken for c in range(n_clusters)])
                column = _column(voiced.shape[0], first, mine, centroids, allowed, changes)
                on = np.flatnonzero(voiced[:, k])
                score[column[on], first + on] += 1
        speakers_per_frame = np.minimum(count, self.max_speakers)
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
            spans = mask_spans(mask & alone, samples)
            speech_s = sum(b - a for a, b in spans) / SAMPLE_RATE_HZ
            speakers.append(LocalSpeaker(label, speech_s, spans))
        return Diarization(_turns(masks, samples), tuple(speakers))


def _column(
    frames: int,
    first: int,
    mine: list[Piece],
    centroids: Float32Array,
    allowed: npt.NDArray[np.bool_],
    changes: ChangeFinder | None,
) -> npt.NDArray[np.int64]:
    """The cluster of each frame of one window-local speaker (the window starts at global
    frame `first`): its pieces' clusters over their runs, long runs relabelled where their
    sub-windows sound like another cluster (clustering.relabel)."""
    # Frames outside its embedded runs (short runs, overlap) go to the cluster that got
    # most of its speech.
    weight: dict[int, float] = {}
    for x in mine:
        weight[x.cluster] = weight.get(x.cluster, 0.0) + x.speech_s
    column = np.full(frames, max(weight, key=weight.__getitem__), dtype=np.int64)
    for x in mine:
        for a, b in x.runs:
            column[a:b] = x.cluster
            if changes is None or not x.core or (b - a) < _MIN_RELABEL_FRAMES:
                continue
            if not np.delete(allowed, x.cluster).any():  # no other cluster it could go to
                continue
            start, end = (frame_sample(first + f) for f in (a, b))
            centres, sub_windows = changes.sub_windows(start, end)
            if sub_windows.shape[0] == 0:
                # A run of 1.5-2 s between the grid's points: one sub-window on its centre.
                centres, sub_windows = changes.centred_sub_window(start, end)
            frame_centres = np.arange(first + a, first + b) * FRAME_STEP_SAMPLES
            frame_centres += FRAME_CENTRE_SAMPLES
            column[a:b] = relabel(
                frame_centres, x.cluster, allowed, centres, sub_windows, centroids
            )
    return column


def _turns(masks: dict[str, Mask], samples: int) -> tuple[Turn, ...]:
    """Runs of frames per speaker, small gaps closed and specks dropped, in time order."""
    turns: list[Turn] = []
    for label, mask in masks.items():
        merged: list[list[float]] = []
        for a, b in mask_spans(mask, samples):
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
        for i, word in enumerate(seg.words):
            if labels[i] is not None:
                continue
            if word.end_s <= word.start_s and i > 0 and labels[i - 1] is not None:
                labels[i] = labels[i - 1]  # Whisper gave it no length: it overlaps nothing
            else:  # between turns: the nearest turn
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
