"""Which window-local speakers of one recording are one person (diarization.py's step 3).

Average-linkage clustering (cosine) of the pieces long enough to be embedded reliably; the
short ones join the nearest cluster their window's other speakers do not hold (a cluster
of their own when those hold every one). Then `relabel` goes back over the long runs: the
segmentation sometimes gives two voices one local label with no pause between them, and a
change the change detection missed is still heard in its sub-windows, each closer to the
other person's cluster than to its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from .audio import SAMPLE_RATE_HZ, Float32Array
from .voiceprints import unit

# Around each frame of a long run, the sub-windows whose centres lie within this much of it
# stand for its voice when the run is relabelled (chosen a priori, not tuned: it changes no
# frame of the trn AMI excerpts).
RELABEL_CONTEXT_S: Final = 1.0


@dataclass
class Piece:
    """Speech of one window-local speaker (one long run, or all its short runs) to cluster."""

    window: int
    index: int
    runs: list[tuple[int, int]]  # frame ranges inside the window
    speech_s: float
    embedding: Float32Array
    core: bool  # long enough to found or join clusters by itself
    identity: str | None = None  # an enrolled person it was recognised as
    overheard: bool = False  # heard (almost) only over someone else: never named
    cluster: int = -1


def cluster(items: list[Piece], threshold: float, max_speakers: int) -> Float32Array:
    """Set each piece's cluster; the clusters' centroids [clusters, dim] (unit vectors).

    Two speakers of one window are never joined, nor two different enrolled people; two
    pieces of the same enrolled person always are."""
    core = [x for x in items if x.core]
    if not core and items:  # nothing long enough: the longest one stands for all
        core = [max(items, key=lambda x: x.speech_s)]
    clusters: list[list[Piece]] = [[x] for x in core]
    vectors = np.stack([x.embedding for x in core]) if core else np.zeros((0, 1))
    sims = vectors @ vectors.T
    index = {id(x): i for i, x in enumerate(core)}

    def linkage(a: list[Piece], b: list[Piece]) -> float:
        # Two speakers of one window are two people; pieces of one window-local
        # speaker may still be split (see Diarizer.__call__).
        if any(x.window == y.window and x.index != y.index for x in a for y in b):
            return -np.inf
        known_a = {x.identity for x in a if x.identity}
        known_b = {y.identity for y in b if y.identity}
        if known_a and known_b and not known_a & known_b:
            return -np.inf  # two different enrolled people
        mean = float(np.mean([[sims[index[id(x)], index[id(y)]] for y in b] for x in a]))
        return max(mean, threshold) if known_a & known_b else mean

    while len(clusters) > 1:
        pairs = [
            (linkage(clusters[i], clusters[j]), i, j)
            for i in range(len(clusters))
            for j in range(i + 1, len(clusters))
        ]
        best, i, j = max(pairs)
        too_many = len(clusters) > max_speakers
        if best == -np.inf or (best < threshold and not too_many):
            break
        clusters[i] += clusters.pop(j)
    centroids = []
    for c, members in enumerate(clusters):
        for x in members:
            x.cluster = c
        weights = np.array([x.speech_s for x in members])
        stacked = np.stack([x.embedding for x in members])
        centroids.append(unit(np.average(stacked, axis=0, weights=weights)))
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
            elif len(centroids) < max_speakers:
                # Its window's others hold every cluster: a voice of its own (heard over
                # them; dropped, its speech was missed).
                x.cluster = len(centroids)
                centroids.append(unit(x.embedding))
    return np.stack(centroids) if centroids else np.zeros((0, 1), dtype=np.float32)


def join_alike(vectors: list[Float32Array], threshold: float) -> list[list[int]]:
    """Indices of unit vectors grouped by average linkage: the two most alike groups join
    while their mean cosine is at least threshold. Groups and their indices in order."""
    groups = [[i] for i in range(len(vectors))]
    while len(groups) > 1:
        best, i, j = max(
            (
                float(np.mean([[vectors[a] @ vectors[b] for b in groups[j]] for a in groups[i]])),
                i,
                j,
            )
            for i in range(len(groups))
            for j in range(i + 1, len(groups))
        )
        if best < threshold:
            break
        groups[i] += groups.pop(j)
    return sorted(sorted(group) for group in groups)


def relabel(
    frame_centres: npt.NDArray[np.int64],
    own: int,
    allowed: npt.NDArray[np.bool_],
    sub_window_centres: npt.NDArray[np.int64],
    sub_windows: Float32Array,
    centroids: Float32Array,
) -> npt.NDArray[np.int64]:
    """The cluster of each frame of a run (centre samples) that clustering gave to `own`.

    Each frame takes the allowed cluster whose centroid the sub-windows around it
    (RELABEL_CONTEXT_S either side; the nearest one if none) sound most like, when that is
    closer than its own cluster. allowed: clusters no other speaker of its window holds."""
    clusters = np.full(frame_centres.size, own, dtype=np.int64)
    if sub_windows.shape[0] == 0 or centroids.shape[0] < 2:
        return clusters
    distance = np.abs(frame_centres[:, None] - sub_window_centres[None, :])
    near = distance <= RELABEL_CONTEXT_S * SAMPLE_RATE_HZ
    near |= distance == distance.min(axis=1, keepdims=True)
    sims = (near @ (sub_windows @ centroids.T)) / near.sum(axis=1, keepdims=True)
    sims[:, ~allowed] = -np.inf
    best = np.argmax(sims, axis=1)
    closer = sims[np.arange(best.size), best] > sims[:, own]
    return np.where(closer, best, clusters)
