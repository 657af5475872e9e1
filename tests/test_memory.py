"""Memory: the speaker models are loaded only while speakers or diarization are on, and a
reload that turns both off gives their memory back; the C heap is tuned in the daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from meraudiod.bench_memory import rss_kb

from .conftest import status_json, wait_for

_ECAPA_MB = 60  # the speaker models hold about 90 MB; any sign of them is far above noise


def _rss_mb(pid: int) -> float:
    return rss_kb(pid)[0] / 1024


def test_speaker_models_load_only_when_on_and_are_freed_when_a_reload_turns_them_off(
    env: dict[str, str], speaker_models: Path
) -> None:
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text("[speakers]\nenabled = false\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env={**env, "MERAUDIOD_LOGGING__LEVEL": "INFO"},
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stderr is not None

    def speakers_model() -> object:
        return status_json(env)["models"].get("speakers")

    try:
        wait_for(lambda: status_json(env)["running"], 90, "the daemon to come up")
        off_mb = _rss_mb(proc.pid)
        assert speakers_model() is None

        config.write_text("[speakers]\nenabled = true\n[diarization]\nenabled = true\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: speakers_model() == "ecapa-voxceleb", 60, "the speaker models to load")
        on_mb = _rss_mb(proc.pid)
        assert on_mb > off_mb + _ECAPA_MB, (off_mb, on_mb)  # they were not loaded before

        config.write_text("[speakers]\nenabled = false\n[diarization]\nenabled = false\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: speakers_model() is None, 60, "the speaker models to be freed")
        wait_for(lambda: _rss_mb(proc.pid) < on_mb - _ECAPA_MB, 30, "their memory to be given back")
        assert proc.poll() is None
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    log = proc.stderr.read()
    assert "speaker models loaded" in log and "speaker models freed" in log, log
    assert proc.returncode == 0, log
