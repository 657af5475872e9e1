"""A full disk under the daemon's data directory: a real tmpfs mounted in a mount namespace
of the daemon's own (unshare), filled and freed from outside through /proc/<pid>/root."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from meraudiod.audio import decode_file
from tests.broker import Broker, Subscriber, free_port
from tests.conftest import DEMO, TEST_DATA, SilenceFeeder, cli, needs_root, status_json, wait_for
from tests.mqtt_daemon import BASE, mqtt_env
from tests.test_locked_database import STOP_S, WORKER_PAUSED_ON_ITS_JOB, Output, paused

_READY_S = 180.0
SHORT = TEST_DATA / "ls_103_0000.flac"  # one utterance
# The demo's first three utterances (s16le), to 21.4 s: between the third's end and the
# fourth's start. Where three recordings show what five did, for less transcription.
FIRST_THREE = decode_file(DEMO)[: round(21.4 * 16000)].astype("<i2").tobytes()


class FullDiskDaemon:
    """`meraudiod run --source stdin` with HTTP on, its data directory on a tmpfs of `size`
    that only it sees (the directory `key` of [storage] names), after the shell commands
    `before` (ending in `;`); `disk` is that tmpfs as seen from here."""

    def __init__(
        self,
        env: dict[str, str],
        tmp_path: Path,
        size: str,
        key: str = "DATA_DIR",
        before: str = "",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.point = tmp_path / "disk"
        self.point.mkdir()
        self.log_path = tmp_path / "daemon.log"
        command = shlex.join([sys.executable, "-m", "meraudiod", "run", "--source", "stdin"])
        mount = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(self.point))}"
        self.env = {
            **env,
            f"MERAUDIOD_STORAGE__{key}": str(self.point / "meraudiod"),
            "MERAUDIOD_HTTP__ENABLED": "true",
            "MERAUDIOD_HTTP__PORT": str(self.port),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "sh", "-c", f"{mount} && {before} exec {command}"],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.feeder = SilenceFeeder(self.proc, block_s=0.1).start()
        self.disk = Path(f"/proc/{self.proc.pid}/root") / str(self.point).lstrip("/")

    def wait_ready(self) -> None:
        def ready() -> bool:  # models loaded (a full disk is not ready, but is started)
            assert self.proc.poll() is None, self.log()
            try:
                return bool(self.readiness()["models"]["ok"])
            except httpx.TransportError:
                return False

        wait_for(ready, _READY_S, "the daemon ready")

    def readiness(self) -> dict[str, dict[str, Any]]:
        """/health/ready's checks."""
        checks: dict[str, dict[str, Any]] = httpx.get(f"{self.url}/health/ready").json()["checks"]
        return checks

    def unsaved(self) -> tuple[int, int]:
        """The recordings not in the database yet, by /metrics and by /api/v1/status."""
        metrics = httpx.get(f"{self.url}/metrics").text
        line = re.search(r"^meraudiod_unsaved_recordings (\S+)$", metrics, re.MULTILINE)
        assert line is not None, metrics
        said = httpx.get(f"{self.url}/api/v1/status").json()["unsaved"]["recordings"]
        return round(float(line[1])), int(said)

    def running(self) -> bool:
        """Whether /api/v1/status says the daemon (which answers it) is running."""
        return bool(httpx.get(f"{self.url}/api/v1/status").json()["running"])

    def fill(self) -> Path:
        """Fill the tmpfs to its last byte; the filler file, to remove to free it."""
        filler = self.disk / "filler"
        with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
            while out.write(bytes(4096)):
                pass
        return filler

    def say(self, speech: bytes) -> None:
        """Speech on the microphone (stdin) between the silence."""
        self.feeder.stop()
        assert self.proc.stdin is not None
        self.proc.stdin.write(speech + bytes(32000))
        self.proc.stdin.flush()
        self.feeder = SilenceFeeder(self.proc, block_s=0.1).start()

    def grow(self, size: str) -> None:
        """Make the tmpfs bigger: space freed."""
        mount = ["mount", "-o", f"remount,size={size}", str(self.point)]
        subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", *mount], check=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rows(self, sql: str) -> list[dict[str, object]]:
        """Rows of the daemon's database, read inside its mount namespace (SQLite resolves
        the /proc/<pid>/root link, which would take it out of the namespace)."""
        script = (
            "import json, sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
            " c.row_factory = sqlite3.Row;"
            " print(json.dumps([dict(r) for r in c.execute(sys.argv[2])]))"
        )
        database = Path(self.env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"
        nsenter = ["nsenter", "-t", str(self.proc.pid), "-m", sys.executable, "-c", script]
        out = subprocess.run([*nsenter, str(database), sql], capture_output=True, check=True)
        rows: list[dict[str, object]] = json.loads(out.stdout)
        return rows

    def stop(self) -> int:
        self.feeder.stop()
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(60)


@contextmanager
def full_disk_daemon(
    env: dict[str, str], tmp_path: Path, size: str, key: str = "DATA_DIR"
) -> Iterator[FullDiskDaemon]:
    daemon = FullDiskDaemon(env, tmp_path, size, key)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


def _files(folder: Path) -> list[str]:
    """The files stored (the heartbeat, rewritten every 5 s, left out)."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and "heartbeat" not in p.name)


@needs_root
@pytest.mark.parametrize("fits", [True, False], ids=["upload-fits", "nothing-fits"])
def test_an_upload_onto_a_full_disk_is_a_clear_error_and_stores_nothing(
    env: dict[str, str], tmp_path: Path, fits: bool
) -> None:
    """The upload itself fits and its recording's audio does not (600 KB for a 431 KB file
    twice), or nothing fits at all. Before: 500 'internal error: OSError' and a traceback in
    the log. Now: 507 naming the full disk, nothing half-stored, the daemon alive; once space
    is freed the same upload is stored."""
    env = {**env, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "0"}
    with full_disk_daemon(env, tmp_path, "600k") as daemon:
        if not fits:
            daemon.fill()
        data = daemon.disk / "meraudiod"
        before = _files(data)
        with httpx.Client(base_url=daemon.url, timeout=60) as client:
            for path in ("/api/v1/analysis/upload", "/api/v1/vad/upload_recording"):
                answer = client.post(path, files={"file": ("demo.flac", DEMO.read_bytes())})
                assert answer.status_code == 507, answer.text
                error = answer.json()["error"]
                assert error["code"] == "insufficient_storage"
                assert error["message"].startswith("disk full: No space left on device"), error
            checks = daemon.readiness()  # alive and well but for the disk
            assert all(c["ok"] for name, c in checks.items() if name != "disk"), checks
            assert _files(data) == before  # no part file, no audio, no temp file left
            assert client.get("/api/v1/recordings").json()["recordings"] == []
            daemon.grow("8m")  # space freed
            answer = client.post(
                "/api/v1/analysis/upload", files={"file": ("demo.flac", DEMO.read_bytes())}
            )
            assert answer.status_code == 202, answer.text
        assert "Traceback" not in daemon.log()
        assert daemon.stop() == 0, daemon.log()


def _recordings(
    daemon: FullDiskDaemon,
    count: int,
    audio_dropped: bool = False,
    timeout_s: float = _READY_S,
    audio_written: bool = False,
) -> list[dict[str, object]]:
    """All recordings, oldest first, once there are `count` and all are transcribed (and,
    audio_dropped, none names an audio file: keep_audio = false drops it in a transaction
    of its own after the transcript's; audio_written, every one names one)."""
    rows: list[dict[str, object]] = []
    sql = "SELECT id, status, audio_path, text FROM recordings ORDER BY id"  # ULIDs: as saved

    def transcribed() -> bool:
        nonlocal rows
        rows = daemon.rows(sql)
        dropped = not audio_dropped or all(r["audio_path"] is None for r in rows)
        written = not audio_written or all(r["audio_path"] is not None for r in rows)
        done = all(r["status"] == "done" for r in rows)
        return len(rows) == count and done and dropped and written

    wait_for(transcribed, timeout_s, f"{count} recordings transcribed")
    return rows


@needs_root
@pytest.mark.parametrize("keep_audio", [True, False], ids=["keep-audio", "no-audio-kept"])
def test_audio_is_written_again_once_the_full_disk_has_room(
    env: dict[str, str], tmp_path: Path, keep_audio: bool
) -> None:
    """The guard off and tmp_audio_dir's tmpfs full: the demo's first three recordings wait
    in memory and are transcribed; the disk grown, their audio is written to it (before, it was
    dropped once transcribed: they kept their transcripts, not their audio), and so is the
    next three's; with keep_audio = false none is, the daemon alive throughout. One of the
    three deleted while its audio is held never gets a file."""
    env = {
        **env,
        "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "0",
        "MERAUDIOD_RETENTION__KEEP_AUDIO": str(keep_audio).lower(),
        "MERAUDIOD_HTTP__ALLOW_ADMIN_COMMANDS": "true",
    }
    speech = FIRST_THREE
    with full_disk_daemon(env, tmp_path, "600k", "TMP_AUDIO_DIR") as daemon:
        daemon.fill()
        daemon.say(speech)
        full = _recordings(daemon, 3)
        assert all(r["audio_path"] is None and r["text"] for r in full)
        deleted = str(full[0]["id"])
        gone = httpx.delete(f"{daemon.url}/api/v1/recordings/{deleted}", timeout=30)
        assert gone.status_code == 200, gone.text
        daemon.grow("16m")
        if keep_audio:  # within 5 s, in the same form as any recording's
            held = _recordings(daemon, 2, audio_written=True)
            for row in held:
                answer = httpx.get(f"{daemon.url}/api/v1/recordings/{row['id']}/audio")
                assert answer.status_code == 200 and answer.content[:4] == b"fLaC", answer
        daemon.say(speech)
        freed = _recordings(daemon, 5, audio_dropped=not keep_audio)[2:]
        audio = sorted((daemon.disk / "meraudiod").rglob("*.flac"))
        assert all((r["audio_path"] is not None) is keep_audio and r["text"] for r in freed)
        assert len(audio) == (5 if keep_audio else 0)
        assert not [path for path in audio if deleted in path.name]
        assert _files(daemon.disk / "meraudiod") == sorted(path.name for path in audio)
        log = daemon.log()  # said once, not once per recording; and once more when written
        assert log.count("cannot write audio to") == 1, log
        assert log.count("(No space left on device): recordings' audio kept in memory") == 1
        assert log.count("its audio held in memory written to") == (2 if keep_audio else 0)
        assert log.count("can write audio to") == 1, log
        assert daemon.stop() == 0, daemon.log()


@needs_root
def test_audio_held_below_the_free_disk_guard_is_written_once_above_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Below retention.min_free_disk_mb the demo's first three recordings are kept in memory
    and transcribed; the disk grown past the threshold, their audio is written to it (before,
    it was dropped once transcribed)."""
    env = {**env, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "12"}
    speech = FIRST_THREE
    with full_disk_daemon(env, tmp_path, "8m") as daemon:
        daemon.say(speech)
        assert all(r["audio_path"] is None and r["text"] for r in _recordings(daemon, 3))
        assert list((daemon.disk / "meraudiod").rglob("*.flac")) == []
        daemon.grow("32m")
        rows = _recordings(daemon, 3, audio_written=True, timeout_s=30)
        audio = sorted(p.name for p in (daemon.disk / "meraudiod").rglob("*.flac"))
        assert audio == sorted(f"{r['id']}.flac" for r in rows)
        # each said once its row names the file: the last one's line may come after the rows
        wait_for(
            lambda: daemon.log().count("its audio held in memory written to") >= 3,
            30,
            "the three written said",
        )
        assert daemon.log().count("its audio held in memory written to") == 3
        assert daemon.stop() == 0, daemon.log()


@needs_root
def test_audio_held_when_the_daemon_stops_is_kept_over_the_stop(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The audio directory on a full tmpfs, transcription off: the demo's five recordings are
    held in memory when the daemon is stopped (SIGTERM). Before, their audio was lost, said in
    one line. Now it is kept in the runtime directory (another file system: a tmpfs under
    systemd) until the next start; a recording deleted meanwhile takes its kept audio with
    it; the next start, with room, writes the other four to their files, as any recording's,
    and leaves nothing in the runtime directory."""
    runtime = tmp_path / "run"
    env = {
        **env,
        "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "0",
        "MERAUDIOD_ASR__ENABLED": "false",
        "RUNTIME_DIRECTORY": str(runtime),
    }
    speech = decode_file(DEMO).astype("<i2").tobytes()
    first = tmp_path / "first"
    first.mkdir()
    daemon = FullDiskDaemon(env, first, "600k", "TMP_AUDIO_DIR")
    try:
        daemon.wait_ready()
        daemon.fill()
        daemon.say(speech)
        held = [str(r["id"]) for r in _recordings(daemon, 5)]
        wait_for(lambda: "recordings' audio kept in memory" in daemon.log(), 30, "audio held")
        wait_for(
            lambda: status_json(env)["unsaved"] == {"recordings": 0, "audio": 5, "kept_in": None},
            15,
            "status to count the audio held (the heartbeat is rewritten every 5 s)",
        )
        said = cli("status", env=env).stdout
        assert "unsaved          audio of 5 recordings waiting in memory to be saved\n" in said
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert status_json(env)["unsaved"] == {"recordings": 0, "audio": 5, "kept_in": str(runtime)}
    kept_in = runtime / "held-audio"
    assert f"audio of 5 recordings held in memory kept in {kept_in}" in daemon.log()
    assert "lost on stopping" not in daemon.log()
    assert sorted(p.name for p in kept_in.iterdir()) == sorted(f"{i}.flac" for i in held)
    kept = {i: decode_file(kept_in / f"{i}.flac") for i in held}
    assert all(samples.size > 16000 // 2 for samples in kept.values())

    deleted = cli("recordings", "delete", held[0], env=env)  # while it is down
    assert deleted.returncode == 0, deleted.stderr
    assert not (kept_in / f"{held[0]}.flac").exists()
    said = cli("status", env=env).stdout
    assert f"unsaved          audio of 4 recordings kept in {runtime} until the next start" in said

    second = tmp_path / "second"
    second.mkdir()
    with full_disk_daemon(env, second, "16m", "TMP_AUDIO_DIR") as again:
        rows = _recordings(again, 4, audio_written=True, timeout_s=30)
        audio_dir = again.disk / "meraudiod"
        assert _files(audio_dir) == sorted(f"{i}.flac" for i in held[1:])
        for row in rows:
            written = decode_file(audio_dir / str(row["audio_path"]))
            assert np.array_equal(written, kept[str(row["id"])])
        assert list(kept_in.iterdir()) == []
        assert "audio of 4 recordings kept over the last stop taken back" in again.log()
        wait_for(
            lambda: again.log().count("its audio held in memory written to") >= 4,
            30,
            "the four written said",
        )
        assert again.log().count("its audio held in memory written to") == 4
        assert again.stop() == 0, again.log()
    database = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    assert database.execute("SELECT COUNT(*) FROM kv WHERE key GLOB 'held_audio*'").fetchone() == (
        0,
    )


@needs_root
def test_a_heartbeat_the_full_disk_refuses_is_said_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A quiet room, the data directory's disk full to the last byte: the heartbeat cannot be
    rewritten. Before, an error line every 5 s for as long as it lasted (into a journal on
    the same SD card); now one, and one more when it is written again."""
    with full_disk_daemon(env, tmp_path, "600k") as daemon:
        heartbeat = daemon.disk / "meraudiod" / "heartbeat.json"
        daemon.fill()
        wait_for(lambda: "cannot write the heartbeat" in daemon.log(), 30, "a failed heartbeat")
        time.sleep(6)  # one more heartbeat at least (one every 5 s)
        assert daemon.log().count("cannot write the heartbeat") == 1, daemon.log()
        daemon.grow("8m")
        written = heartbeat.stat().st_mtime
        wait_for(lambda: heartbeat.stat().st_mtime > written, 30, "the heartbeat written again")
        wait_for(lambda: "heartbeat written again" in daemon.log(), 30, "it said so")
        assert daemon.stop() == 0, daemon.log()


@needs_root
def test_an_upload_below_the_free_disk_guard_is_refused(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Below retention.min_free_disk_mb no audio is written (the microphone's waits in
    memory). Before, an upload was stored all the same, and could fill the disk to its last
    byte, where the database cannot be written and the daemon stops."""
    env = {**env, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "100"}
    with (
        full_disk_daemon(env, tmp_path, "8m") as daemon,
        httpx.Client(base_url=daemon.url, timeout=60) as client,
    ):
        answer = client.post(
            "/api/v1/analysis/upload", files={"file": ("demo.flac", DEMO.read_bytes())}
        )
        assert answer.status_code == 507, answer.text
        message = answer.json()["error"]["message"]
        assert message.startswith("disk almost full: 8 MB free in "), message
        assert message.endswith("under retention.min_free_disk_mb (100); nothing was stored")
        assert client.get("/api/v1/recordings").json()["recordings"] == []
        assert _files(daemon.disk / "meraudiod" / "uploads") == []


@needs_root
@pytest.mark.parametrize("size", ["200k", "300k"])
def test_analyze_says_when_the_database_fills_while_it_transcribes(
    env: dict[str, str], tmp_path: Path, size: str
) -> None:
    """A disk of a few hundred KB: the recordings are saved (their audio kept in memory),
    then the database fills as their transcripts are stored. Before, analyze printed the
    recordings without their text and exited 0 (the worker died: 300 KB), or a traceback
    (waiting for the jobs: 200 KB)."""
    point = tmp_path / "disk"
    point.mkdir()
    command = shlex.join([sys.executable, "-m", "meraudiod", "analyze", str(DEMO)])
    mount = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(point))}"
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{mount} && exec {command}"],
        env={
            **env,
            "MERAUDIOD_STORAGE__DATA_DIR": str(point / "meraudiod"),
            "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "0",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    error = done.stderr.splitlines()[-1]
    assert re.fullmatch(r"error: .*: OperationalError: database or disk is full", error), error


@needs_root
def test_a_database_whose_disk_is_full_loses_no_recording(
    env: dict[str, str], tmp_path: Path, broker: Broker
) -> None:
    """The data directory's disk full to the last byte (another program filled it).

    The demo's five utterances spoken: the database cannot take their rows, nor the outbox
    the disk's error event. Before, the listener stage died on the first one (SQLITE_FULL),
    the daemon exited 1, and every start after it failed until space was freed, losing what
    was said. Now they wait in memory, the daemon stays up and says so once; with room again
    all five are stored, transcribed and published.

    Then the disk fills while the worker transcribes five more: before, the worker stage
    died (the daemon exited 1); now their jobs wait, untried (no attempt counted, which
    would fail a recording for good after three), and are done once there is room."""
    speech = decode_file(DEMO).astype("<i2").tobytes()
    sub = Subscriber(broker.port, [f"{BASE}/event/#"])
    with full_disk_daemon(mqtt_env(env, broker), tmp_path, "600k") as daemon:
        daemon.fill()
        daemon.say(speech)
        wait_for(lambda: "recordings wait in memory" in daemon.log(), 120, "the full database")
        sub.wait_for(lambda: sub.on("/event/error"), 30)  # sent as it is, not from the outbox
        # What waits is counted where an admin looks, though the heartbeat file, on the same
        # full disk, cannot be written: before, both read that file and said nothing waited.
        wait_for(lambda: daemon.unsaved() == (5, 5), 30, "metrics and status to count them")
        time.sleep(6)  # one more try to save them, at least
        assert daemon.proc.poll() is None, daemon.log()
        assert daemon.unsaved() == (5, 5) and daemon.running()
        daemon.grow("16m")
        assert all(r["text"] for r in _recordings(daemon, 5))
        sub.wait_for(lambda: len(sub.on("/event/transcript")) == 5, 60)

        daemon.say(speech)
        # The five saved (the listener is done: only the worker meets the disk), not all of
        # them transcribed. (Waiting for the 6th transcript missed it when the listener was
        # slower than the worker's first transcript: say() returned after the 7th.)
        saved, transcribed = "meraudiod.recordings: recording ", "meraudiod.worker: transcript "

        def five_more_saved() -> bool:
            log = daemon.log()
            assert log.count(transcribed) < 10, "all ten transcribed before the disk filled"
            return log.count(saved) == 10

        wait_for(five_more_saved, 120, "five more recordings saved", poll_s=0.01)
        filler = daemon.fill()
        wait_for(lambda: "transcription waits" in daemon.log(), 60, "the worker waiting")
        time.sleep(5)  # more tries
        assert daemon.proc.poll() is None, daemon.log()
        filler.unlink()
        assert all(r["text"] for r in _recordings(daemon, 10))
        assert daemon.rows("SELECT attempts FROM jobs") == [{"attempts": 0}] * 10
        sub.wait_for(lambda: len(sub.on("/event/transcript")) == 10, 60)
        log = daemon.log()
        assert log.count("recordings wait in memory") == 1, log
        assert log.count("transcription waits") == 1, log
        assert "Traceback" not in log
        assert daemon.stop() == 0, log


@needs_root
def test_transcription_goes_on_once_a_small_disk_is_freed(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A disk of 600 KB filled while the worker transcribes, then the filler deleted: a few
    hundred KB free, room enough for the transcripts. Before, the worker waited for 1 MB
    free, which this disk never has: transcription stopped for good. Now it goes on once the
    disk has more room than when its transcript was refused."""
    speech = decode_file(DEMO).astype("<i2").tobytes()
    with full_disk_daemon(env, tmp_path, "600k") as daemon:
        daemon.say(speech)
        wait_for(lambda: "meraudiod.worker: transcript" in daemon.log(), 120, "a transcript")
        filler = daemon.fill()
        wait_for(lambda: "transcription waits" in daemon.log(), 60, "the worker waiting")
        time.sleep(3)  # a look at the free space, at least
        filler.unlink()
        assert all(r["text"] for r in _recordings(daemon, 5, timeout_s=60))
        assert daemon.rows("SELECT attempts FROM jobs") == [{"attempts": 0}] * 5
        assert "Traceback" not in daemon.log()
        assert daemon.stop() == 0, daemon.log()


@needs_root
def test_a_full_database_is_said_once_and_not_again_as_it_clears(
    env: dict[str, str], tmp_path: Path, broker: Broker
) -> None:
    """The disk fills while the worker transcribes, then the listener meets it too: both say
    they cannot write the database, in the same words. Before, `status` showed that problem
    twice, and each change of the problems' joined text was another event/error, also as
    they cleared (the listener saving again left the worker's text, sent again as news).
    Now each problem is said once, and its clearing sends no error."""
    speech = decode_file(DEMO).astype("<i2").tobytes()
    sub = Subscriber(broker.port, [f"{BASE}/event/#"])
    with full_disk_daemon(mqtt_env(env, broker), tmp_path, "600k") as daemon:
        daemon.say(speech)
        wait_for(lambda: "meraudiod.worker: transcript" in daemon.log(), 120, "a transcript")
        daemon.fill()
        wait_for(lambda: "transcription waits" in daemon.log(), 60, "the worker waiting")
        daemon.say(speech[: 9 * 32000])
        wait_for(lambda: "recordings wait in memory" in daemon.log(), 60, "the listener waiting")
        cannot = f"cannot write the database {daemon.env['MERAUDIOD_STORAGE__DATA_DIR']}"

        # The heartbeat file cannot be written: /health/ready says what the daemon knows.
        def detail() -> str:
            return str(daemon.readiness()["disk"]["detail"])

        wait_for(lambda: cannot in detail(), 30, "the readiness to say it")
        time.sleep(6)  # a heartbeat more: both stages' problems are in it
        assert detail().count(cannot) == 1, detail()
        daemon.grow("16m")  # room again
        sql = "SELECT status FROM recordings"
        done = ["done"] * 6
        wait_for(lambda: [r["status"] for r in daemon.rows(sql)] == done, 120, "6 transcripts")
        wait_for(lambda: cannot not in detail(), 30, "the readiness clear again")
        time.sleep(2)  # an error sent as it cleared would have come by now
        assert daemon.stop() == 0, daemon.log()
    said = [m.json()["error"] for m in sub.on("/event/error")]
    problems = [problem for error in said for problem in error.split("; ")]
    assert problems and len(problems) == len(set(problems)), said


@needs_root
def test_the_daemon_waits_for_room_when_its_database_disk_is_full_at_start(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Started on a disk full to the last byte (say, a reboot while it was full), SQLite
    cannot even open the database. Before, the daemon exited 1 at once, and systemd started
    it again every 5 s, a line each time. Now it waits (up to 120 s, said once); given room,
    it goes on and records."""
    first = shlex.join([sys.executable, "-m", "meraudiod", "run", "--source", "stdin"])
    filler = shlex.quote(str(tmp_path / "disk" / "filler"))
    before = f"{first} < /dev/null && (dd if=/dev/zero of={filler} bs=4k 2>/dev/null;"
    daemon = FullDiskDaemon(env, tmp_path, "600k", before=before + " true) &&")
    try:
        waiting = "waiting up to 120 s for room: cannot open database"
        wait_for(lambda: waiting in daemon.log(), _READY_S, "the daemon waiting for room")
        time.sleep(5)  # two more tries, at least
        assert daemon.proc.poll() is None, daemon.log()
        assert daemon.log().count("waiting up to") == 1, daemon.log()
        (daemon.disk / "filler").unlink()
        daemon.wait_ready()
        daemon.say(FIRST_THREE)
        assert all(r["text"] for r in _recordings(daemon, 3))
        assert "Traceback" not in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


_DELETE_DELIVERED = """
import contextlib, os, sys
from pathlib import Path
from meraudiod.db import open_db
from meraudiod.messages import ErrorEvent, enqueue
from meraudiod.mqtt_client import Waker
from meraudiod.mqtt_delivery import OutboxDelivery

disk = Path(sys.argv[1])
conn = open_db(disk / "meraudiod.db")
delivery = OutboxDelivery("meraudiod/n", Waker())
with conn:  # a delete of many pages: more than the log's last page has room for
    for _ in range(200):
        event = ErrorEvent(node_id="n", area="a", error=os.urandom(500).hex())
        delivery._delivered(enqueue(conn, event))
with (disk / "filler").open("wb", buffering=0) as out, contextlib.suppress(OSError):
    while out.write(bytes(4096)):
        pass
delivery.delete_delivered(conn, force=True)  # on the way out, the disk full
print(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
(disk / "filler").unlink()
delivery.delete_delivered(conn, force=True)
print(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
"""


@needs_root
def test_delivered_events_a_full_database_cannot_delete_are_sent_again(tmp_path: Path) -> None:
    """Delivered events are deleted from the outbox in batches; even a delete needs room in
    the database's log. Before, on a disk full to the last byte, that was an exception: every
    loop of the MQTT link logged a traceback, and the daemon's stop failed (the MQTT stage
    died on its way out, exit 1). Now the rows wait for a later batch (on the way out, for
    the next start, which sends them again as after a power cut)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f"mount -t tmpfs -o size=2m tmpfs {shlex.quote(str(disk))}"
    script = shlex.join([sys.executable, "-c", _DELETE_DELIVERED, str(disk)])
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{mount} && exec {script}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "0"], done.stdout
    assert "sent again at the next start" in done.stderr, done.stderr


@needs_root
@pytest.mark.parametrize(
    ("key", "least_mb"), [("TMP_AUDIO_DIR", 0), ("DATA_DIR", 100)], ids=["full", "under-guard"]
)
def test_readiness_says_which_disk_is_full(
    env: dict[str, str], tmp_path: Path, key: str, least_mb: int
) -> None:
    """The audio directory's disk full to the last byte (the guard off), or the data
    directory's under retention.min_free_disk_mb: not ready, naming the directory and its
    free MB; ready again once there is room. Before, 200 "database writable" throughout (the
    write lock is taken on a full disk as well)."""
    env = {**env, "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": str(least_mb)}
    with full_disk_daemon(env, tmp_path, "8m", key) as daemon:
        where = daemon.point / "meraudiod"
        if least_mb == 0:
            answer = httpx.get(f"{daemon.url}/health/ready")
            assert answer.status_code == 200, answer.text
            assert f"MB free in {where}" in answer.json()["checks"]["disk"]["detail"]
            daemon.fill()
        answer = httpx.get(f"{daemon.url}/health/ready")
        assert answer.status_code == 503, answer.text
        assert answer.json()["status"] == "not_ready"
        assert answer.json()["checks"]["disk"] == {
            "ok": False,
            "detail": f"disk full: 0 MB free in {where}"
            if least_mb == 0
            else f"disk almost full: 8 MB free in {where}, under retention.min_free_disk_mb (100)",
        }
        daemon.grow("256m")
        answer = httpx.get(f"{daemon.url}/health/ready")
        assert answer.status_code == 200, answer.text
        assert daemon.stop() == 0, daemon.log()


FREE = r"""
set -u
mount --make-rprivate /
mount -t tmpfs -o size=8m tmpfs "$POINT"
MERAUDIOD_RETENTION__KEEP_AUDIO=$KEEP "$PY" -m meraudiod analyze "$DEMO" > /dev/null 2>&1
echo "analyze rc=$?"
ids=$("$PY" -m meraudiod recordings list --json | "$PY" -c \
  'import json, sys; print(" ".join(r["id"] for r in json.load(sys.stdin)))')
"$PY" -c 'import contextlib, sys
with open(sys.argv[1], "wb", buffering=0) as out, contextlib.suppress(OSError):
    while out.write(bytes(4096)): pass' "$POINT/filler"
echo "free before: $(df -B1 --output=avail "$POINT" | tail -1 | tr -d ' ')"
"$PY" -m meraudiod status --json > "$OUT/status" 2>&1; echo "status rc=$?"
if [ "$COMMAND" != delete ]; then
  "$PY" -m meraudiod purge --start 2000-01-01T00:00 --end now --yes > "$OUT/out" 2> "$OUT/err"
else
  "$PY" -m meraudiod recordings delete $ids > "$OUT/out" 2> "$OUT/err"
fi
echo "rc=$?"
echo "audio files: $(find "$POINT/m/audio" -type f | wc -l)"
"$PY" -m meraudiod recordings list --json > "$OUT/list" 2>&1; echo "list rc=$?"
rm "$POINT/filler"
"$PY" -m meraudiod recordings list --json > "$OUT/after" 2>&1; echo "after rc=$?"
"""


@needs_root
@pytest.mark.parametrize("command", ["purge", "delete", "purge-no-audio"])
def test_purge_frees_a_disk_full_to_the_last_byte(
    env: dict[str, str], tmp_path: Path, command: str
) -> None:
    """The database's disk full to the last byte, nothing holding the database open (a full
    disk stops the daemon): SQLite cannot make the shared-memory file of its log, so purge
    and recordings delete could not even open it ("disk I/O error"): the admin had to
    delete files by hand, and `status` only said that it could not open the database. Now
    they open it alone, the log's index in memory; the audio files go before the commit,
    which then has room: rows and files gone alike, and the database usable again.
    Recordings without audio free nothing first: one line says to make room, and nothing
    is deleted."""
    point = tmp_path / "disk"
    point.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        ["unshare", "--mount", "bash", "-c", FREE],
        env={
            **env,
            "MERAUDIOD_STORAGE__DATA_DIR": str(point / "m"),
            "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "0",
            "PY": sys.executable,
            "DEMO": str(DEMO),
            "POINT": str(point),
            "OUT": str(out),
            "COMMAND": command,
            "KEEP": "false" if command == "purge-no-audio" else "true",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = done.stdout.splitlines()
    assert "analyze rc=0" in lines, done.stdout + done.stderr
    assert "free before: 0" in lines, lines
    # What an admin runs first: it says the disk is full instead of failing to open.
    assert "status rc=0" in lines, (out / "status").read_text()
    status = json.loads((out / "status").read_text())
    assert status["disk_free_mb"] < 1 and not status["running"], status
    assert "audio files: 0" in lines
    if command == "purge-no-audio":
        db = point / "m" / "meraudiod.db"
        assert "rc=1" in lines
        assert (out / "err").read_text() == (
            f"Error: database {db}: database or disk is full (its disk is full, and this frees"
            f" no audio file first): make room on the disk of {db.parent}, a few MB, then run"
            " this again\n"
        )
        assert "after rc=0" in lines, (out / "after").read_text()
        assert len(json.loads((out / "after").read_text())) == 5  # nothing deleted
        return
    assert "rc=0" in lines, (out / "err").read_text()
    said = "deleted 5 recordings" + (" and 5 audio files" if command == "purge" else "")
    assert (out / "out").read_text() == said + "\n"
    assert "list rc=0" in lines, (out / "list").read_text()
    assert (out / "list").read_text().strip() == "[]"


class Card:
    """An ext4 image (without a journal, so that it can be checked and mounted again after
    an error) mounted errors=remount-ro at `point` in a mount namespace a sleeping process
    holds: it outlives the daemons that enter it (`enter`, nsenter) one after another."""

    def __init__(self, tmp_path: Path, size_mb: int = 16) -> None:
        self.image = tmp_path / "card.img"
        with self.image.open("wb") as out:
            out.truncate(size_mb * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-O", "^has_journal", str(self.image)], check=True)
        self.point = tmp_path / "card"
        self.point.mkdir()
        hold = f"{self._mount()} && echo mounted && exec sleep 600"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", hold], stdout=subprocess.PIPE
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline() == b"mounted\n"
        self.enter = ["nsenter", "-t", str(self.holder.pid), "-m"]
        self.disk = Path(f"/proc/{self.holder.pid}/root") / str(self.point).lstrip("/")

    def _mount(self) -> str:
        options = "loop,errors=remount-ro"
        return shlex.join(["mount", "-o", options, str(self.image), str(self.point)])

    def fill(self) -> None:
        """Full to its last byte (another program filled it)."""
        with (self.disk / "filler").open("wb", buffering=0) as out, contextlib.suppress(OSError):
            while out.write(bytes(4096)):
                pass

    def free(self) -> None:
        (self.disk / "filler").unlink()

    def break_(self) -> None:
        """An error the kernel meets (ext4's trigger_fs_error): read-only from now on, what
        was written before on the image (synced)."""
        os.sync()
        source = [*self.enter, "findmnt", "-no", "SOURCE", str(self.point)]
        device = subprocess.run(source, capture_output=True, text=True, check=True).stdout
        (Path("/sys/fs/ext4") / Path(device.strip()).name / "trigger_fs_error").write_text("1")

    def mend(self) -> None:
        """Unmounted, checked and mounted again, as an admin mends a card."""
        check = shlex.join(["e2fsck", "-fy", str(self.image)])
        mend = f"umount {shlex.quote(str(self.point))}; {check} >&2; {self._mount()}"
        subprocess.run([*self.enter, "sh", "-c", mend], capture_output=True, check=True)

    def rows(self, database: Path, sql: str) -> list[dict[str, object]]:
        """Rows of a database on the card, read inside its namespace."""
        script = (
            "import json, sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
            " c.row_factory = sqlite3.Row;"
            " print(json.dumps([dict(r) for r in c.execute(sys.argv[2])]))"
        )
        command = [*self.enter, sys.executable, "-c", script, str(database), sql]
        rows: list[dict[str, object]] = json.loads(
            subprocess.run(command, capture_output=True, check=True).stdout
        )
        return rows

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@needs_root
@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_a_job_whose_transcript_the_disk_refused_is_no_crash_after_a_stop(
    env: dict[str, str], tmp_path: Path, disk: str
) -> None:
    """The worker claims a job, then the database's disk fills to the last byte, or turns
    read-only (with storage.run_dir on another disk, as the installed configuration has it):
    its transcript is refused and the job held back, `running` in the database, which cannot
    be written. Before, a stop (SIGTERM) left it so, unsaid, and the next start counted a
    crash against it: three restarts during one full-disk spell failed the recording for
    good. Now the next start gives it back with no crash counted."""
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices")
    card = Card(tmp_path)
    data = card.point / "meraudiod"
    env = {
        **env,
        "PATH": f"{env.get('PATH', '')}:/usr/sbin:/sbin",
        "MERAUDIOD_STORAGE__DATA_DIR": str(data),
        "MERAUDIOD_RETENTION__MIN_FREE_DISK_MB": "1",
    }
    if disk == "read-only":
        env["MERAUDIOD_STORAGE__RUN_DIR"] = str(tmp_path / "run")
    # One utterance on a microphone (stdin) that stays open, as the service's does.
    microphone, speech = os.pipe()
    said = decode_file(SHORT).astype("<i2").tobytes() + bytes(32000)
    fcntl.fcntl(speech, fcntl.F_SETPIPE_SZ, len(said))
    os.write(speech, said)
    run = ["run", "--source", "stdin"]
    try:
        with paused(WORKER_PAUSED_ON_ITS_JOB, run, env, prefix=card.enter, stdin=microphone) as (
            proc,
            go,
        ):
            os.close(microphone)
            out = Output(proc.stderr)
            card.fill() if disk == "full" else card.break_()
            go()
            refused = "transcription waits until it can be written"
            wait_for(lambda: refused in out.text, 60, "the transcript refused")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=STOP_S) == 0, out.text
        out.join()
        card.free() if disk == "full" else card.mend()
        job = "SELECT id, state, attempts, crashes FROM jobs"
        (held,) = card.rows(data / "meraudiod.db", job)
        assert held["state"] == "running", out.text
        again = subprocess.run(
            [*card.enter, sys.executable, "-m", "meraudiod", "run", "--source", f"file:{SHORT}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert again.returncode == 0, again.stderr
        first = card.rows(data / "meraudiod.db", f"{job} WHERE id={held['id']}")
        assert first == [{**held, "state": "done", "crashes": 0}], again.stderr
    finally:
        os.close(speech)
        card.close()
