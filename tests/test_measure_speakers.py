"""scripts/speaker_sets.py: clips cut to a length of speech are what the daemon counts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from meraudiod.audio import decode_file, to_float32
from meraudiod.config import Settings
from meraudiod.speakers import SpeakerStage

from .conftest import REPO, TEST_DATA

sys.path.insert(0, str(REPO / "scripts"))
from speaker_sets import BANDS, cuts, halves


@pytest.fixture(scope="module")
def stage(speaker_models: Path) -> SpeakerStage:
    settings = Settings()
    settings.storage.models_dir = speaker_models
    settings.speakers.enabled = True
    return SpeakerStage(settings)


def test_cut_clips_fall_in_their_band(stage: SpeakerStage) -> None:
    """Each clip cut for a band holds that band's length of speech, as the segmentation
    counts it when the daemon sees the clip on its own."""
    audio = to_float32(decode_file(TEST_DATA / "ls_3080_0001.flac"))
    spans = list(stage.diarizer.speech(audio).speakers[0].spans)
    for label, low, high, length, n in BANDS[:3]:
        clips = cuts(audio, spans, length, n)
        assert clips, label
        for clip in clips:
            speech_s = stage.diarizer.speech(clip).speakers[0].speech_s
            assert low - 0.15 <= speech_s <= high + 0.15, (label, speech_s)


def test_calibration_and_test_speakers_never_mix() -> None:
    names = [str(n) for n in range(11)]
    calibration, test = halves(names)
    assert not set(calibration) & set(test) and set(calibration) | set(test) == set(names)


def measure_speakers() -> Any:
    """scripts/measure-speakers as a module (it has no .py to import it by)."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader(
        "measure_speakers", str(REPO / "scripts" / "measure-speakers")
    )
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


def test_the_readme_band_table_is_the_scripts_output(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's table by length of speech is pasted from scripts/measure-speakers: its
    header and each of its rows are in the form the script prints."""
    module = measure_speakers()
    row = {"targets": 3, "impostors": 0, "accuracy": 2 / 3}
    row |= {"false_reject": 1 / 3, "misnamed": 0.0, "false_accept": 0.0}
    report = {"readers": ["1"], "impostor_readers": ["2"], "librispeech": {}, "an4": {">5": row}}
    module.print_bands(report)
    printed = capsys.readouterr().out.splitlines()
    readme = (REPO / "README.md").read_text().splitlines()
    header = next(line for line in printed if line.startswith("| set | speech |"))
    assert header in readme
    assert "| AN4 | over 5 s | 3 | 66.7% | 33.3% | 0% | 0 |  |" in printed
    table = readme[readme.index(header) + 2 :]
    rows = table[: next(i for i, line in enumerate(table) if not line.startswith("|"))]
    assert len(rows) >= 12 and all(r.startswith(("| LibriSpeech | ", "| AN4 | ")) for r in rows)


def test_der_errors_are_split_by_how_many_people_talk() -> None:
    """Three people at once for 1 s, two for 1 s, one for 1 s, nobody for 1 s; the output
    hears one voice throughout those 4 s: missed 2 s (three talking), 1 s (two talking),
    false alarm 1 s (nobody talking); a second voice where one talks is an extra voice."""
    from pyannote.core import Annotation
    from pyannote.core import Segment as Span

    module = measure_speakers()
    ref, hyp = Annotation(), Annotation()
    ref[Span(0, 3), 0] = "A"
    ref[Span(0, 2), 1] = "B"
    ref[Span(0, 1), 2] = "C"
    hyp[Span(0, 4), 0] = "S1"
    hyp[Span(5, 6), 1] = "S1"
    ref[Span(5, 6), 3] = "A"
    hyp[Span(5, 6), 2] = "S2"
    causes = module.error_causes(ref, hyp)
    assert causes == {
        "missed_nobody_heard": 0.0,
        "missed_three_or_more": 2.0,
        "missed_two_heard_one": 1.0,
        "false_alarm_nobody_spoke": 1.0,
        "false_alarm_extra_voice": 1.0,
        "reference_speech": 7.0,
    }
