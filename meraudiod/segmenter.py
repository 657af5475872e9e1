"""Pure state machine: per-frame speech probabilities in, utterance boundaries out.

Frame indices are counted from the start of the stream. An utterance is the half-open
frame range [start_frame, end_frame) including pre-roll and post-roll. Utterances come out
in order and never overlap; none is longer than `max_frames`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .audio import FRAME_S
from .config_sections import RecorderSettings, VadSettings


@dataclass(frozen=True)
class SpeechStarted:
    """Speech has lasted `min_speech` frames (start_frame includes pre-roll).

    Every SpeechStarted is followed by exactly one Utterance.
    """

    start_frame: int


@dataclass(frozen=True)
class Utterance:
    """A finished utterance: frames [start_frame, end_frame) of the stream."""

    start_frame: int
    end_frame: int
    split: bool = False  # ended by the length limit, not by silence


SegmenterEvent = SpeechStarted | Utterance


@dataclass(frozen=True)
class SegmenterParams:
    """Segmenter timing in frames."""

    start_threshold: float
    end_threshold: float
    min_speech_frames: int
    hangover_frames: int
    pre_roll_frames: int
    post_roll_frames: int
    max_frames: int

    @classmethod
    def from_settings(cls, vad: VadSettings, recorder: RecorderSettings) -> SegmenterParams:
        """Convert the millisecond settings to frame counts."""

        def frames(ms: float) -> int:
            return round(ms / 1000.0 / FRAME_S)

        return cls(
            start_threshold=vad.start_threshold,
            end_threshold=vad.end_threshold,
            min_speech_frames=max(1, frames(recorder.min_speech_ms)),
            hangover_frames=max(1, frames(recorder.hangover_ms)),
            pre_roll_frames=frames(recorder.pre_roll_ms),
            post_roll_frames=frames(recorder.post_roll_ms),
            max_frames=max(2, frames(recorder.max_utterance_s * 1000.0)),
        )


class Segmenter:
    """Hysteresis, minimum speech, hang-over, pre-roll, post-roll and a clean length split."""

    def __init__(self, params: SegmenterParams) -> None:
        self.p = params
        self._frame = 0  # index of the next frame pushed
        self._prev_end = 0  # no utterance may start before this frame
        self._start: int | None = None  # first speech frame (without pre-roll) when in speech
        self._utt_start = 0  # utterance start including pre-roll
        self._last_speech = 0  # last frame at or above end_threshold
        self._speech_frames = 0
        self._announced = False
        self._recent: list[float] = []  # probabilities since _start, for the split point

    @property
    def in_speech(self) -> bool:
        """Whether an utterance is open (announced or not)."""
        return self._start is not None

    @property
    def frames_seen(self) -> int:
        """How many probabilities were pushed."""
        return self._frame

    def oldest_needed_frame(self) -> int:
        """The first frame a caller must still hold audio for."""
        if self._start is not None:
            return self._utt_start
        return max(self._prev_end, self._frame - self.p.pre_roll_frames)

    def push(self, prob: float) -> list[SegmenterEvent]:
        """Feed the speech probability of the next frame."""
        i = self._frame
        self._frame += 1
        if self._start is None:
            if prob < self.p.start_threshold:
                return []
            # Pre-roll never crowds the speech itself out of a length-limited utterance.
            pre_roll = min(self.p.pre_roll_frames, self.p.max_frames - self.p.min_speech_frames)
            self._open(i, max(self._prev_end, i - max(0, pre_roll)))
        self._note(prob, i)
        events = self._maybe_announce()
        if i - self._last_speech >= self.p.hangover_frames:
            events.extend(self._close(self._last_speech + 1 + self.p.post_roll_frames))
        elif self._frame - self._utt_start >= self.p.max_frames:
            # At the length limit: speech goes on in a new utterance; too little speech is dropped.
            events.extend(self._split() if self._announced else self._close(self._frame))
        return events

    def flush(self) -> list[SegmenterEvent]:
        """End of stream: close an open utterance with whatever audio there is."""
        if self._start is None:
            return []
        return self._close(min(self._frame, self._last_speech + 1 + self.p.post_roll_frames))

    def _open(self, first_speech: int, utt_start: int) -> None:
        self._start = first_speech
        self._utt_start = utt_start
        self._last_speech = first_speech
        self._speech_frames = 0
        self._announced = False
        self._recent = []

    def _note(self, prob: float, i: int) -> None:
        self._recent.append(prob)
        if prob >= self.p.end_threshold:
            self._last_speech = i
            self._speech_frames += 1

    def _maybe_announce(self) -> list[SegmenterEvent]:
        if not self._announced and self._speech_frames >= self.p.min_speech_frames:
            self._announced = True
            return [SpeechStarted(self._utt_start)]
        return []

    def _close(self, end: int) -> list[SegmenterEvent]:
        end = min(end, self._frame, self._utt_start + self.p.max_frames)
        announced = self._announced
        self._start = None
        if not announced:
            return []  # too little speech: a click, a cough, a door
        self._prev_end = end
        return [Utterance(self._utt_start, end)]

    def _split(self) -> list[SegmenterEvent]:
        """At the length limit, cut after the least speech-like frame of the last second.

        The cut keeps at least min_speech frames of speech before it; what follows it goes on
        as a new utterance when it holds speech, and back to idle when it does not.
        """
        assert self._start is not None
        first_candidate = self._frame - round(1.0 / FRAME_S)
        speech_so_far = 0
        best_frame, best_prob = self._frame - 1, 2.0
        for k, prob in enumerate(self._recent):
            speech_so_far += prob >= self.p.end_threshold
            frame = self._start + k
            eligible = frame >= first_candidate and speech_so_far >= self.p.min_speech_frames
            if eligible and prob <= best_prob:  # the latest of equally quiet frames
                best_frame, best_prob = frame, prob
        cut = best_frame + 1
        utterance = Utterance(self._utt_start, cut, split=True)
        self._prev_end = cut
        kept = self._recent[cut - self._start :]
        speech = [cut + k for k, p in enumerate(kept) if p >= self.p.end_threshold]
        if not speech:
            self._start = None
            return [utterance]
        self._open(cut, cut)
        self._recent = kept
        self._speech_frames = len(speech)
        self._last_speech = speech[-1]
        return [utterance, *self._maybe_announce()]
