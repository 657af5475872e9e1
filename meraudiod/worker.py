"""The worker thread: claim a job, transcribe its recording, store everything in one transaction."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import soundfile

from . import jobs
from .asr import (
    WHISPER_WINDOW_S,
    ServerError,
    SpeechToText,
    Stopped,
    Transcript,
    Unwanted,
    later,
)
from .audio import SAMPLE_RATE_HZ, Float32Array, to_float32
from .config import Settings
from .db import Transaction, cannot_write, is_busy, no_room, now, open_db, sync_log
from .deletion import forget_deleted_text, forget_recording, forget_with_audio
from .diarization import Progress
from .recordings import MemoryAudio, audio_file, forget_held
from .retention import disk_free_mb, drop_audio, room_again, writable
from .server_faults import ServerFaults
from .speakers import SegmentSpeaker, SpeakerStage, plain_segments
from .stage import StageThread
from .vad import VadTraces

_LOGGER = logging.getLogger(__name__)


class AudioLostError(Exception):
    """A recording's audio is not on disk and not in memory."""


# Idle, the worker sleeps until wake() (a job saved or queued by this process), or this long:
# how soon it sees a job queued by another process (`meraudiod reprocess`), a retry come due
# or an ASR server come back. A shorter poll costs wakeups on a device that is mostly idle.
_IDLE_WAIT_S: Final = 2.0
# How often the daemon's worker takes over the jobs of one-off processes that died (an
# `analyze` killed half way), so their recordings are transcribed without a restart.
_ADOPT_EVERY_S = 30.0


@dataclass
class _Progress:
    """How far a job got with its recording: what was heard of it (to `heard_s`), the ASR
    seconds spent on that, and its speaker analysis. An upload that yields to the room's
    recordings keeps it (in memory: a restart starts it again), and the job's next claim goes
    on from there (not another job of the recording: a `reprocess` transcribes it anew)."""

    job_id: int
    heard: Transcript | None = None
    heard_s: float = 0.0
    asr_s: float = 0.0
    diarization: Progress = field(default_factory=Progress)
    # Whose `diarization` it is (a reload makes another stage; the old one's models go).
    analysed_by: weakref.ref[SpeakerStage] | None = None


@dataclass(frozen=True)
class TranscribedRecording:
    """What the worker tells listeners about a finished recording."""

    recording_id: str
    source: str
    start_s: float
    end_s: float
    text: str
    language: str
    suspect: bool
    rtf: float
    latency_ms: float
    # Every segment as stored (split where the speaker changes) with who said it; the speaker
    # fields are None when speakers/diarization are off or nobody could be told.
    segments: tuple[SegmentSpeaker, ...] = ()
    # A "do not keep" voice was heard: the recording is deleted right after this transaction.
    opt_out: bool = False
    # Transcribed again on request (`reprocess`), not something just said.
    reprocessed: bool = False
    job_id: int = 0  # the job that made it: its events' ids come from it (job_event_id)


class Worker(StageThread):
    """Drains the jobs table in order on a named thread; one bad recording never stops it."""

    thread_name = "worker"

    def __init__(
        self,
        settings: Settings,
        transcriber: SpeechToText,
        stop: threading.Event,
        on_transcribed: Callable[[TranscribedRecording], None] | None = None,
    ) -> None:
        self.settings = settings
        self.transcriber = transcriber
        self.stop_event = stop
        self.on_transcribed = on_transcribed
        # Called inside the transaction that stores a transcript, so whatever they write
        # (events in the outbox) is committed together with it or not at all.
        self.on_stored: list[Callable[[sqlite3.Connection, TranscribedRecording], None]] = []
        # Called once it is committed: what other connections can now read (the state).
        self.on_committed: list[Callable[[TranscribedRecording], None]] = []
        self.speakers: SpeakerStage | None = None  # diarization + identification, when enabled
        self.memory: MemoryAudio | None = None  # audio held while the disk is full
        self.vad_traces: VadTraces | None = None  # the listeners' VAD, for the Wyoming client
        self.job_origin: str | None = None  # whose jobs it works on (None: the daemon's)
        self._wake = threading.Event()
        self.busy = False
        self.last_error: str | None = None
        # The database's disk was full at the last try, with this much free (MB); None: not
        # full. The next job is not transcribed (only to be thrown away) until it has more.
        self._free_when_refused_mb: float | None = None
        # The database could not be written at the last try (its disk full, or read-only),
        # and why: said once, shown as degraded.
        self.storage_problem: str | None = None
        self._given_back: int | None = None  # a claimed job the storage kept from storing
        self._note_refused = False  # a job's note (jobs.note_working) could not be written
        self.server_faults = ServerFaults()  # whose fault a failed server request is
        # An upload that yielded to the room's recordings, taken up at its next claim.
        self._partial: _Progress | None = None

    def wake(self) -> None:
        """A new job is waiting: look now rather than at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        # Once stopping, a wait for another process's write lock ends within seconds.
        conn = open_db(self.settings.storage.db_path, stop=self.stop_event)
        data_dir = self.settings.storage.data_dir
        next_adopt = time.monotonic() + _ADOPT_EVERY_S  # start-up recovery has just run
        try:
            while not self.stop_event.is_set():
                self._wake.clear()
                refused_mb = self._free_when_refused_mb
                if refused_mb is not None and not room_again(data_dir, refused_mb):
                    self._wake.wait(_IDLE_WAIT_S)
                    continue
                try:
                    if self.job_origin is None and time.monotonic() >= next_adopt:
                        # Not leases: a long job of this very process must not be taken back.
                        next_adopt = time.monotonic() + _ADOPT_EVERY_S
                        jobs.requeue_stale(
                            conn,
                            self.settings.storage.runtime_dir,
                            self.settings.asr.max_attempts,
                            expired_leases=False,
                        )
                    found = self.process_next(conn)
                    # Its claim (a write) or its transcript stored: writable again, even with
                    # no job to do (a read-only database refused the claim of none as well).
                    if self.storage_problem is not None:
                        _LOGGER.info("database written again: transcription goes on")
                        self.storage_problem, self._free_when_refused_mb = None, None
                except sqlite3.OperationalError as exc:
                    if is_busy(exc):
                        if not self.stop_event.is_set():
                            _LOGGER.warning("database busy (%s): the worker tries again", exc)
                    elif cannot_write(exc) and self.job_origin is None:
                        # The daemon waits for room or a read-write file system; a one-off
                        # process (analyze) stops: nobody mends it while it waits.
                        if self.storage_problem is None:
                            self.storage_problem = (
                                f"cannot write the database {self.settings.storage.db_path} ({exc})"
                            )
                            _LOGGER.error(
                                "%s: transcription waits until it can be written",
                                self.storage_problem,
                            )
                        # Only room is worth waiting for before a transcription: a read-only
                        # database refuses the job's claim, before any is done.
                        self._free_when_refused_mb = (
                            disk_free_mb(data_dir) if no_room(exc) else None
                        )
                    else:
                        raise
                    found = False
                if not found:
                    self._wake.wait(_IDLE_WAIT_S)
        finally:
            conn.close()

    def process_next(self, conn: sqlite3.Connection) -> bool:
        """Claim and process one job; False when there was none."""
        if self._given_back is not None:  # the storage kept it from being given back or stored
            jobs.release(conn, self._given_back)
            self._given_back = None
        if not self.transcriber.ready():  # every ASR server is down: the jobs wait pending
            return False
        job = jobs.claim(
            conn,
            self.settings.asr.job_lease_s,
            origin=self.job_origin,
            before_commit=self._note_working,
        )
        if job is None:
            return False
        self.busy = True
        try:
            result = self._process(conn, job)
        except sqlite3.OperationalError as exc:
            # Another process's write lock kept its transcript, give-back or failure from
            # being stored: given back once the lock is gone, no attempt counted (it stayed
            # `running`, its task too, until a restart); on stopping, _left_running said it.
            if is_busy(exc) and not self.stop_event.is_set():
                self._given_back = job.id
            raise
        finally:
            self.busy = False
            self._done_working(job)
        if result is not None:
            for hook in self.on_committed:
                hook(result)
            if self.on_transcribed is not None:
                self.on_transcribed(result)
        return True

    def _process(self, conn: sqlite3.Connection, job: jobs.Job) -> TranscribedRecording | None:
        """A claimed job: its transcript stored (returned), or the job given back, deferred
        or failed, or its recording deleted meanwhile (None)."""
        try:
            return self._transcribe(conn, job)
        except Stopped as exc:  # a long upload: stopping, or the room's recordings first
            try:
                jobs.release(conn, job.id)
            except sqlite3.OperationalError as busy:
                if not self._left_running(job, busy, f"{exc}, not given back"):
                    raise
                return None
            _LOGGER.info("job %d (recording %s) given back: %s", job.id, job.recording_id, exc)
            return None
        except AudioLostError as exc:  # no retry can bring it back: one line, failed for good
            self.last_error = f"audio lost: {exc}"
            _LOGGER.error("job %d (recording %s) failed: %s", job.id, job.recording_id, exc)
            try:
                with Transaction(conn):
                    jobs.fail_for_good(conn, job.id, self.last_error)
                    conn.execute(
                        "UPDATE recordings SET status='failed' WHERE id=?", (job.recording_id,)
                    )
            except sqlite3.OperationalError as busy:
                if not self._left_running(job, busy, "its failure not stored on stopping"):
                    raise
                return None
            self._forget_held(job.recording_id)
            return None
        except Exception as exc:
            if isinstance(exc, sqlite3.OperationalError) and is_busy(exc):
                if self._left_running(job, exc, "transcript not stored on stopping"):
                    return None
                raise  # another process's lock, not the recording's fault: no attempt counted
            # Its transcript refused for want of room, or by a file system that refuses writes
            # (read-only): given back, no attempt counted. An I/O error on a writable one (a
            # failing card) counts, as any error: given back, it would be transcribed again
            # and again.
            data_dir = self.settings.storage.data_dir
            if cannot_write(exc) and (no_room(exc) or not writable(data_dir)):
                self._given_back = job.id
                raise
            self.last_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ServerError) and self.job_origin is None:
                delay_s = self.settings.asr.retry_delay_s
                wait_s = self.server_faults.wait_s(job.recording_id, str(exc), delay_s)
                if wait_s is not None:  # the servers' fault until they transcribe again
                    _LOGGER.warning(
                        "job %d (recording %s) waits %.0f s, no attempt counted (no server"
                        " has transcribed since it failed): %s",
                        job.id,
                        job.recording_id,
                        wait_s,
                        self.last_error,
                    )
                    try:
                        with Transaction(conn):
                            jobs.defer(conn, job.id, self.last_error, wait_s)
                    except sqlite3.OperationalError as busy:
                        if not self._left_running(job, busy, "its wait not stored on stopping"):
                            raise
                    return None
            _LOGGER.error(
                "job %d (recording %s) failed: %s%s",
                job.id,
                job.recording_id,
                self.last_error,
                "" if isinstance(exc, ServerError) else "\n" + traceback.format_exc(),
            )
            try:
                with Transaction(conn):
                    final = jobs.fail(
                        conn,
                        job.id,
                        self.last_error,
                        self.settings.asr.max_attempts,
                        self.settings.asr.retry_delay_s,
                    )
                    if final:
                        conn.execute(
                            "UPDATE recordings SET status='failed' WHERE id=?",
                            (job.recording_id,),
                        )
            except sqlite3.OperationalError as busy:
                if not self._left_running(job, busy, "its failure not stored on stopping"):
                    raise
                return None
            if final:
                self.server_faults.forget(job.recording_id)
                if self.memory is not None:  # its audio is kept, as a file would be
                    self.memory.transcribed(job.recording_id)
            return None

    def _left_running(self, job: jobs.Job, exc: sqlite3.OperationalError, what: str) -> bool:
        """True (and said) when `exc` is another process's write lock met on stopping: the
        job stays `running` in the database, and the next start gives it back with no crash
        counted (its note removed: _done_working); not the recording's fault. Met while
        running: False, and the caller raises it (process_next gives the job back)."""
        if not (is_busy(exc) and self.stop_event.is_set()):
            return False
        _LOGGER.warning(
            "job %d (recording %s): %s, database locked by another process: transcribed"
            " again at the next start",
            job.id,
            job.recording_id,
            what,
        )
        return True

    def _note_working(self, job_id: int) -> None:
        """Before a claim is committed: a death of this process from now until _done_working
        counts a crash against the job (jobs.note_working)."""
        try:
            jobs.note_working(self.settings.storage.runtime_dir, job_id)
        except OSError as exc:
            if not self._note_refused:
                self._note_refused = True
                _LOGGER.warning(
                    "cannot note the job in hand (%s): a crash during one is not counted"
                    " against its recording",
                    exc,
                )

    def _done_working(self, job: jobs.Job) -> None:
        """Done with the job, whether or not the database took its outcome (a full or
        read-only disk, a stop under another process's lock): if it is left `running`, the
        next start gives it back with no crash counted."""
        try:
            jobs.done_working(self.settings.storage.runtime_dir, job.id)
        except OSError as exc:
            _LOGGER.warning(
                "job %d (recording %s): cannot remove its note (%s): if it is left running,"
                " the next start counts a crash against it",
                job.id,
                job.recording_id,
                exc,
            )

    def _transcribe(self, conn: sqlite3.Connection, job: jobs.Job) -> TranscribedRecording | None:
        # How far an earlier try of this job got: taken now, so a failure of this one drops it.
        partial, self._partial = self._partial, None
        if partial is not None and partial.job_id != job.id:
            if jobs.exists(conn, partial.job_id):  # not deleted or replaced meanwhile
                self._partial = partial  # kept for its own job while the room's go first
            partial = None
        row = conn.execute("SELECT * FROM recordings WHERE id=?", (job.recording_id,)).fetchone()
        if row is None:
            with Transaction(conn):  # deleted meanwhile: nothing to do
                jobs.complete(conn, job.id)
            self._forget_held(job.recording_id)
            return None
        audio_dir = self.settings.storage.audio_dir
        if row["audio_path"]:
            audio = self._read_audio(audio_file(audio_dir, row["audio_path"]))
        else:  # written to memory only, because the disk was too full
            # Kept (not taken) until the transcript is stored: a failed try can be retried.
            held = self.memory.get(job.recording_id) if self.memory is not None else None
            if held is not None:
                audio = to_float32(held)
            else:  # written to its file since (held_audio.py), or gone
                row = conn.execute(
                    "SELECT * FROM recordings WHERE id=?", (job.recording_id,)
                ).fetchone()
                if row is None or not row["audio_path"]:
                    raise AudioLostError("its audio was never written (disk full) and is gone")
                audio = self._read_audio(audio_file(audio_dir, row["audio_path"]))
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        upload = jobs.uploaded(str(row["source"]))
        progress = self._heard(conn, job, upload, audio, partial)
        if progress is None:  # deleted while it was transcribed: its job went with it
            return None
        assert progress.heard is not None
        transcript = progress.heard
        asr_s = progress.asr_s
        rtf = asr_s / max(float(row["duration_s"]), 1e-6)
        analysis = None
        stage = self.speakers  # one stage for the whole job: a reload may free it meanwhile
        if stage is not None and not _recording_exists(conn, job.recording_id):
            stage = None  # deleted while it was transcribed: its speakers are not wanted
        if stage is not None:  # the heavy part, outside the transaction
            # A long one's takes minutes: given up on stopping or a deletion, and an upload's
            # yields to the room's recordings, like its transcription.
            long = float(row["duration_s"]) > WHISPER_WINDOW_S
            _LOGGER.debug("job %d: transcribed in %.1f s, its speakers next", job.id, asr_s)

            asked = 0

            def wanted() -> bool:  # asked before each window
                nonlocal asked
                asked += 1
                if self.stop_event.is_set():
                    return False
                # Not yielding before the first: each try gets a window further, however
                # often the room speaks.
                return self._wanted(conn, job, upload and asked > 1)

            if progress.analysed_by is None or progress.analysed_by() is not stage:
                progress.diarization, progress.analysed_by = Progress(), weakref.ref(stage)
            try:
                analysis = stage.analyze(
                    audio, transcript, conn, wanted if long else None, progress.diarization
                )
            except Stopped as exc:
                if self.stop_event.is_set():
                    raise
                if not _recording_exists(conn, job.recording_id):
                    self._deleted_meanwhile(job.recording_id, f"its speakers were analysed: {exc}")
                    return None
                self._partial = progress
                raise Stopped(f"the room's recordings first: {exc}, taken up there next") from exc
            transcript = analysis.transcript  # segments split at speaker changes
        # Without an fsync of its own: a power cut may take back the last transcripts, whose
        # recordings are then transcribed again at the next start (their save was durable),
        # making their events again with the same event_ids (messages.job_event_id). Not one
        # whose audio is only in memory (disk full), dropped below: nothing could make it again.
        with Transaction(conn, durable=not row["audio_path"]):
            if not _recording_exists(conn, job.recording_id):  # deleted while transcribed
                _LOGGER.info("recording %s deleted while it was transcribed", job.recording_id)
                self._forget_held(job.recording_id)
                return None
            stored_at = now()
            latency_ms = (stored_at - float(row["closed_at"])) * 1000.0
            store_transcript(conn, job.recording_id, transcript, self.transcriber.model_name)
            speakers = None
            if stage is not None and analysis is not None:
                speakers = stage.store(conn, job.recording_id, analysis)
            conn.execute(
                "UPDATE recordings SET rtf=?, latency_ms=?, transcribed_at=? WHERE id=?",
                (rtf, latency_ms, stored_at, job.recording_id),
            )
            result = TranscribedRecording(
                recording_id=job.recording_id,
                source=str(row["source"]),
                start_s=float(row["start_s"]),
                end_s=float(row["end_s"]),
                text=transcript.text,
                language=transcript.language,
                suspect=transcript.suspect,
                rtf=rtf,
                latency_ms=latency_ms,
                segments=speakers.segments if speakers else plain_segments(transcript),
                opt_out=speakers.opt_out if speakers else False,
                reprocessed=job.kind == jobs.REPROCESS_KIND,
                job_id=job.id,
            )
            for hook in self.on_stored:  # e.g. the MQTT outbox: same transaction as the data
                hook(conn, result)
            jobs.complete(conn, job.id)
            if result.opt_out:  # this person asked not to be kept: audio and text go
                # In this very transaction, the audio first: no commit ever holds their
                # words (a kill, or a file that cannot be deleted, undoes the transcript).
                forget_with_audio(conn, audio_dir, row, forget_recording)
        if result.opt_out:
            self._forget_held(job.recording_id)
            forget_deleted_text(conn)
            _LOGGER.info("recording %s deleted: a do-not-keep voice", job.recording_id)
            return result
        self._transcribed_held(conn, job.recording_id)
        if self.settings.retention.keep_audio is False:
            # Read again: audio held in memory may have been written to its file meanwhile.
            row = conn.execute(
                "SELECT * FROM recordings WHERE id=?", (job.recording_id,)
            ).fetchone()
            if row is not None and row["audio_path"]:
                self._drop_audio(conn, row)
        # Ids and timings only: words in the journal would outlive a delete, a purge or an
        # opt-out. logging.level = "DEBUG" adds them (the config docs say so).
        _LOGGER.info(
            "transcript %s (%.2f s, %d segments, rtf %.2f, latency %.0f ms)%s",
            job.recording_id,
            row["duration_s"],
            len(transcript.segments),
            rtf,
            latency_ms,
            " [suspect]" if transcript.suspect else "",
        )
        _LOGGER.debug("transcript %s text: %s", job.recording_id, transcript.text)
        return result

    def _deleted_meanwhile(self, recording_id: str, what: str) -> None:
        """Its recording was deleted while it was worked on (given up part way): said, and
        what was kept for it forgotten."""
        _LOGGER.info("recording %s deleted while %s", recording_id, what)
        self._forget_held(recording_id)
        self.server_faults.forget(recording_id)

    def _wanted(self, conn: sqlite3.Connection, job: jobs.Job, upload: bool) -> bool:
        """Is the job's work to go on: its recording not deleted, and, for an upload, no
        recording of the room's own audio waiting?"""
        try:
            if not _recording_exists(conn, job.recording_id):
                return False
            return not (upload and jobs.room_waiting(conn, self.job_origin))
        except sqlite3.Error:  # cannot tell (the database locked): go on
            return True

    def _heard(
        self,
        conn: sqlite3.Connection,
        job: jobs.Job,
        upload: bool,
        audio: Float32Array,
        partial: _Progress | None,
    ) -> _Progress | None:
        """The recording transcribed whole (and its speaker analysis as far as an earlier
        try got, `partial`); None: deleted while it was transcribed (given up between
        Whisper windows).

        An upload yields to the room: between the windows of its transcription (or of its
        speaker analysis), a recording of the device's own audio waiting gives its job back
        (Stopped), and the next claim takes up where it left off (a ten-minute upload held
        back a spoken command for as long as it took)."""
        progress = _Progress(job.id) if partial is None else partial
        if partial is not None:  # the room's jobs came in between
            if progress.heard is not None and progress.heard_s >= progress.heard.duration_s:
                _LOGGER.info("recording %s: speaker analysis taken up", job.recording_id)
                return progress
            _LOGGER.info(
                "recording %s: transcription taken up at %.0f s",
                job.recording_id,
                progress.heard_s,
            )
        earlier, offset_s = progress.heard, progress.heard_s
        # The listeners' VAD trace is of the whole recording (an upload has none).
        trace = self.vad_traces.get(job.recording_id) if self.vad_traces is not None else None
        t0 = time.perf_counter()
        try:
            part = audio[round(offset_s * SAMPLE_RATE_HZ) :]
            heard = self.transcriber.transcribe(
                part, None if offset_s else trace, lambda: self._wanted(conn, job, upload)
            )
        except Unwanted as exc:
            done_s = offset_s + exc.done_s
            where = f"given up {done_s:.0f} s into {audio.size / SAMPLE_RATE_HZ:.0f} s"
            if not _recording_exists(conn, job.recording_id):
                self._deleted_meanwhile(job.recording_id, f"it was transcribed: {where}")
                return None
            progress.asr_s += time.perf_counter() - t0
            progress.heard, progress.heard_s = later(exc.heard, offset_s, earlier), done_s
            self._partial = progress
            raise Stopped(f"the room's recordings first: {where}, taken up there next") from exc
        progress.asr_s += time.perf_counter() - t0
        progress.heard = later(heard, offset_s, earlier) if earlier is not None else heard
        progress.heard_s = progress.heard.duration_s
        # Only a transcription made now says the servers work (not one taken up whole).
        if self.server_faults.transcribed(job.recording_id) and self.job_origin is None:
            jobs.retry_now(conn)  # the jobs that waited on the servers go on now
        return progress

    @staticmethod
    def _read_audio(path: Path) -> Float32Array:
        if not path.is_file():
            raise AudioLostError(f"its audio file {path} is missing")
        # Opened here, not by libsndfile: a file this user may not read is then said to be
        # so ("Permission denied: <file>"), not "Error opening <file>: System error".
        with open(path, "rb") as handle:
            audio, _ = soundfile.read(handle, dtype="float32")
        return np.asarray(audio, dtype=np.float32)

    def _drop_audio(self, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
        """keep_audio = false: the transcript (committed without an fsync of its own) is put
        on the card before the only other copy of the words, the audio, is deleted; the file
        goes before its row forgets it (drop_audio), so a crash, or a file that cannot be
        deleted, never leaves audio that no row names (a later purge or audio_days finds it)."""
        sync_log(conn)
        try:  # if this commit is lost, the row names a file that is gone
            drop_audio(conn, self.settings.storage.audio_dir, [row], durable=False)
        except OSError as exc:
            _LOGGER.error(
                "recording %s: keep_audio = false but its audio stays: %s", row["id"], exc
            )

    def _forget_held(self, recording_id: str) -> None:
        """Drop audio held in memory for a recording that needs it no more."""
        if self.memory is not None:
            self.memory.pop(recording_id)

    def _transcribed_held(self, conn: sqlite3.Connection, recording_id: str) -> None:
        """A recording whose audio is held in memory is transcribed: the audio waits to be
        written to its file if it is to be kept (held_audio.py), first to go if a new
        recording needs the room; with keep_audio = false it goes."""
        if self.memory is None:
            return
        if self.settings.retention.keep_audio is False:
            if self.memory.pop(recording_id) is not None:
                try:  # never to be written; a mark left is deleted at the next start
                    with Transaction(conn, durable=False):
                        forget_held(conn, recording_id)
                except sqlite3.OperationalError as exc:
                    if not (cannot_write(exc) or is_busy(exc)):
                        raise
        else:
            self.memory.transcribed(recording_id)


def store_transcript(
    conn: sqlite3.Connection, recording_id: str, transcript: Transcript, model_name: str
) -> None:
    """Replace the recording's segments (so a retried job never duplicates them), and forget
    who its local speakers were: a new analysis stores them again, none (speakers turned off
    before a `reprocess`) leaves no S1 = Alice behind segments that no longer name her."""
    conn.execute("DELETE FROM segments WHERE recording_id=?", (recording_id,))
    conn.execute("DELETE FROM speaker_mappings WHERE recording_id=?", (recording_id,))
    for idx, seg in enumerate(transcript.segments):
        conn.execute(
            "INSERT INTO segments (recording_id, idx, start_s, end_s, text, language,"
            " avg_logprob, no_speech_prob, compression_ratio, words, suspect)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                recording_id,
                idx,
                seg.start_s,
                seg.end_s,
                seg.text,
                transcript.language,
                seg.avg_logprob,
                seg.no_speech_prob,
                seg.compression_ratio,
                json.dumps(
                    [[w.start_s, w.end_s, w.text, round(w.probability, 4)] for w in seg.words]
                ),
                seg.suspect,
            ),
        )
    conn.execute(
        "UPDATE recordings SET status=?, text=?, language=?, model=? WHERE id=?",
        (
            "suspect" if transcript.suspect else "done",
            transcript.text,
            transcript.language,
            model_name,
            recording_id,
        ),
    )


def _recording_exists(conn: sqlite3.Connection, recording_id: str) -> bool:
    found = conn.execute("SELECT 1 FROM recordings WHERE id=?", (recording_id,)).fetchone()
    return found is not None
