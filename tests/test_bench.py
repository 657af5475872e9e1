"""`meraudiod bench` runs on the bundled sample and reports every figure it promises."""

from __future__ import annotations

import json

from .conftest import cli


def test_bench_reports_figures_with_ratios_against_the_bare_library(env: dict[str, str]) -> None:
    result = cli("bench", "--json", env=env, timeout_s=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in (
        "vad_us_per_frame",
        "vad_ratio_vs_bare",
        "listening_cpu_pct_of_one_core",
        "asr_command_rtf",
        "asr_command_ratio_vs_bare",
        "asr_passage_rtf",
        "asr_passage_ratio_vs_bare",
        "latency_ms_median",
        "daemon_peak_rss_mb",
        "disk_write_mb_per_recorded_hour",
        "audio_mb_per_recorded_hour",
        "database_mb_per_recorded_hour",
        "database_wal_mb_per_recorded_hour",
        "disk_write_startup_kb",
    ):
        assert isinstance(figures[key], int | float) and figures[key] > 0, key
    assert "speaker_embedding_ms_per_audio_s" in figures
    assert figures["python"] and figures["sqlite"] and figures["onnxruntime"][0].isdigit()
    assert "ctranslate2" in figures and "cpu_features" in figures
    assert "this machine" in figures["timings_note"]
    assert figures["pipeline_recordings"] == 3  # the first 20 s of the sample: three utterances
    # The writes split: the log is part of the database's, which with the audio is the whole.
    database = figures["database_mb_per_recorded_hour"]
    whole = figures["audio_mb_per_recorded_hour"] + database  # each rounded to 0.1
    assert figures["database_wal_mb_per_recorded_hour"] <= database
    assert abs(whole - figures["disk_write_mb_per_recorded_hour"]) <= 0.2
    assert isinstance(figures["keeps_up"], bool) and figures["verdict"]
    assert figures["bench_s"] < 120
