"""The segmenter as a pure function of speech probabilities."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meraudiod.config_sections import RecorderSettings, VadSettings
from meraudiod.segmenter import Segmenter, SegmenterParams, SpeechStarted, Utterance

PARAMS = SegmenterParams(
    start_threshold=0.5,
    end_threshold=0.35,
    min_speech_frames=4,
    hangover_frames=10,
    pre_roll_frames=5,
    post_roll_frames=3,
    max_frames=60,
)


def run(probs: list[float], params: SegmenterParams = PARAMS) -> list[SpeechStarted | Utterance]:
    seg = Segmenter(params)
    events: list[SpeechStarted | Utterance] = []
    for p in probs:
        events += seg.push(p)
    return events + seg.flush()


def utterances(events: list[SpeechStarted | Utterance]) -> list[Utterance]:
    return [e for e in events if isinstance(e, Utterance)]


def test_one_utterance_with_pre_and_post_roll() -> None:
    probs = [0.0] * 20 + [0.9] * 30 + [0.0] * 40
    events = run(probs)
    assert events == [SpeechStarted(15), Utterance(15, 53)]


def test_short_dips_do_not_end_speech_but_hangover_does() -> None:
    probs = [0.9] * 10 + [0.1] * 9 + [0.9] * 10 + [0.1] * 11 + [0.9] * 10 + [0.0] * 20
    utts = utterances(run(probs))
    # the 9-frame dip stays inside; the 11-frame silence (>= hang-over 10) splits
    assert [(u.start_frame, u.end_frame) for u in utts] == [(0, 32), (35, 53)]


def test_hysteresis_keeps_speech_between_thresholds() -> None:
    probs = [0.9] * 5 + [0.4] * 30 + [0.0] * 20
    assert utterances(run(probs)) == [Utterance(0, 38)]


def test_too_little_speech_is_ignored() -> None:
    probs = [0.0] * 10 + [0.9] * 3 + [0.0] * 30 + [0.45] * 30
    assert run(probs) == []


def test_long_speech_is_split_at_the_quietest_frame() -> None:
    probs = [0.9] * 50 + [0.4] + [0.9] * 100 + [0.0] * 20
    utts = utterances(run(probs))
    assert utts[0] == Utterance(0, 51, split=True)
    assert all(u.end_frame - u.start_frame <= PARAMS.max_frames for u in utts)
    assert utts[1].start_frame == 51


def test_params_from_settings_convert_ms_to_frames() -> None:
    params = SegmenterParams.from_settings(
        VadSettings(),
        RecorderSettings(min_speech_ms=256, hangover_ms=704, pre_roll_ms=320, post_roll_ms=192),
    )
    assert (params.min_speech_frames, params.hangover_frames) == (8, 22)
    assert (params.pre_roll_frames, params.post_roll_frames) == (10, 6)
    assert params.max_frames == round(28.0 / 0.032)


@settings(max_examples=300, deadline=None)
@given(
    probs=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=600),
    min_speech=st.integers(1, 10),
    hangover=st.integers(1, 30),
    pre_roll=st.integers(0, 20),
    post_roll=st.integers(0, 30),
    max_frames=st.integers(2, 120),
)
def test_any_probabilities_give_ordered_disjoint_bounded_utterances(
    probs: list[float],
    min_speech: int,
    hangover: int,
    pre_roll: int,
    post_roll: int,
    max_frames: int,
) -> None:
    params = SegmenterParams(
        start_threshold=0.5,
        end_threshold=0.35,
        min_speech_frames=min_speech,
        hangover_frames=hangover,
        pre_roll_frames=pre_roll,
        post_roll_frames=min(post_roll, hangover),
        max_frames=max_frames,
    )
    events = run(probs, params)
    utts = utterances(events)
    previous_end = 0
    for u in utts:
        assert previous_end <= u.start_frame < u.end_frame <= len(probs)
        assert u.end_frame - u.start_frame <= max_frames
        previous_end = u.end_frame
    # every announced start is closed by exactly one utterance, in turn
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SpeechStarted", "Utterance"] * (len(kinds) // 2)
    starts = [e.start_frame for e in events if isinstance(e, SpeechStarted)]
    assert starts == [u.start_frame for u in utts]
    # and each utterance holds at least min_speech frames of speech
    for u in utts:
        speech = sum(1 for p in probs[u.start_frame : u.end_frame] if p >= 0.35)
        assert speech >= min(min_speech, u.end_frame - u.start_frame)
