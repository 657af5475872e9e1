"""scripts/speaker_sets.py: clips cut to a length of speech are what the daemon counts."""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_the_readme_band_table_is_the_scripts_output(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's table by length of speech is pasted from scripts/measure-speakers: its
    header and each of its rows are in the form the script prints."""
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
