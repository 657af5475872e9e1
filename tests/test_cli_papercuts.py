"""What a new user hit on the command line: one clear line instead of a traceback, output
that means what it says, and commands that do not touch what they only read."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile
from ulid import ULID

from meraudiod.config import Settings
from meraudiod.db import Transaction, open_db, set_kv
from meraudiod.models import manifest
from meraudiod.profiles import delete, rename
from meraudiod.speakers import next_unknown_name

from .broker import free_port
from .conftest import (
    DEMO,
    REPO,
    TEST_DATA,
    SilenceFeeder,
    cli,
    db_rows,
    needs_root,
    run_daemon,
    stored_audio,
    wait_for,
    wait_running,
)

SHORT = TEST_DATA / "librivox_0880.wav"  # one utterance: "He was not an ill-disposed young man"


def _log_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " INFO " in f" {line}"]


def test_interactive_commands_log_only_warnings_unless_verbose(env: dict[str, str]) -> None:
    quiet = cli("analyze", str(SHORT), env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "young man" in quiet.stdout.lower()
    assert _log_lines(quiet.stderr) == [], quiet.stderr
    verbose = cli("analyze", "-v", str(SHORT), env=env)
    assert verbose.returncode == 0, verbose.stderr
    assert any("transcript" in line for line in _log_lines(verbose.stderr)), verbose.stderr


def test_run_print_names_the_transcripts_an_earlier_run_left(env: dict[str, str]) -> None:
    """`run --source file:X --print` also transcribes the backlog an earlier run left (an
    `analyze` stopped half way, a `reprocess`), and printed it as X's, with nothing to tell
    them apart: `1 recordings, 2 transcribed`. Now each is named by its own source."""
    other = TEST_DATA / "ls_103_0000.flac"
    assert cli("analyze", str(other), env=env).returncode == 0
    (left,) = db_rows(env, "SELECT id FROM recordings")
    assert cli("reprocess", left["id"], env=env).returncode == 0
    printed = cli("run", "--source", f"file:{SHORT}", "--print", env=env)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert len(lines) == 3, printed.stdout
    ours = [line for line in lines if "young man" in line.lower()]
    theirs = [line for line in lines if line not in ours and line.startswith("[")]
    assert len(ours) == 1 and "left by an earlier run" not in ours[0], printed.stdout
    assert len(theirs) == 1, printed.stdout
    assert theirs[0].endswith(f"  (file:{other}, left by an earlier run)"), printed.stdout
    assert re.fullmatch(
        r"1 recording, 1 transcribed, and 1 left by an earlier run, in [\d.]+ s", lines[-1]
    ), printed.stdout


def test_run_on_a_terminal_is_quiet_and_into_a_pipe_logs_info(env: dict[str, str]) -> None:
    """A person watching `run --print` sees transcripts; the daemon's log keeps INFO."""
    piped = cli("run", "--source", f"file:{SHORT}", "--print", env=env)
    assert piped.returncode == 0, piped.stderr
    assert _log_lines(piped.stderr), piped.stderr
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meraudiod", "run", "--source", f"file:{SHORT}", "--print"],
            env={k: v for k, v in env.items() if k != "INVOCATION_ID"},
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        terminal = -1
        stdout, _ = proc.communicate(timeout=120)
        chunks = []
        while True:  # what reached the terminal; EOF (or EIO) once the process has gone
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown
    assert "young man" in stdout.lower()
    assert _log_lines(shown) == [], shown


def test_read_commands_never_create_a_database(env: dict[str, str], tmp_path: Path) -> None:
    typo = tmp_path / "dta"  # a mistyped data directory
    env = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(typo)}
    for args in (
        ("status",),
        ("status", "--json"),
        ("recordings", "list"),
        ("recordings", "show", "01JD2X9K8M7Q6R5S4T3V2W1X0Y"),
        ("jobs",),
        ("speakers", "list"),
        ("reprocess", "--failed"),
    ):
        result = cli(*args, env=env)
        assert result.returncode == 1, (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(typo / "meraudiod.db") in lines[0], (args, result.stderr)
        assert "data_dir" in lines[0]
    assert not typo.exists()


def test_recordings_output_is_consistent_and_errors_are_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    assert cli("analyze", str(SHORT), env=env).returncode == 0
    listed = cli("recordings", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    for key in ("start_s", "end_s", "duration_s", "started_at"):
        assert row[key] == round(row[key], 3), (key, row[key])
        assert len(repr(row[key]).split(".")[-1]) <= 3, (key, row[key])
    rec_id = row["id"]

    # `show` calls it what `list` calls it, and a lowercase ULID is the same recording.
    shown = cli("recordings", "show", rec_id.lower(), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    assert details["id"] == rec_id and details["state"] == row["state"] == "done"
    assert "status" not in details

    # Export onto a file, or somewhere nothing can be written: one line, no traceback.
    existing = tmp_path / "taken.txt"
    existing.write_text("mine")
    for out in (existing, Path("/proc/meraudiod-export")):
        result = cli("recordings", "export", rec_id, "--out", str(out), env=env)
        assert result.returncode == 1, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(out) in lines[0] and "--out" in lines[0]
    assert existing.read_text() == "mine"

    exported = cli("recordings", "export", rec_id.lower(), "--out", str(tmp_path / "x"), env=env)
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        f"{rec_id}.flac",
        f"{rec_id}.json",
    ]

    deleted = cli("recordings", "delete", rec_id.lower(), env=env)
    assert deleted.returncode == 0 and "deleted 1" in deleted.stdout, deleted.stderr


def test_run_print_into_a_reader_that_went_away_is_no_dead_stage(
    env: dict[str, str],
) -> None:
    """`run --print | head -1`: the reader closes the pipe. The worker printed from its own
    thread, died of the BrokenPipeError with a traceback, and the run failed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meraudiod", "run", "--source", f"file:{DEMO}", "--print"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first transcript
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "died" not in stderr, stderr
    states = [row["status"] for row in db_rows(env, "SELECT status FROM recordings")]
    assert len(states) == 5 and set(states) == {"done"}, states  # every recording still transcribed


@pytest.mark.parametrize(
    ("closed", "prints"), [("2>&-", True), (">&- 2>&-", False), ("<&- >&- 2>&-", False)]
)
def test_run_started_with_its_standard_streams_closed_does_its_job(
    env: dict[str, str], tmp_path: Path, closed: str, prints: bool
) -> None:
    """A supervisor that starts the daemon with stderr closed: `run` died at once with an
    AttributeError nobody could see (exit 1). Such a stream is now /dev/null, so no file the
    daemon opens (a recording's audio) takes its number and gets what libraries print. Two
    recordings (one utterance twice): the files of both are whole."""
    twice = tmp_path / "twice.wav"
    audio, rate = soundfile.read(SHORT, dtype="int16")
    pause = np.zeros(2 * rate, np.int16)
    soundfile.write(twice, np.concatenate([pause, audio, pause, audio, pause]), rate)
    run = ("-m", "meraudiod", "run", "--source", f"file:{twice}", "--print")
    result = subprocess.run(
        ["sh", "-c", f'exec "$0" "$@" {closed}', sys.executable, *run],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, closed
    rows = db_rows(env, "SELECT status, text, audio_path FROM recordings ORDER BY start_s")
    assert [row["status"] for row in rows] == ["done"] * 2
    for row in rows:
        audio, rate = soundfile.read(stored_audio(env, row["audio_path"]))
        assert rate == 16000 and audio.size > rate
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    printed = [line.split("] ", 1)[1] for line in lines]
    assert printed == ([row["text"] for row in rows] if prints else [])


@pytest.mark.parametrize(
    "args",
    [
        ["recordings", "show", b"\xff"],
        ["recordings", "delete", b"01M8\xff"],
        ["speakers", "rename", b"Jos\xe9", "Jose"],
        ["speakers", "delete", b"Jos\xe9"],
        ["speakers", "opt-out", b"Jos\xe9"],
        ["speakers", "merge", "Jose", b"Jos\xe9"],
    ],
)
def test_a_name_typed_in_a_terminal_that_is_not_utf8_is_one_line(
    env: dict[str, str], args: list[str | bytes]
) -> None:
    """A Latin-1 terminal sends "Jos\xe9": Python hands it over as a lone surrogate, which
    reached SQLite and ended in a UnicodeEncodeError traceback."""
    open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db").close()
    result = subprocess.run(
        [
            sys.executable.encode(),
            b"-m",
            b"meraudiod",
            *(a if isinstance(a, bytes) else a.encode() for a in args),
        ],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]  # click's usage lines come before it
    assert last.startswith("Error:") and "not valid UTF-8 text" in last, stderr


def test_status_while_muted_and_with_another_config(env: dict[str, str], tmp_path: Path) -> None:
    """`status` shows the running daemon's models and no "level None" while it is muted."""
    run_dir = tmp_path / "run"
    env = {**env, "MERAUDIOD_STORAGE__RUN_DIR": str(run_dir)}
    conn = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    set_kv(conn, "listening", "OFF")  # muted over MQTT before: the microphone stays closed
    conn.close()
    proc = run_daemon(env, source="mic", stderr=subprocess.DEVNULL)
    # The admin's shell has another configuration: other models than the daemon loaded.
    admin = {**env, "MERAUDIOD_ASR__MODEL": "base.en", "MERAUDIOD_SPEAKERS__ENABLED": "true"}
    try:
        data = wait_running(admin, proc)
        assert data["muted"] is True and data["audio_level_dbfs"] is None
        assert data["models"]["asr"] == "tiny.en" and data["models"]["speakers"] is None
        table = cli("status", env=admin).stdout
        (mic_line,) = [line for line in table.splitlines() if line.startswith("microphone")]
        assert "None" not in mic_line and "muted" in mic_line, mic_line
        (models_line,) = [line for line in table.splitlines() if line.startswith("models")]
        assert "asr tiny.en" in models_line and "speakers" not in models_line, models_line
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    stopped = json.loads(cli("status", "--json", env=admin).stdout)
    assert stopped["running"] is False and stopped["models"]["asr"] == "base.en"


def test_a_damaged_model_names_the_file_and_the_fix(
    env: dict[str, str], models_dir: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "models"
    damaged.mkdir()
    (damaged / "tiny.en").symlink_to(models_dir / "tiny.en")
    shutil.copytree(models_dir / "silero-vad-v6", damaged / "silero-vad-v6")
    (onnx,) = (damaged / "silero-vad-v6").glob("*.onnx")
    onnx.write_bytes(onnx.read_bytes()[:100_000])  # a download cut short
    env = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(damaged)}
    for args, status in ((("run", "--source", "demo"), 78), (("analyze", str(SHORT)), 1)):
        result = cli(*args, env=env)
        assert result.returncode == status, result.stdout  # 78: the unit does not restart
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert str(onnx) in lines[0] and "meraudiod models install --default" in lines[0]


def test_the_demo_never_writes_to_the_real_database(
    env: dict[str, str], models_dir: Path, tmp_path: Path
) -> None:
    """`scripts/run` on a machine without a microphone replays the demo into a throwaway store."""
    real = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    assert cli("analyze", str(SHORT), env=env).returncode == 0  # the owner's own recording
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    result = subprocess.run(
        [str(REPO / "scripts" / "run")],
        env={**env, "TMPDIR": str(tmp), "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "5 recordings, 5 transcribed" in result.stdout
    with sqlite3.connect(real / "meraudiod.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 1
    assert list(tmp.iterdir()) == []  # the throwaway store is gone


@pytest.mark.parametrize("name", ["unknown-7", "Unknown-12"])
def test_a_person_cannot_take_a_provisional_name(env: dict[str, str], name: str) -> None:
    conn = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    conn.execute(
        "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
        " VALUES ('01JD2X9K8M7Q6R5S4T3V2W1X0Y', 'Carol', 0, 0, 0, 0)"
    )
    conn.close()
    result = cli("speakers", "rename", "Carol", name, env=env)
    assert result.returncode == 1 and "unknown-N" in result.stderr, result.stderr
    listed = json.loads(cli("speakers", "list", "--json", env=env).stdout)
    assert [p["name"] for p in listed] == ["Carol"]


def test_provisional_numbers_are_never_reused(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "meraudiod.db")

    def new_voice() -> str:  # as the worker files a voice nobody enrolled
        with Transaction(conn):
            name = next_unknown_name(conn)
            conn.execute(
                "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
                " VALUES (?, ?, 1, 0, 0, 0)",
                (str(ULID()), name),
            )
        return name

    assert new_voice() == "unknown-1"
    rename(conn, "unknown-1", "Carol")
    assert new_voice() == "unknown-2"  # not unknown-1 again: old events named that voice
    delete(conn, tmp_path / "audio", "unknown-2", False)
    assert new_voice() == "unknown-3"
    names = [row["name"] for row in conn.execute("SELECT name FROM speakers ORDER BY name")]
    assert names == ["Carol", "unknown-3"]


def test_enrolling_with_an_unreadable_clip_enrols_nothing(
    env: dict[str, str], speaker_models: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "clip2.wav"
    bad.write_bytes(b"RIFF" + bytes(60))
    good = [TEST_DATA / "ls_3080_0000.flac", TEST_DATA / "ls_3080_0003.flac"]
    result = cli("speakers", "enroll", "Alice", str(good[0]), str(bad), str(good[1]), env=env)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "nothing enrolled" in lines[0]
    assert json.loads(cli("speakers", "list", "--json", env=env).stdout) == []


@pytest.mark.parametrize("command", ["enroll", "test"])
def test_an_enrolment_clip_that_cannot_be_a_file_is_one_line(
    env: dict[str, str], speaker_models: Path, tmp_path: Path, command: str
) -> None:
    """`speakers enroll/test NAME FILE`: ~name of no user was a traceback (pathlib's
    RuntimeError), and a symbolic link loop "no such file or recording"."""
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    good = str(TEST_DATA / "ls_3080_0000.flac")
    assert cli("speakers", "enroll", "Alice", good, env=env).returncode == 0
    for clip, said in (
        ("~nosuchuser/a.wav", "~nosuchuser/a.wav: no home directory for ~nosuchuser"),
        (str(loop), f"{loop}: is a symbolic link loop"),
    ):
        result = cli("speakers", command, "Alice", clip, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [f"Error: {said}"], result.stderr


def test_models_list_shows_each_files_checksum(env: dict[str, str]) -> None:
    """The README's "model files and their checksums": the manifest's sha256 of every file."""
    text = cli("models", "list", env=env)
    listed = json.loads(cli("models", "list", "--json", env=env).stdout)
    assert text.returncode == 0, text.stderr
    for spec in manifest().values():
        (row,) = [r for r in listed if r["name"] == spec.name]
        assert row["files"] == spec.files
        for file_name, sha256 in spec.files.items():
            assert f"sha256 {sha256}  {file_name}" in text.stdout
    assert sum(len(s.files) for s in manifest().values()) >= 5


def test_the_same_clip_twice_is_enrolled_once(
    env: dict[str, str], speaker_models: Path, tmp_path: Path
) -> None:
    # Twice the same clip (a path and the same path again, as a shell glob can give) stored
    # two identical embeddings: the person's mean leaned on that clip, and "consistency"
    # compared it with itself.
    clip = TEST_DATA / "ls_3080_0000.flac"
    again = tmp_path / "link.flac"
    again.symlink_to(clip)
    result = cli("speakers", "enroll", "Alice", str(clip), str(clip), str(again), env=env)
    assert result.returncode == 0, result.stderr
    (alice,) = json.loads(cli("speakers", "list", "--json", env=env).stdout)
    assert alice["embeddings"] == 1, alice


@needs_root  # the tmpfs is mounted in a private mount namespace
def test_an_export_onto_a_full_disk_names_the_file_and_leaves_no_truncated_copy(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by exporting onto a full tmpfs: the error named the recording's own audio file
    in the data directory as where it could not export to, and an empty <id>.flac was left
    in --out, looking like the export."""
    assert cli("analyze", str(TEST_DATA / "ls_103_0000.flac"), env=env).returncode == 0
    (rec_id,) = [r[0] for r in sqlite3.connect(_db(env)).execute("SELECT id FROM recordings")]
    full = tmp_path / "full"
    full.mkdir()
    mount = f"mount -t tmpfs -o size=16k tmpfs {shlex.quote(str(full))}"
    out = full / "out"
    export = shlex.join(
        [sys.executable, "-m", "meraudiod", "recordings", "export", rec_id, "--out", str(out)]
    )
    listing = shlex.join(["ls", "-A", str(out)])
    result = _with_mount(env, mount, f"{export}; echo rc=$?; {listing}")
    assert "rc=1" in result.stdout and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (
        f"Error: cannot export to {out / rec_id}.flac: No space left on device"
        " (--out must be a directory you can write to)"
    )
    assert result.stdout.split("rc=1")[1].split() == []  # nothing half-written left in --out


@needs_root  # the bind mount is made in a private mount namespace
def test_reading_a_database_on_a_read_only_file_system_says_why_it_cannot_be_opened(
    env: dict[str, str],
) -> None:
    """The data directory read-only (a card the kernel remounted so; or, for another user
    than the daemon's, a directory it may not write): `recordings list`, which only reads,
    said `cannot open database ...: unable to open database file` and no more. SQLite keeps
    the log's index beside the database even to read it: that is said now."""
    assert cli("analyze", str(TEST_DATA / "ls_103_0000.flac"), env=env).returncode == 0
    data = shlex.quote(env["MERAUDIOD_STORAGE__DATA_DIR"])
    mount = f"mount --bind {data} {data} && mount -o remount,bind,ro {data}"
    listing = shlex.join([sys.executable, "-m", "meraudiod", "recordings", "list"])
    result = _with_mount(env, mount, f"{listing}; echo rc=$?")
    assert "rc=1" in result.stdout, result.stdout
    data_dir = env["MERAUDIOD_STORAGE__DATA_DIR"]
    assert result.stderr.strip() == (
        f"Error: cannot open database {data_dir}/meraudiod.db: unable to open database file"
        f" ({data_dir} is on a read-only file system; SQLite keeps the database's log there,"
        " also to read it)"
    ), result.stderr


def _with_mount(env: dict[str, str], mount: str, then: str) -> subprocess.CompletedProcess[str]:
    """`then` (which ends saying `rc=$?`) after `mount`, both in a private mount namespace;
    the test is skipped where no mount can be made."""
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{mount} && {then}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "rc=" not in result.stdout:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")
    return result


def _db(env: dict[str, str]) -> Path:
    return Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"


@needs_root  # the models directory belongs to another user
def test_a_models_directory_this_user_may_not_read_is_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Found by running the CLI as a user who may not enter storage.models_dir (it was
    another user's home): `models verify`, `speakers test` and `speakers enroll` ended in a
    PermissionError traceback."""
    models_dir = tmp_path / "models"
    models_dir.mkdir(mode=0o700)
    os.chown(models_dir, 65534, 65534)
    clip = str(TEST_DATA / "ls_103_0000.flac")
    user_env = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(models_dir)}
    for args in (["models", "verify"], ["speakers", "test", "Bob", clip]):
        result = cli(*args, env=user_env, as_user=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert f"cannot read {models_dir}/" in line, line
        assert f"Permission denied (storage.models_dir {models_dir})" in line, line


def test_a_name_with_spaces_around_it_is_the_same_person(
    env: dict[str, str], speaker_models: Path
) -> None:
    # " Alice" (pasted, or quoted with a space) was a second person beside "Alice".
    first, second = (str(TEST_DATA / f"ls_3080_000{i}.flac") for i in (0, 3))
    assert cli("speakers", "enroll", "Alice", first, env=env).returncode == 0
    result = cli("speakers", "enroll", " Alice ", second, env=env)
    assert result.returncode == 0, result.stderr
    (alice,) = json.loads(cli("speakers", "list", "--json", env=env).stdout)
    assert alice["name"] == "Alice" and alice["embeddings"] == 2, alice
    assert cli("speakers", "rename", "Alice ", "  Bob", env=env).returncode == 0
    assert [p["name"] for p in json.loads(cli("speakers", "list", "--json", env=env).stdout)] == [
        "Bob"
    ]
    # A new line in a name would forge a line of the log or of `speakers list`.
    result = cli("speakers", "rename", "Bob", "Bob\nCarol", env=env)
    assert result.returncode == 1 and "control characters" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_name_typed_decomposed_is_the_same_person(
    env: dict[str, str], speaker_models: Path
) -> None:
    """A Mac types "ü" as u and a combining diaeresis: "Sonja Mu\u0308ller" was a second
    person beside "Sonja Müller", shown alike, and `recordings list --speaker` with one
    form did not find the other (found by a new-user helper). Names are stored composed."""
    clip = str(TEST_DATA / "ls_3080_0000.flac")
    composed, decomposed = "Sonja M\u00fcller", "Sonja Mu\u0308ller"
    assert cli("speakers", "enroll", composed, clip, env=env).returncode == 0
    assert cli("speakers", "enroll", "Carol", clip, env=env).returncode == 0
    taken = cli("speakers", "rename", "Carol", decomposed, env=env)
    assert taken.returncode == 1 and len(taken.stderr.strip().splitlines()) == 1, taken.stderr
    listed = cli("recordings", "list", "--speaker", decomposed, env=env)
    assert listed.returncode == 0, listed.stderr
    # Its own name again is no mistake (it suggested merging the person into themselves).
    same = cli("speakers", "rename", composed, decomposed, env=env)
    assert same.returncode == 0 and "merge" not in same.stderr, same.stderr
    assert cli("speakers", "rename", "Carol", "Zo\u0308e", env=env).returncode == 0
    names = sorted(p["name"] for p in json.loads(cli("speakers", "list", "--json", env=env).stdout))
    assert names == [composed, "Z\u00f6e"], names


def test_a_name_an_older_version_stored_decomposed_is_found_composed(
    env: dict[str, str], speaker_models: Path
) -> None:
    """A name stored decomposed before names were composed (a reviewer): typed composed it
    was not found, and its enrolment made the second "Müller" again."""
    db = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"
    open_db(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
            " VALUES ('01M8XE4ESQ6NNXH16808V7K5MJ', 'Mu\u0308ller', 0, 0, 0, 0)"
        )
    clip = str(TEST_DATA / "ls_3080_0000.flac")
    assert cli("speakers", "enroll", "M\u00fcller", clip, env=env).returncode == 0
    (row,) = json.loads(cli("speakers", "list", "--json", env=env).stdout)
    assert row["embeddings"] == 1, row
    assert cli("recordings", "list", "--speaker", "M\u00fcller", env=env).returncode == 0


def test_a_name_with_invisible_or_reversing_characters_is_refused(
    env: dict[str, str], speaker_models: Path
) -> None:
    # Only control characters were refused: "Alice" with a zero-width space pasted after it
    # was a second person who looks the same everywhere, a right-to-left override made
    # "\u202eecilA" show as "Alice" on the review page, and a line separator (U+2028) broke
    # a name across lines.
    clip = str(TEST_DATA / "ls_3080_0000.flac")
    assert cli("speakers", "enroll", "Alice", clip, env=env).returncode == 0
    for name in ("Alice\u200b", "\u202eecilA", "Bob\u2028Carol", "\ufeffAlice"):
        result = cli("speakers", "enroll", name, clip, env=env)
        assert result.returncode == 1, (name, result.stderr)
        assert "invisible" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        result = cli("speakers", "rename", "Alice", name, env=env)
        assert result.returncode == 1 and "invisible" in result.stderr, (name, result.stderr)
    names = [p["name"] for p in json.loads(cli("speakers", "list", "--json", env=env).stdout)]
    assert names == ["Alice"], names
    # what scripts need stays a name: joiners inside an emoji or a Persian name
    for name in ("\U0001f469\u200d\U0001f52c", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0645"):
        assert cli("speakers", "rename", names[0], name, env=env).returncode == 0, name
        names = [name]


def test_admin_commands_speak_of_their_own_options(env: dict[str, str]) -> None:
    """Found by following the README: a recording named twice (in either case) was deleted
    and then reported missing, exit 1; purge's errors named the MQTT arguments
    (older_than_days, start/end) instead of the options typed; a bare `reprocess` queued
    nothing and exited 0."""
    assert cli("analyze", str(SHORT), env=env).returncode == 0
    (rec_id,) = (row["id"] for row in db_rows(env, "SELECT id FROM recordings"))
    reprocess = cli("reprocess", env=env)
    assert reprocess.returncode == 2, reprocess.stdout
    assert "needs recording ids (ID...) or --failed" in reprocess.stderr
    for args, says in (
        ((), "purge needs --older-than DAYS, --start and --end, or --speaker"),
        (("--older-than", "0"), "Invalid value for '--older-than': 0.0 is not in the range x>0"),
        (("--start", "2h"), "a time range needs both --start and --end (--end may be 'now')"),
        (("--end", "now"), "a time range needs both --start and --end (--end may be 'now')"),
    ):
        result = cli("purge", "--dry-run", *args, env=env)
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
    # It said `invalid arguments: limit: Input should be greater than or equal to 1`.
    listed = cli("recordings", "list", "--limit", "0", env=env)
    assert listed.returncode == 2, listed.stderr
    assert "Invalid value for '--limit': 0 is not in the range 1<=x<=1000" in listed.stderr
    deleted = cli("recordings", "delete", rec_id, rec_id.lower(), env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == "deleted 1 recording"
    # Which ids did not exist is said (it said `1 of them did not exist`), in the order given.
    missing = cli("recordings", "delete", rec_id, "01ZZZZZZZZZZZZZZZZZZZZZZZZ", env=env)
    assert missing.returncode == 1, missing.stderr
    assert (
        missing.stderr.strip() == f"Error: no such recording: {rec_id}, 01ZZZZZZZZZZZZZZZZZZZZZZZZ"
    )


def test_a_download_that_fails_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    """`models install base.en` without the network printed huggingface_hub's warning about
    an argument faster-whisper passes, and the hub's error over two lines."""
    port = free_port()  # a loopback port nothing listens on: refused at once
    offline = {
        **env,
        "MERAUDIOD_STORAGE__MODELS_DIR": str(tmp_path / "models"),
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
    }
    result = cli("models", "install", "base.en", env=offline)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: base.en: download failed ("), lines
    assert lines[0].endswith("); install it from a path"), lines
    assert not (tmp_path / "models" / "base.en").exists()


def test_a_name_with_spaces_around_it_finds_the_person_everywhere(
    env: dict[str, str], speaker_models: Path
) -> None:
    # Found following the README (" Alice" is Alice): enroll and rename took it, but
    # `speakers test` said "named Alice (not  Alice)", `recordings list --speaker` listed
    # nothing and `purge --speaker` said there was no such speaker.
    clips = [str(TEST_DATA / f"ls_3080_000{i}.flac") for i in (0, 1, 3)]
    assert cli("speakers", "enroll", "Alice", *clips, env=env).returncode == 0
    heard = str(TEST_DATA / "ls_3080_0004.flac")
    on = {**env, "MERAUDIOD_SPEAKERS__ENABLED": "true"}
    assert cli("analyze", heard, env=on).returncode == 0
    tested = cli("speakers", "test", " Alice", heard, env=env)
    assert tested.returncode == 0 and "named Alice (ok)" in tested.stdout, tested.stdout
    for name in ("Alice", " Alice "):
        listed = cli("recordings", "list", "--speaker", name, "--json", env=env)
        assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1, (name, listed)
        purged = cli("purge", "--speaker", name, "--dry-run", env=env)
        assert purged.stdout.strip() == "would delete 1 recording and 1 audio file", purged


def test_installing_a_file_that_is_no_model_names_that_file(
    env: dict[str, str], tmp_path: Path
) -> None:
    # It named the temporary copy (.../ecapa-voxceleb.part/ecapa-voxceleb.onnx) and advised
    # `models install --default`, which does not install this model from a file.
    notes = tmp_path / "notes.onnx"
    notes.write_text("not a model\n")
    models_dir = tmp_path / "models"
    result = cli(
        "models",
        "install",
        "ecapa-voxceleb",
        "--from",
        str(notes),
        env={**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(models_dir)},
    )
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == (
        f"Error: ecapa-voxceleb: {notes} does not match the manifest's sha256 (it does not"
        " load as an ONNX model: INVALID_PROTOBUF : Protobuf parsing failed.)"
    )
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_enrolled_and_deleted_events_name_the_profile(
    env: dict[str, str], speaker_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found following the README's MQTT section: `enrolled` and `deleted` (the command table,
    # whichever surface ran it) came with speaker_id null, though the profile has one, and
    # with the name as typed (" Alice ") rather than the person's.
    from meraudiod.command_context import CommandContext
    from meraudiod.commands import execute
    from meraudiod.config import load_settings
    from meraudiod.messages import unpack_payload

    monkeypatch.setenv("MERAUDIOD_MQTT__ENABLED", "true")  # no broker: the events wait, stored
    settings = load_settings()
    conn = open_db(settings.storage.db_path)
    try:
        context = CommandContext(conn, settings, admin=True, readable_files=None)
        clip = str(TEST_DATA / "ls_3080_0000.flac")
        execute(context, "speakers/enroll", {"name": " Alice ", "recording_ids": [clip]})
        (alice,) = execute(context, "speakers/list", {})
        execute(context, "speakers/delete", {"name": "Alice "})
        rows = conn.execute("SELECT payload FROM outbox WHERE topic='event/speaker'").fetchall()
    finally:
        conn.close()
    events = [unpack_payload(row[0]) for row in rows]
    assert [(e["event_type"], e["speaker_id"], e["name"]) for e in events] == [
        ("enrolled", alice["id"], "Alice"),
        ("deleted", alice["id"], "Alice"),
    ]


def test_status_of_a_stopped_daemon_gives_no_heartbeat_age(env: dict[str, str]) -> None:
    # Found walking the README: a daemon stopped cleanly leaves its heartbeat with `at` 0, and
    # `status --json` then said "heartbeat_age_s": 1796116324.6 (56 years) for a daemon that
    # stopped seconds ago.
    done = cli("run", "--source", f"file:{SHORT}", env=env)
    assert done.returncode == 0, done.stderr
    stopped = json.loads(cli("status", "--json", env=env).stdout)
    assert stopped["running"] is False and stopped["heartbeat_age_s"] is None, stopped


def test_status_of_a_copy_of_a_running_daemon_s_data_directory(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`cp -a` of the data directory while the daemon runs copies its fresh heartbeat: status
    on the copy said `daemon running (pid ...)`, of a daemon that runs on the original
    (found by fault injection). The heartbeat names its data directory; a copy's is not
    this one's."""
    from meraudiod.config import load_settings
    from meraudiod.status import write_heartbeat

    settings = load_settings()
    open_db(settings.storage.db_path).close()
    original = tmp_path / "original"
    write_heartbeat(settings, {"pid": os.getpid(), "at": time.time(), "data_dir": str(original)})
    copied = json.loads(cli("status", "--json", env=env).stdout)
    assert copied["running"] is False, copied
    assert "daemon           not running\n" in cli("status", env=env).stdout
    data_dir = str(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).resolve())
    write_heartbeat(settings, {"pid": os.getpid(), "at": time.time(), "data_dir": data_dir})
    assert json.loads(cli("status", "--json", env=env).stdout)["running"] is True


def test_status_of_a_daemon_that_holds_its_data_dir_but_writes_no_heartbeat(
    env: dict[str, str],
) -> None:
    """A daemon whose heartbeat cannot be written (its data directory's disk full, with no
    run_dir) or is stale (a wedged process) still holds the data directory's lock. Before,
    `status` said `not running`, and an admin would start another; now it names the process
    that holds the directory, and says whether it is starting (no heartbeat of its own yet:
    said `not answering ... never written` while a daemon loaded its models), stopping, or
    not answering. Here this test holds it, through the daemon's own lock."""
    from meraudiod.checks import hold_data_dir
    from meraudiod.config import load_settings
    from meraudiod.status import write_heartbeat

    settings = load_settings()
    open_db(settings.storage.db_path).close()  # what the daemon makes first
    data_dir = env["MERAUDIOD_STORAGE__DATA_DIR"]
    heartbeat = Path(data_dir) / "heartbeat.json"
    write_heartbeat(settings, {"pid": 1, "at": 0.0})  # the last daemon's, stopped
    fd = hold_data_dir(settings)
    assert fd is not None
    try:
        starting = cli("status", env=env).stdout
        assert (
            f"daemon           starting: pid {os.getpid()} holds {data_dir}, no heartbeat"
            f" ({heartbeat}) yet; if this lasts, see its log\n"
        ) in starting, starting
        write_heartbeat(settings, {"pid": os.getpid(), "at": time.time() - 60})
        stale = json.loads(cli("status", "--json", env=env).stdout)
        assert stale["running"] is False and stale["data_dir_held_by"] == os.getpid()
        assert stale["data_dir_holder_state"] == "not answering"
        said = cli("status", env=env).stdout
        assert re.search(r"not answering: .*was last written 6\d s ago; see its log\n", said)
        write_heartbeat(settings, {"pid": os.getpid(), "at": 0.0})  # its own, stopping
        stopping = cli("status", env=env).stdout
        assert f"daemon           stopping: pid {os.getpid()} holds {data_dir}\n" in stopping
    finally:
        os.close(fd)
    gone = cli("status", env=env)
    assert "daemon           not running\n" in gone.stdout, gone.stdout
    assert json.loads(cli("status", "--json", env=env).stdout)["data_dir_held_by"] is None


def test_looking_who_holds_the_data_dir_never_keeps_a_daemon_from_starting(
    settings: Settings,
) -> None:
    """`status` looked who held the data directory by taking its lock (a shared one) for a
    moment: a daemon starting at that moment found it taken and refused to start, `another
    meraudiod (pid N) runs`, with the pid of the daemon before it (544 times in 2000 in a
    loop). Now a start tries the lock again for a second before it refuses."""
    from meraudiod.checks import data_dir_holder, hold_data_dir

    settings.storage.data_dir.mkdir(parents=True)
    stop = threading.Event()

    def look() -> None:
        while not stop.is_set():
            data_dir_holder(settings)

    looker = threading.Thread(target=look, name="status-looker")
    looker.start()
    try:
        for _ in range(500):
            fd = hold_data_dir(settings)  # MayPassError when it found the lock taken
            assert fd is not None
            assert data_dir_holder(settings) == os.getpid()
            os.close(fd)
    finally:
        stop.set()
        looker.join()
    assert data_dir_holder(settings) is None


def test_a_renamed_speaker_is_shown_by_the_name_stored(env: dict[str, str]) -> None:
    # Found walking the README: `speakers rename Carol " Dave "` stores Dave (a name loses the
    # spaces around it) but said `Carol is now  Dave `, and MQTT's and HTTP's reply named
    # " Dave " too.
    from meraudiod.command_context import CommandContext
    from meraudiod.commands import execute
    from meraudiod.config import load_settings

    settings = load_settings()
    conn = open_db(settings.storage.db_path)
    try:
        with Transaction(conn):
            for name in ("Carol", "Erin"):
                conn.execute(
                    "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
                    " VALUES (?, ?, 0, 0, 0, 0)",
                    (str(ULID()), name),
                )
        context = CommandContext(conn, settings, admin=True, readable_files=None)
        reply = execute(context, "speakers/rename", {"name": " Erin", "new_name": " Frank "})
    finally:
        conn.close()
    assert reply == {"name": "Frank"}
    renamed = cli("speakers", "rename", "Carol ", " Dave ", env=env)
    assert renamed.returncode == 0, renamed.stderr
    assert renamed.stdout == "Carol is now Dave\n"
    names = [p["name"] for p in json.loads(cli("speakers", "list", "--json", env=env).stdout)]
    assert sorted(names) == ["Dave", "Frank"]


def test_an_enrolment_names_the_person_as_stored(env: dict[str, str], speaker_models: Path) -> None:
    # Found walking the README: `speakers enroll " Eve " clip` stored Eve but said ` Eve : 1
    # embeddings added`.
    enrolled = cli("speakers", "enroll", " Eve ", str(TEST_DATA / "ls_3080_0000.flac"), env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    assert enrolled.stdout.splitlines()[-1] == "Eve: 1 embedding added", enrolled.stdout


def test_mp3_files_bring_no_decoder_chatter(env: dict[str, str], tmp_path: Path) -> None:
    # Found walking the README (`analyze` prints "its output and warnings only"): a cut MP3
    # and a text file named .mp3 gave libmpg123's own lines on stderr ("Warning: Xing stream
    # size off by more than 1%, ...", "Note: Illegal Audio-MPEG-Header ..."), written when
    # libsndfile was asked about files only FFmpeg reads here.
    speech, rate = soundfile.read(SHORT, dtype="float32")
    whole = tmp_path / "whole.mp3"
    soundfile.write(whole, speech, rate, format="MP3", subtype="MPEG_LAYER_III")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    notes = tmp_path / "notes.mp3"
    notes.write_bytes(b"this is not audio at all" * 100)
    result = cli("analyze", str(whole), str(cut), str(notes), env=env)
    assert result.returncode == 1 and "young man" in result.stdout.lower(), result.stdout
    assert result.stderr.splitlines() == [  # the cut one is said (it was not: exit 0)
        f"error: audio file {cut} gave 1.4 s of the 3.0 s its header announces: cut or"
        " damaged (what could be decoded was used)",
        f"error: cannot open audio file {notes}: Invalid data found when processing input",
    ], result.stderr


def test_reprocess_of_a_recording_whose_audio_file_is_gone_queues_nothing(
    env: dict[str, str],
) -> None:
    # Found walking the README ("an id with no recording (or no audio) is an error naming
    # it, and nothing is queued"): with its audio file gone (deleted by hand, a failing card)
    # the recording was queued, and the daemon then failed it: a transcript that was `done`
    # became `failed` for good.
    assert cli("analyze", str(SHORT), env=env).returncode == 0
    (row,) = db_rows(env, "SELECT id, audio_path FROM recordings")
    stored_audio(env, row["audio_path"]).unlink()
    result = cli("reprocess", row["id"], env=env)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"Error: recording {row['id']} has no audio"), result.stderr
    assert "is missing" in result.stderr, result.stderr
    assert [r["state"] for r in db_rows(env, "SELECT state FROM jobs")] == ["done"]
    listed = json.loads(cli("recordings", "list", "--json", env=env).stdout)
    assert [r["state"] for r in listed] == ["done"]


def test_a_rename_to_a_name_taken_names_the_cli_merge_command(env: dict[str, str]) -> None:
    # The name-taken hint is the surface's own (over HTTP and MQTT their merge, in
    # test_http_commands.py); on the command line, the command to type, names quoted.
    conn = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    for i, name in enumerate(("Ann Lee", "Ben")):
        conn.execute(
            "INSERT INTO speakers (id, name, provisional, opt_out, created_at, updated_at)"
            " VALUES (?, ?, 0, 0, 0, 0)",
            (f"S{i}", name),
        )
    conn.close()
    result = cli("speakers", "rename", "Ann Lee", "Ben", env=env)
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines() == [
        "Error: 'Ben' exists already: to make them one voice,"
        " run `meraudiod speakers merge 'Ann Lee' Ben`"
    ], result.stderr


def test_a_file_name_that_is_not_utf8_is_shown_with_escapes(
    env: dict[str, str], tmp_path: Path
) -> None:
    # Found walking the README ("shown with the odd bytes as escapes"): `analyze --json` wrote
    # the name's raw Latin-1 byte into its JSON (not UTF-8: a consumer's decoder fails on the
    # line), and a missing file's error said "K\udcfcche.wav", Python's escape, not "\xfc".
    latin1 = os.fsdecode(b"K\xfcche.wav")
    shutil.copy(SHORT, tmp_path / latin1)
    result = subprocess.run(
        [sys.executable, "-m", "meraudiod", "analyze", "--json", str(tmp_path / latin1)],
        env=env,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.decode("utf-8").splitlines()  # valid UTF-8
    assert json.loads(line)["file"] == f"{tmp_path}/K\\xfcche.wav"
    missing = os.fsdecode(b"/nowhere/K\xfcche.wav")
    for args in (("analyze", missing), ("run", "--source", f"file:{missing}")):
        said = cli(*args, env=env)
        assert said.returncode == 1, said.stderr
        assert "/nowhere/K\\xfcche.wav: audio file not found" in said.stderr, said.stderr


def test_a_file_name_cannot_break_or_reorder_a_line(env: dict[str, str], tmp_path: Path) -> None:
    # Found by fault injection: a file name's line feed, line separator or bidi override
    # ("\u202e" shows the rest of the line backwards) went as they were into analyze's output,
    # the recording's source and the log ("from file:..."): a line of the name's choosing.
    name = "K\u202eche\nFAKE ERROR\u2028\x85.wav"
    shown = f"{tmp_path}/K\\u202eche\\nFAKE ERROR\\u2028\\x85.wav"
    shutil.copy(SHORT, tmp_path / name)
    said = cli("analyze", str(tmp_path / name), env={**env, "MERAUDIOD_LOGGING__LEVEL": "INFO"})
    assert said.returncode == 0, said.stderr
    assert said.stdout.startswith(shown + " ("), said.stdout
    for text in (said.stdout, said.stderr):
        assert not any(c in text for c in "\u202e\u2028\x85"), repr(text)
        assert not any(line.startswith("FAKE") for line in text.split("\n")), text
    sources = {row["source"] for row in db_rows(env, "SELECT source FROM recordings")}
    assert sources == {f"file:{shown}"}, sources


def test_a_refused_admin_command_does_not_say_it_changes_data_when_it_reads(
    env: dict[str, str],
) -> None:
    # Found walking the README's MQTT table: config/get (admin: it shows the configuration)
    # was refused with "config/get changes or deletes data", which it does not.
    from meraudiod.command_context import CommandContext
    from meraudiod.command_errors import Forbidden
    from meraudiod.commands import execute
    from meraudiod.config import load_settings

    settings = load_settings()
    conn = open_db(settings.storage.db_path)
    try:
        context = CommandContext(conn, settings, admin=False, readable_files=None)
        with pytest.raises(Forbidden) as refused:
            execute(context, "config/get", {})
    finally:
        conn.close()
    assert str(refused.value) == "config/get is an admin command: set mqtt.allow_admin_commands"


def test_a_microphone_that_never_opened_is_not_said_to_have_stopped(env: dict[str, str]) -> None:
    # Found walking the README: with no microphone at start, every retry logged "no audio
    # from mic:...; reopening it" (as if one had delivered and stopped) before the retry's
    # own "cannot open microphone ...; retrying in N s".
    env = {
        **env,
        "MERAUDIOD_AUDIO__DEVICE": "no-such-device-xyz",
        "MERAUDIOD_LOGGING__LEVEL": "DEBUG",  # the retries are DEBUG lines
    }
    proc = run_daemon(env, source="mic")
    try:
        wait_running(env, proc)
        time.sleep(4)  # retries after 1 s and 2 s
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    said = err.decode()
    assert said.count("cannot open microphone no-such-device-xyz") >= 2, said
    assert "no audio from" not in said, said


def test_a_purge_range_that_ends_before_it_starts_is_refused(env: dict[str, str]) -> None:
    # Found walking the README's purge: `--start 2026-12-01 --end 2026-11-01` (the ends
    # swapped) said "would delete 0 recordings and 0 audio files", and with --yes it would
    # have "deleted" nothing and exited 0: the mistake went unseen.
    open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db").close()
    result = cli("purge", "--start", "2026-12-01", "--end", "2026-11-01", "--dry-run", env=env)
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == (
        "Error: the time range ends (2026-11-01) before it starts (2026-12-01)"
    ), result.stderr


def test_enrolment_without_the_speaker_model_does_not_say_speakers_are_enabled(
    env: dict[str, str], models_dir: Path, tmp_path: Path
) -> None:
    # Found walking the README ("Enrolment works either way"): `speakers enroll` with speakers
    # off and the speaker model not installed said "speakers/diarization are enabled but a
    # model is missing", which they were not.
    defaults = tmp_path / "models"  # the session's may hold the speaker models by now
    defaults.mkdir()
    for name in ("silero-vad-v6", "tiny.en"):
        (defaults / name).symlink_to(models_dir / name)
    env = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(defaults)}
    result = cli("speakers", "enroll", "Alice", str(SHORT), env=env)
    assert result.returncode == 1, result.stdout
    (line,) = result.stderr.splitlines()
    assert "enabled" not in line and "model ecapa-voxceleb is not installed" in line, line


def test_the_speaker_list_over_mqtt_and_http_has_the_consistency_the_cli_shows(
    env: dict[str, str], speaker_models: Path
) -> None:
    # Found walking the README: `speakers list` shows each person's consistency, but the same
    # list from the command table (MQTT speakers/list, HTTP /api/v1/persistent-speakers) had
    # "consistency": null for everyone.
    from meraudiod.command_context import CommandContext
    from meraudiod.commands import execute
    from meraudiod.config import load_settings

    clips = [str(TEST_DATA / f"ls_3080_000{i}.flac") for i in (0, 1)]
    assert cli("speakers", "enroll", "Alice", *clips, env=env).returncode == 0
    (shown,) = json.loads(cli("speakers", "list", "--json", env=env).stdout)
    assert shown["consistency"] is not None
    settings = load_settings()
    conn = open_db(settings.storage.db_path)
    try:
        context = CommandContext(conn, settings, admin=False, readable_files=None)
        (listed,) = execute(context, "speakers/list", {})
    finally:
        conn.close()
    assert listed == shown


def test_models_list_keeps_its_columns(env: dict[str, str]) -> None:
    # Found walking the README: "pyannote-segmentation-3.0" is longer than the name column
    # was wide, so its role, state and description stood apart from every other row's.
    text = cli("models", "list", env=env).stdout
    rows = [line for line in text.splitlines() if not line.startswith("    ")]
    assert len(rows) == len(manifest())
    starts = {
        line.index(" " + spec.role + " ")
        for spec in manifest().values()
        for line in rows
        if line[2:].startswith(spec.name + " ")
    }
    assert len(starts) == 1, text


def test_mqtt_test_with_mqtt_off_says_so(env: dict[str, str]) -> None:
    # Found walking the README: with MQTT off (the default) `mqtt test` tried localhost:1883
    # and failed at `tcp` without a word that the daemon would not connect anyway.
    port = free_port()
    result = cli("mqtt", "test", env={**env, "MERAUDIOD_MQTT__PORT": str(port)})
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines()[0] == (
        "note: mqtt.enabled is false: the daemon does not connect; testing the configured"
        f" broker (localhost:{port}) all the same"
    ), result.stderr


@contextmanager
def _quiet_room_daemon(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon running on stdin fed silence, as a quiet room's; its stdin closed at the end
    (its end: it stops)."""
    proc = run_daemon(env, stderr=subprocess.DEVNULL)
    feeder = SilenceFeeder(proc).start()
    try:
        wait_running(env, proc)
        yield proc
    finally:
        feeder.stop()
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def test_status_says_reload_refused_while_the_file_is_broken(env: dict[str, str]) -> None:
    # Found walking the README ("`status` says `reload refused` and why, until a reload
    # succeeds"): `meraudiod status` read the same broken file and said only "Error: invalid
    # configuration ...", so whether the daemon still ran, and on what, went unsaid.
    config = Path(env["MERAUDIOD_CONFIG"])
    with _quiet_room_daemon(env) as proc:
        config.write_text("[recorder]\nhangover_ms = 1e9\n")  # a typo for 1e3
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in cli("status", env=env).stdout, 60, "the refusal")
        shown = cli("status", env=env)
        data = json.loads(cli("status", "--json", env=env).stdout)
    assert shown.returncode == 1, shown.stderr
    assert shown.stdout.splitlines()[0].split()[:2] == ["daemon", "running"], shown.stdout
    assert shown.stderr.startswith(f"Error: invalid configuration ({config}): recorder.hangover")
    assert data["running"] is True and "recorder.hangover_ms" in data["reload_error"]


def test_status_finds_the_daemon_of_a_file_that_is_no_toml_by_its_storage_section(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A file that does not parse at all (a key given twice) left `status` with the file's
    error alone: no daemon line, though the README says the storage section finds it
    (found by fault injection). That section is now read by itself."""
    config = Path(env["MERAUDIOD_CONFIG"])
    storage = f'[storage]\ndata_dir = "{tmp_path / "room"}"\n'  # the file's, not the env's
    config.write_text(storage)
    own = {k: v for k, v in env.items() if k != "MERAUDIOD_STORAGE__DATA_DIR"}
    room = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "room")}
    with _quiet_room_daemon(room):
        config.write_text(storage + '[asr]\nmodel = "a"\nmodel = "b"\n')
        shown = cli("status", env=own)
    assert shown.returncode == 1, shown.stderr
    assert shown.stdout.splitlines()[0].split()[:2] == ["daemon", "running"], shown.stdout
    assert shown.stderr.startswith(f"Error: cannot read config file {config}: "), shown.stderr


def test_status_of_a_config_that_is_no_file_says_so(env: dict[str, str], tmp_path: Path) -> None:
    """Reading the storage section of a broken file by itself must not read what is no file
    (a reviewer: /dev/zero ran out of memory, a FIFO hung)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for config in ("/dev/zero", str(fifo)):
        said = cli("status", "--config", config, env=env, timeout_s=30)
        assert said.returncode == 1, said.stderr
        assert said.stderr.strip() == f"Error: config file is not a regular file: {config}"


def test_status_of_a_heartbeat_with_fields_missing_is_no_traceback(env: dict[str, str]) -> None:
    """A heartbeat without the uptime (another version's, a hand-made one) of a live process
    ended `status` in a traceback (`unsupported format string passed to NoneType`)."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    open_db(data_dir / "meraudiod.db").close()
    beat = {"pid": os.getpid(), "at": time.time(), "listening": True}
    (data_dir / "heartbeat.json").write_text(json.dumps(beat))
    shown = cli("status", env=env)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert shown.stdout.startswith(f"daemon           running (pid {os.getpid()})"), shown.stdout


def test_clips_of_different_people_enrolled_as_one_are_warned_about(
    env: dict[str, str], speaker_models: Path
) -> None:
    """Two readers' clips enrolled as one person in one call: each clip was unlike the
    others, so none was singled out and all were stored without a word (found by a new user;
    only `speakers list` then flagged the person). Now each clip is warned about."""
    clips = [str(TEST_DATA / name) for name in ("ls_3080_0000.flac", "ls_2609_0000.flac")]
    result = cli("speakers", "enroll", "Mixed", *clips, env=env)
    assert result.returncode == 0, result.stderr
    said = "warning: unlike the other clips of Mixed, as each of them is: are they all Mixed's?"
    assert result.stdout.count(said) == 2, result.stdout


def test_a_later_clip_unlike_the_earlier_ones_is_warned_about(
    env: dict[str, str], speaker_models: Path
) -> None:
    # Found walking the README (enrolment "warns ... when a clip does not sound like the
    # person's other clips, earlier ones included"): a machine voice added in a second call
    # to two clips of a reader was stored without a word, though `speakers list` then flagged
    # "one clip unlike the others": with the new clip in their mean, the earlier clips were
    # judged odd too, and "all apart" singled out nobody.
    reader = [str(TEST_DATA / f"ls_3080_000{i}.flac") for i in (0, 1)]
    assert cli("speakers", "enroll", "Alice", *reader, env=env).returncode == 0
    other = str(TEST_DATA / "ls_2609_0000.flac")
    result = cli("speakers", "enroll", "Alice", other, env=env)
    assert result.returncode == 0, result.stderr
    assert "warning: does not sound like the other clips of Alice" in result.stdout, result.stdout
