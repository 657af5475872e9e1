"""What the daemon leaves outside its database: no words in the log, no files others can read."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from .conftest import DEMO_TRUTH, cli


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def test_default_log_has_ids_and_timings_but_no_words_and_files_are_private(
    env: dict[str, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    env.pop("MERAUDIOD_LOGGING__LEVEL", None)  # the default level, as the unit runs it
    result = subprocess.run(
        [sys.executable, "-m", "meraudiod", "run", "--source", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=lambda: os.umask(0o022),  # a login shell's umask: files 644, dirs 755
    )
    assert result.returncode == 0, result.stderr
    log = result.stderr
    # The default level is INFO and each transcript is logged (by id), so words would show.
    transcript_lines = [line for line in log.splitlines() if " transcript 0" in line]
    assert len(transcript_lines) == len(DEMO_TRUTH), log
    spoken = set().union(*(_words(u["text"]) for u in DEMO_TRUTH))
    distinctive = {w for w in spoken if len(w) >= 5}
    assert len(distinctive) > 15
    leaked = distinctive & _words(log)
    assert not leaked, f"transcript words in the log: {sorted(leaked)}"

    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    audio = list((data_dir / "audio").rglob("*.flac"))
    assert len(audio) == len(DEMO_TRUTH)
    written = [data_dir / "meraudiod.db", run_dir / "heartbeat.json", *audio]
    written += [p for p in (data_dir, run_dir, *data_dir.rglob("*")) if p.exists()]
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0, f"{path} is {oct(mode)}: readable by other users"


def test_debug_level_logs_the_words(env: dict[str, str]) -> None:
    """The opt-in the config docs describe: DEBUG also logs what was said."""
    env = {**env, "MERAUDIOD_LOGGING__LEVEL": "DEBUG"}
    result = cli("run", "--source", "demo", env=env, timeout_s=300)
    assert result.returncode == 0, result.stderr
    assert "dashwood" in _words(result.stderr)
