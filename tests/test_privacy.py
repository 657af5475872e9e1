"""What the daemon leaves outside its database: no words in the log, no files others can read."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from .conftest import DEMO_TRUTH, TEST_DATA, cli, db_rows, needs_root


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


@needs_root  # the worker runs without root's right to write anywhere (setpriv)
def test_a_do_not_keep_voice_whose_audio_cannot_go_keeps_no_words(
    env: dict[str, str], speaker_models: Path
) -> None:
    """Found by hostile testing: a do-not-keep voice's transcript was committed, and only
    then was the recording deleted, in a second step; an audio file that could not be
    deleted (or a kill in between) kept that person's words in the database. Now the
    recording goes in the transaction that would have stored them, its audio first."""
    on = {**env, "MERAUDIOD_SPEAKERS__ENABLED": "true"}
    clips = [str(TEST_DATA / c) for c in ("ls_2609_0000.flac", "ls_2609_0003.flac")]
    assert cli("speakers", "enroll", "Bob", *clips, env=on).returncode == 0
    assert cli("speakers", "opt-out", "Bob", env=on).returncode == 0
    # Recorded without transcription, then queued for it: the audio is on disk first.
    bob = f"file:{TEST_DATA / 'ls_2609_0001.flac'}"
    recorded = cli("run", "--source", bob, env={**env, "MERAUDIOD_ASR__ENABLED": "false"})
    assert recorded.returncode == 0, recorded.stderr
    rows = db_rows(env, "SELECT id, audio_path FROM recordings")
    assert rows and cli("reprocess", *(r["id"] for r in rows), env=on).returncode == 0
    audio_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio"
    days = {(audio_dir / r["audio_path"]).parent for r in rows}
    for day in days:
        day.chmod(0o555)  # its files can be read, not deleted
    try:
        worker = cli(
            "run",
            "--source",
            bob,
            env={**on, "MERAUDIOD_ASR__MAX_ATTEMPTS": "1"},
            timeout_s=300,
            as_user=True,
        )
    finally:
        for day in days:
            day.chmod(0o750)
    assert "Permission denied" in worker.stderr, worker.stderr[-2000:]
    ids = ", ".join(f"'{r['id']}'" for r in rows)  # ULIDs: letters and digits only
    texts = db_rows(env, f"SELECT text FROM recordings WHERE id IN ({ids}) AND text != ''")
    texts += db_rows(env, f"SELECT text FROM segments WHERE recording_id IN ({ids})")
    assert not texts, [t["text"] for t in texts]
