"""The worker never loses audio it holds, never retries a lost file forever, and gives up on
a recording that keeps killing the process (real SIGKILLs)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from meraudiod import jobs, models
from meraudiod import worker as worker_module
from meraudiod.asr import ServerError, Transcriber
from meraudiod.audio import decode_file, to_float32
from meraudiod.config import Settings
from meraudiod.db import Transaction, open_db
from meraudiod.deletion import delete_recordings
from meraudiod.held_audio import write_held
from meraudiod.pipeline import Pipeline
from meraudiod.recordings import MemoryAudio, RecordingStore, audio_file
from meraudiod.retention import disk_free_mb, disk_low
from meraudiod.sources import FileSource
from meraudiod.speakers import SpeakerStage
from meraudiod.worker import TranscribedRecording, Worker

from .conftest import (
    DEMO,
    TEST_DATA,
    cli,
    db_rows,
    sigkill_when,
    stored_audio,
    wait_for,
)

SPEECH = decode_file(TEST_DATA / "librivox_0880.wav")
SHORT = TEST_DATA / "ls_103_0000.flac"


def silence(env: dict[str, str]) -> Path:
    """A file with nothing to record: a run that only works on the backlog."""
    path = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).parent / "silence.wav"
    soundfile.write(path, np.zeros(16000, dtype=np.int16), 16000)
    return path


def test_audio_held_in_memory_survives_a_failed_attempt(settings: Settings) -> None:
    """Disk full: the audio is only in memory. The first attempt fails while storing; the
    retry still has the audio, which once the transcript is stored only waits to be
    written."""
    conn = open_db(settings.storage.db_path)
    memory = MemoryAudio()
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    rec = store.save(SPEECH, source="x", start_s=0.0, started_at=1000.0, memory=memory)
    assert rec is not None and rec.audio_path is None and len(memory) == 1
    asr = settings.asr
    asr.retry_delay_s = 0.0
    path = models.resolve(asr.model, settings.storage.resolved_models_dir, False)
    worker = Worker(settings, Transcriber(path, asr, asr.model), threading.Event())
    worker.memory = memory
    failures = []

    def outbox_fails_once(conn: sqlite3.Connection, result: TranscribedRecording) -> None:
        if not failures:
            failures.append(result.recording_id)
            raise sqlite3.OperationalError("disk I/O error")  # e.g. the outbox insert

    worker.on_stored.append(outbox_fails_once)
    assert worker.process_next(conn)  # fails, to be retried
    assert failures == [rec.id] and len(memory) == 1
    assert worker.process_next(conn)
    row = conn.execute("SELECT status, text FROM recordings WHERE id=?", (rec.id,)).fetchone()
    assert row["status"] == "done" and "young man" in row["text"].lower()
    # Stored: held on only to be written to its file once it can be (held_audio.py), and
    # the first to go if a new recording needs the room.
    memory.max_recordings = 1
    assert memory.room() == (True, rec.id)


def test_held_audio_written_as_the_worker_takes_it_is_read_from_its_file(
    settings: Settings,
) -> None:
    """Audio held in memory written to its file (by a listener: the audio directory writable
    again) between the worker's read of the recording's row and its look in memory:
    transcribed from the file. Before, the job failed for good, 'its audio was never
    written (disk full) and is gone'."""
    conn = open_db(settings.storage.db_path)
    listener_conn = open_db(settings.storage.db_path)

    class WrittenMeanwhile(MemoryAudio):
        writing = False

        def get(self, rec_id: str) -> Any:
            if not self.writing:  # the worker's look (write_held looks too)
                self.writing = True
                assert write_held(listener_conn, settings, self, rec_id)
            return super().get(rec_id)

    memory = WrittenMeanwhile()
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    rec = store.save(SPEECH, source="x", start_s=0.0, started_at=1000.0, memory=memory)
    assert rec is not None and rec.audio_path is None
    asr = settings.asr
    path = models.resolve(asr.model, settings.storage.resolved_models_dir, False)
    worker = Worker(settings, Transcriber(path, asr, asr.model), threading.Event())
    worker.memory = memory
    assert worker.process_next(conn)
    row = conn.execute(
        "SELECT status, text, audio_path FROM recordings WHERE id=?", (rec.id,)
    ).fetchone()
    assert row["status"] == "done" and "young man" in row["text"].lower(), dict(row)
    assert row["audio_path"] is not None and len(memory) == 0


def test_a_missing_audio_file_fails_the_job_at_once_in_one_line(env: dict[str, str]) -> None:
    conn = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    store = RecordingStore(conn, Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio", "flac")
    rec = store.save(SPEECH, source="x", start_s=0.0, started_at=1000.0)
    assert rec is not None and rec.audio_path is not None
    rec.audio_path.unlink()  # gone behind the daemon's back
    conn.close()
    result = cli("run", "--source", f"file:{silence(env)}", env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if rec.id in line]
    assert len(lines) == 1 and "missing" in lines[0], result.stderr
    report = json.loads(cli("jobs", "--json", env=env).stdout)
    (job,) = report["jobs"]
    assert job["state"] == "failed" and job["attempts"] == 1 and "missing" in job["error"]


def test_an_audio_file_the_daemon_may_not_read_is_said_to_be_so(env: dict[str, str]) -> None:
    """Found by making a pending recording's audio another user's (0600) under the daemon:
    the job failed with "LibsndfileError: Error opening <file>: System error", which does
    not say what is wrong or how to fix it."""
    conn = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    store = RecordingStore(conn, Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio", "flac")
    rec = store.save(SPEECH, source="x", start_s=0.0, started_at=1000.0)
    assert rec is not None and rec.audio_path is not None
    conn.close()
    rec.audio_path.chmod(0o000)
    run = cli(
        "run",
        "--source",
        f"file:{silence(env)}",
        env={**env, "MERAUDIOD_ASR__MAX_ATTEMPTS": "1"},
        timeout_s=180,
        as_user=True,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(cli("jobs", "--json", env=env).stdout)
    (job,) = report["jobs"]
    assert job["state"] == "failed", job
    assert f"Permission denied: '{rec.audio_path}'" in job["error"], job


def test_a_recording_deleted_while_it_is_transcribed_is_no_error(settings: Settings) -> None:
    """Found by deleting recordings whose job was running under a real daemon: each ended in
    "job N failed: IntegrityError: FOREIGN KEY constraint failed" with a traceback in the
    log and as the worker's last error. A delete meanwhile (here from another connection
    while Whisper runs) is what the admin asked for: nothing is stored, nothing failed."""
    conn = open_db(settings.storage.db_path)
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    rec = store.save(SPEECH, source="x", start_s=0.0, started_at=1000.0)
    assert rec is not None
    asr = settings.asr
    path = models.resolve(asr.model, settings.storage.resolved_models_dir, False)

    class DeletedMeanwhile(Transcriber):
        def transcribe(self, *args: Any, **kwargs: Any) -> Any:
            transcript = super().transcribe(*args, **kwargs)
            other = open_db(settings.storage.db_path)  # the admin's `recordings delete`
            assert delete_recordings(other, settings.storage.audio_dir, [rec.id]).recordings
            other.close()
            return transcript

    worker = Worker(settings, DeletedMeanwhile(path, asr, asr.model), threading.Event())
    assert worker.process_next(conn)
    assert worker.last_error is None
    assert conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


def test_reprocess_of_an_unknown_id_is_an_error_naming_it(
    env: dict[str, str], settings: Settings
) -> None:
    open_db(settings.storage.db_path).close()  # a store without that recording
    result = cli("reprocess", "01NOSUCHRECORDING000000000", env=env)
    assert result.returncode != 0
    assert "01NOSUCHRECORDING000000000" in result.stderr and "Traceback" not in result.stderr


def test_crashes_do_not_use_up_the_attempts_of_a_genuine_failure(settings: Settings) -> None:
    conn = open_db(settings.storage.db_path)
    RecordingStore(conn, settings.storage.audio_dir, "flac").save(
        SPEECH, source="x", start_s=0.0, started_at=1000.0
    )
    dead = f"{jobs.owner_id().rpartition(':')[0]}:999999999"
    notes = settings.storage.runtime_dir

    def note(job_id: int) -> None:
        jobs.note_working(notes, job_id, dead)

    for _ in range(2):  # the process died twice while working on the job
        assert jobs.claim(conn, lease_s=600, owner=dead, before_commit=note) is not None
        assert jobs.requeue_stale(conn, notes, max_crashes=3) == 1
    assert conn.execute("SELECT crashes FROM jobs").fetchone()[0] == 2
    job = jobs.claim(conn, lease_s=600)
    assert job is not None and job.attempts == 1
    with Transaction(conn):  # one genuine failure: retried, not final
        assert jobs.fail(conn, job.id, "boom", max_attempts=3, retry_delay_s=0) is False
    (row,) = jobs.backlog(conn)
    assert row["state"] == "pending" and row["attempts"] == 1


def _kill_while_running(env: dict[str, str], source: Path) -> None:
    """Start a real daemon and SIGKILL it while it transcribes a recording."""
    sigkill_when(
        env,
        ["run", "--source", f"file:{source}"],
        # this process's claim, not a stale one
        "SELECT COUNT(*) FROM jobs WHERE state='running' AND owner LIKE '%:{pid}'",
        "a job running",
    )


def test_a_recording_that_keeps_killing_the_process_is_given_up(env: dict[str, str]) -> None:
    _kill_while_running(env, SHORT)  # the recording is made, and the process dies on it
    quiet = silence(env)
    _kill_while_running(env, quiet)  # and again, and again
    _kill_while_running(env, quiet)
    result = cli("run", "--source", f"file:{quiet}", env=env)
    assert result.returncode == 0, result.stderr
    (job,) = json.loads(cli("jobs", "--json", env=env).stdout)["jobs"]
    assert job["state"] == "failed" and "died 3 times" in job["error"]
    (rec,) = db_rows(env, "SELECT status, audio_path FROM recordings")
    assert rec["status"] == "failed" and stored_audio(env, rec["audio_path"]).is_file()


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory on another filesystem (a tmpfs), as tmp_audio_dir is when installed."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    made = Path(tempfile.mkdtemp(prefix="meraudiod-test-", dir="/dev/shm"))
    yield made
    shutil.rmtree(made)  # the directory this fixture made, nothing else


def test_the_disk_guard_watches_the_disk_the_audio_is_written_to(
    settings: Settings, shm_dir: Path
) -> None:
    settings.storage.data_dir.mkdir(parents=True)
    audio_free_mb = disk_free_mb(shm_dir)
    data_free_mb = disk_free_mb(settings.storage.data_dir)
    if abs(audio_free_mb - data_free_mb) < 200:
        pytest.skip("the tmpfs and the data directory have the same free space")
    settings.storage.tmp_audio_dir = shm_dir
    settings.retention.min_free_disk_mb = round((audio_free_mb + data_free_mb) / 2)
    assert disk_low(settings) == (audio_free_mb < data_free_mb)


def test_each_saved_recording_wakes_the_worker_and_none_saved_while_it_is_busy_is_missed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker does not poll for the listener's recordings: each save wakes it. With its
    idle wait made longer than this test's patience, only the wake can find them: at real
    time it is idle when each utterance is saved; replayed fast, the later ones are saved
    while it transcribes the first."""
    monkeypatch.setattr(worker_module, "_IDLE_WAIT_S", 600.0)
    clip = tmp_path / "three.flac"  # the demo's first 20 s: three utterances, 2 s apart
    soundfile.write(clip, decode_file(DEMO)[: 20 * 16000], 16000)
    pipeline = Pipeline(settings, threading.Event())
    pipeline.open()
    pipeline.start_worker()
    conn = open_db(settings.storage.db_path)

    def done() -> int:
        return len(conn.execute("SELECT id FROM recordings WHERE status='done'").fetchall())

    try:
        for realtime, total in ((True, 3), (False, 6)):
            source = FileSource(clip, realtime=realtime)
            source.start()
            listener = pipeline.listener(source)
            assert listener.finished.wait(120), "the listener never finished the clip"
            assert listener.recordings_saved == 3, (listener.recordings_saved, listener.error)
            wait_for(lambda: done() == total, 120, f"{total} recordings transcribed")  # noqa: B023
    finally:
        pipeline.close()
        conn.close()


class _RoomAndUpload:
    """A 35 s upload and the room's speech in one store; a worker to take them."""

    def __init__(self, settings: Settings, transcriber: type[Transcriber] = Transcriber) -> None:
        self.conn = open_db(settings.storage.db_path)
        self.store = RecordingStore(self.conn, settings.storage.audio_dir, "flac")
        clips = [decode_file(TEST_DATA / f"ls_2609_000{i}.flac") for i in (0, 1, 3, 9)]
        talk = np.concatenate(clips)
        self.talk = np.tile(talk, 3)[: 35 * 16000]  # over a Whisper window
        upload = self.store.save(self.talk, "upload:talk.wav", start_s=0.0, started_at=1000.0)
        assert upload is not None
        self.upload = upload.id
        asr = settings.asr
        path = models.resolve(asr.model, settings.storage.resolved_models_dir, False)
        self.worker = Worker(settings, transcriber(path, asr, asr.model), threading.Event())

    def room_speaks(self) -> None:
        self.store.save(decode_file(SHORT), source="mic", start_s=0.0, started_at=2000.0)

    def room_speaks_as_the_upload_is_transcribed(self, also: Callable[[], Any] = list) -> None:
        """The upload then gives its job back after a Whisper window; `also` runs then too."""
        real = self.worker.transcriber.transcribe

        def transcribe(audio: np.ndarray, *args: Any, **kwargs: Any) -> Any:
            if audio.size > 30 * 16000 and len(self.jobs()) == 1:
                self.room_speaks()
                also()
            return real(audio, *args, **kwargs)

        self.worker.transcriber.transcribe = transcribe  # type: ignore[method-assign]

    def counting(self, stage: SpeakerStage, room_speaks_at: int = 0) -> list[int]:
        """The stage's segmentation windows, counted; the room speaks at the given one."""
        calls: list[int] = []
        segmentation = stage.diarizer.segmentation
        real = segmentation.probabilities

        def probabilities(audio: np.ndarray) -> np.ndarray:
            calls.append(audio.size)
            if len(calls) == room_speaks_at:
                self.room_speaks()
            return real(audio)

        segmentation.probabilities = probabilities  # type: ignore[method-assign]
        return calls

    def jobs(self) -> dict[str, sqlite3.Row]:
        rows = self.conn.execute("SELECT * FROM jobs").fetchall()
        return {row["recording_id"]: row for row in rows}

    def status(self, recording_id: str) -> str:
        query = "SELECT status FROM recordings WHERE id=?"
        return str(self.conn.execute(query, (recording_id,)).fetchone()[0])


class _RoomServerDown(Transcriber):
    """The transcription servers fail the room's recording (the short clip)."""

    def transcribe(self, audio: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        if audio.size < 10 * 16000:
            raise ServerError("wyoming server 127.0.0.1:1: connection refused")
        return super().transcribe(audio, *args, **kwargs)


def _speakers_on(settings: Settings, speaker_models: Path) -> None:
    settings.storage.models_dir = speaker_models
    settings.speakers.enabled = settings.diarization.enabled = True


@pytest.mark.parametrize("reload", [False, True])
def test_an_uploads_analysis_goes_on_after_the_rooms_speech_where_it_stopped(
    settings: Settings, speaker_models: Path, reload: bool
) -> None:
    """A long upload's speaker analysis that yielded to the room's speech goes on at its
    next claim from the window where it stopped; after a reload (other models or settings: a
    new stage) from its first. A room recording the servers failed meanwhile waits on: the
    upload taken up (not transcribed again) is no sign that they work (it was, and the room's
    job was made due again, its next failure counted against it)."""
    _speakers_on(settings, speaker_models)
    settings.asr.retry_delay_s = 600  # the room's job waits out the test, however slow
    both = _RoomAndUpload(settings, _RoomServerDown)
    worker = both.worker
    worker.speakers = SpeakerStage(settings)
    both.counting(worker.speakers, room_speaks_at=2)
    assert worker.process_next(both.conn)  # transcribed; its analysis yields after two windows
    jobs = both.jobs()
    assert jobs[both.upload]["state"] == "pending" and len(jobs) == 2, dict(jobs)
    assert worker.process_next(both.conn)  # the room's: the servers fail it
    (room,) = [row for rec, row in both.jobs().items() if rec != both.upload]
    assert room["not_before"] is not None and room["attempts"] == 0, dict(room)
    if reload:
        worker.speakers = SpeakerStage(settings)
    calls = both.counting(worker.speakers)
    assert worker.process_next(both.conn)  # the upload
    assert both.status(both.upload) == "done"
    segmented = len(calls)
    windows = len(worker.speakers.diarizer._windows(to_float32(both.talk)))
    assert windows > 2 and segmented == (windows if reload else windows - 2)
    (room,) = [row for rec, row in both.jobs().items() if rec != both.upload]
    assert room["not_before"] is not None, dict(room)  # still waiting for the servers


def test_an_upload_whose_next_try_fails_keeps_nothing_of_its_earlier_one(
    settings: Settings,
) -> None:
    """What an upload that yielded to the room had heard is kept in memory for its next
    claim; that claim failing (its audio file gone) drops it, not only its deletion."""
    both = _RoomAndUpload(settings)
    both.room_speaks_as_the_upload_is_transcribed()
    worker = both.worker
    assert worker.process_next(both.conn)  # the upload, given back after a window
    assert both.jobs()[both.upload]["state"] == "pending"
    assert worker._partial is not None
    assert worker._partial.job_id == both.jobs()[both.upload]["id"]
    assert worker.process_next(both.conn)  # the room's: what the upload had heard is kept
    assert worker._partial is not None
    (path,) = both.conn.execute("SELECT audio_path FROM recordings WHERE id=?", (both.upload,))
    audio_file(settings.storage.audio_dir, path[0]).unlink()
    assert worker.process_next(both.conn)  # the upload: its audio is lost
    assert both.status(both.upload) == "failed" and worker._partial is None


def test_a_give_back_the_locked_database_refused_is_made_once_the_lock_is_gone(
    settings: Settings,
) -> None:
    """Found by a fault injector: an upload yielding to the room's speech while another
    process (an admin's sqlite3 shell, a backup) held the write lock past the wait stayed
    `running`, its task too, until the daemon restarted. Now given back once the lock is
    gone, no attempt counted, and taken up where it left off."""
    both = _RoomAndUpload(settings)
    holder = sqlite3.connect(settings.storage.db_path, isolation_level=None)
    both.room_speaks_as_the_upload_is_transcribed(lambda: holder.execute("BEGIN IMMEDIATE"))
    both.conn.execute("PRAGMA busy_timeout=200")  # the daemon's waits 30 s
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        both.worker.process_next(both.conn)  # transcribed a window, not given back
    holder.execute("COMMIT")
    assert both.worker.process_next(both.conn)  # given back now; the room's first
    (room,) = both.conn.execute("SELECT id FROM recordings WHERE source='mic'").fetchone()
    assert both.status(room) == "done"
    job = both.jobs()[both.upload]
    assert (job["state"], job["attempts"], job["crashes"]) == ("pending", 0, 0), dict(job)
    assert both.worker._partial is not None  # what it had heard, kept
    assert both.worker.process_next(both.conn)  # the upload, taken up
    assert both.status(both.upload) == "done"


def test_a_transcript_the_locked_database_refused_is_no_failure(settings: Settings) -> None:
    """Another process held the write lock past the wait while a transcript was stored: it
    was a failure of the recording's, logged with a traceback and an attempt counted, whose
    own storing waited for the same lock and left the job `running` until a restart. Now
    the job is given back once the lock is gone, no attempt counted, and transcribed."""
    conn = open_db(settings.storage.db_path)
    rec = RecordingStore(conn, settings.storage.audio_dir, "flac").save(
        decode_file(SHORT), source="mic", start_s=0.0, started_at=1000.0
    )
    assert rec is not None
    conn.execute("PRAGMA busy_timeout=200")  # the daemon's waits 30 s
    holder = sqlite3.connect(settings.storage.db_path, isolation_level=None)
    asr = settings.asr
    path = models.resolve(asr.model, settings.storage.resolved_models_dir, False)
    worker = Worker(settings, Transcriber(path, asr, asr.model), threading.Event())
    real = worker.transcriber.transcribe

    def transcribe(*args: Any, **kwargs: Any) -> Any:
        holder.execute("BEGIN IMMEDIATE")  # an admin's sqlite3 shell, while Whisper runs
        return real(*args, **kwargs)

    worker.transcriber.transcribe = transcribe  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        worker.process_next(conn)
    holder.execute("COMMIT")
    worker.transcriber.transcribe = real  # type: ignore[method-assign]
    assert worker.process_next(conn) and worker.last_error is None
    (row,) = conn.execute("SELECT state, attempts, crashes FROM jobs").fetchall()
    assert tuple(row) == ("done", 0, 0), tuple(row)


def test_a_given_back_upload_reprocessed_meanwhile_is_transcribed_anew(
    env: dict[str, str], settings: Settings
) -> None:
    """Found by a fault injector: a `reprocess` of an upload given back to the room replaced
    its job, and the new one took up what the old one had heard (with another model since
    a reload, the transcript asked for again would have been the old model's)."""
    both = _RoomAndUpload(settings)
    both.room_speaks_as_the_upload_is_transcribed()
    assert both.worker.process_next(both.conn)  # the upload, given back after a window
    assert both.worker._partial is not None
    assert cli("reprocess", both.upload, env=env).returncode == 0
    assert both.worker.process_next(both.conn)  # the room's
    assert both.worker._partial is None  # the replaced job's, dropped
    assert both.worker.process_next(both.conn)  # the upload, transcribed from its start
    assert both.status(both.upload) == "done"
