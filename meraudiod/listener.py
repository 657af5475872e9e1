"""The listener thread: frames from a source -> VAD -> segmenter -> stored recordings."""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np

from .audio import FRAME_S, SAMPLE_RATE_HZ, Float32Array, Int16Array, rms_dbfs
from .config import Settings
from .db import cannot_write, database_id, is_busy, open_db, refused_write, waiting_at_most
from .held_audio import write_held
from .recordings import MemoryAudio, Recording, RecordingStore
from .retention import disk_free_mb, disk_low, room_again, writable
from .segmenter import Segmenter, SegmenterParams, SpeechStarted, Utterance
from .sources import AudioSource, EndOfStream, FileSource, SourceError
from .stage import StageThread
from .unsaved import (
    Purged,
    Unsaved,
    forget_kept,
    keep_unsaved,
    marking_saved,
    take_back_unsaved,
    unsaved_dir,
)
from .vad import SileroVad, VadTraces
from .wall_clock import StreamClock, follow_step
from .wording import counted

_LOGGER = logging.getLogger(__name__)
_READ_TIMEOUT_S = 0.5
_SAVE_RETRY_S: Final = 1.0  # first wait before saving again into a busy database; doubles
_SAVE_RETRY_MAX_S: Final = 30.0
# How long a live source's listener (a microphone, stdin) waits for another process's write
# lock when it saves; then the recording waits in memory and the frames go on being read (the
# source's queue holds 8 s of them). A file's listener waits as long as it takes.
_LIVE_LOCK_WAIT_S: Final = 1.0
# While the database cannot be written (its disk full, or read-only), utterances wait in memory
# (at most this many, as many as the memory keeps for an audio directory that cannot be
# written) and are saved again every so often.
_MAX_WAITING: Final = 32
_FULL_RETRY_S: Final = 5.0


class FrameBuffer:
    """The frames a pending utterance may still need, and their speech probabilities,
    addressed by stream frame index."""

    def __init__(self) -> None:
        self._frames: list[Int16Array] = []
        self._probs: list[float] = []
        self._first = 0  # stream index of _frames[0]

    def append(self, frame: Int16Array, prob: float) -> None:
        """Add the next frame of the stream and the VAD's probability for it."""
        self._frames.append(frame)
        self._probs.append(prob)

    def trim(self, oldest_needed: int) -> None:
        """Forget frames before `oldest_needed`."""
        drop = oldest_needed - self._first
        if drop > 0:
            del self._frames[:drop]
            del self._probs[:drop]
            self._first += drop

    def slice(self, start: int, end: int) -> Int16Array:
        """Samples of frames [start, end)."""
        chunk = self._frames[max(0, start - self._first) : end - self._first]
        return np.concatenate(chunk) if chunk else np.zeros(0, dtype=np.int16)

    def probs(self, start: int, end: int) -> Float32Array:
        """Speech probabilities of frames [start, end)."""
        return np.array(self._probs[max(0, start - self._first) : end - self._first], np.float32)


class Listener(StageThread):
    """Runs one source through VAD and the segmenter on a named thread, saving utterances."""

    thread_name = "listener"

    def __init__(
        self,
        settings: Settings,
        source: AudioSource,
        vad: SileroVad,
        on_recording: Callable[[Recording], None] | None = None,
        on_speech_start: Callable[[float], None] | None = None,
        on_speech_end: Callable[[Recording], None] | None = None,
        keep_ids: bool = False,
        job_origin: str | None = None,
        error_said_by_caller: bool = False,
    ) -> None:
        self.settings = settings
        self.source = source
        self.vad = vad
        self.stop_event = threading.Event()  # set to stop this listener (and save what it heard)
        self.on_recording = on_recording
        self.on_speech_start = on_speech_start  # with the wall-clock time speech was heard
        self.on_speech_end = on_speech_end  # once the recording is saved
        self.params = SegmenterParams.from_settings(settings.vad, settings.recorder)
        self.finished = threading.Event()
        self.error: str | None = None
        # The caller (`run` on a file or stdin, `analyze`) ends with `error` as its own error
        # line: logged here too, a person would read it twice.
        self._source_error_level = logging.DEBUG if error_said_by_caller else logging.ERROR
        self.job_origin = job_origin  # the jobs it queues belong to this process (None: daemon)
        self.recordings_saved = 0
        # Ids of what was saved, for a caller that reports per file (analyze); a microphone's
        # listener runs for months, so it keeps only the count.
        self.recording_ids: list[str] | None = [] if keep_ids else None
        self.frames_read = 0
        self.last_frame_at = 0.0  # time.monotonic() of the last frame
        self.last_prob = 0.0
        self.speaking = False
        # Muted without closing the source (files, stdin): frames are read and replaced by
        # silence, so nothing more is recorded and the stream's timeline stays intact.
        self.muted = False
        self.memory: MemoryAudio | None = None  # where audio goes while the disk is full
        self.vad_traces: VadTraces | None = None  # for the Wyoming client (asr_wyoming.py)
        self._last_frame: Int16Array | None = None  # for the level, measured when asked
        self._segmenter: Segmenter | None = None
        self._waiting: list[Unsaved] = []  # oldest first, while the database cannot be written
        # What a stop keeps of them is named for it (unsaved.py); read at the start, as at the
        # stop the database may not answer (a failing card).
        self._database_id = ""
        self._retry_at_s = 0.0  # time.monotonic() of the next try to save them
        # A live source's frames cannot wait while the database is locked (_LIVE_LOCK_WAIT_S).
        self._live = not isinstance(source, FileSource)
        self._busy_retry_s = _SAVE_RETRY_S  # the next wait before saving into a locked database
        self._locked_said = False  # the lock said once, until the recordings are saved
        # What cannot be written, and why (said once; None again once written).
        self.audio_problem: str | None = None
        self.database_problem: str | None = None
        # The data directory was moved under the daemon (Health.check_store): nothing more is
        # written to the old path; what is heard is kept in run_dir for the next start.
        self.store_moved = False
        # When the audio problem is no want of room (a read-only file system, a directory
        # the daemon may not write), the directory that refused, looked at until it can be.
        self._refused_dir: Path | None = None
        # Free space (MB) when the audio directory's disk refused audio for want of room.
        self._free_when_refused_mb = 0.0
        # time.monotonic() of the next look whether it is writable, and of the next write of
        # audio held in memory.
        self._probe_at_s = 0.0

    @property
    def storage_problem(self) -> str | None:
        """The audio directory or the database this listener cannot write, and why."""
        return "; ".join(p for p in (self.audio_problem, self.database_problem) if p) or None

    @property
    def level_dbfs(self) -> float | None:
        """Loudness of the last frame heard (None while muted); computed only when read."""
        frame = self._last_frame
        return rms_dbfs(frame) if frame is not None else None

    @property
    def waiting_to_save(self) -> int:
        """Recordings heard that the database has not taken yet (held in memory)."""
        return len(self._waiting)

    def update_params(self, params: SegmenterParams) -> None:
        """New thresholds and timings (SIGHUP), from the next frame on."""
        self.params = params
        if self._segmenter is not None:
            self._segmenter.p = params

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop listening; what was being said is saved first."""
        self.stop_event.set()
        self.join(timeout_s)

    def _run(self) -> None:
        # Once stopping, a wait for another process's write lock ends within seconds.
        conn = open_db(self.settings.storage.db_path, stop=self.stop_event)
        store = RecordingStore(
            conn,
            self.settings.storage.audio_dir,
            self.settings.recorder.audio_format,
            job_origin=self.job_origin,
        )
        segmenter = self._segmenter = Segmenter(self.params)
        buffer = FrameBuffer()
        clock = StreamClock(self.source.lead_s)
        starved = False
        self.vad.reset()
        try:
            if self.job_origin is None:  # the daemon: what the last one's database did not take
                self._take_back_waiting(conn)
            while not self.stop_event.is_set():
                try:
                    frame = self.source.read(_READ_TIMEOUT_S)
                except EndOfStream:
                    break
                except SourceError as exc:  # e.g. a file cut part of the way in
                    self.error = str(exc)
                    _LOGGER.log(self._source_error_level, "%s", exc)
                    break  # what was heard up to here is still saved
                follow_step(conn)  # NTP setting the clock moves the stamps too
                if self._waiting and time.monotonic() >= self._retry_at_s:
                    self._save_waiting(store, clock)
                held = self.memory is not None and len(self.memory) > 0
                probe = (self.audio_problem or held) and not self.store_moved
                if probe and time.monotonic() >= self._probe_at_s:
                    self._probe_audio_dir(conn, store)
                if frame is None:
                    starved = True  # the source gave nothing (a pipe's sender paused?)
                    continue
                if starved:
                    clock.resumed(self.frames_read * FRAME_S)
                    starved = False
                self.frames_read += 1
                self.last_frame_at = time.monotonic()
                if self.muted:
                    frame = np.zeros_like(frame)
                    self.last_prob, self._last_frame = 0.0, None
                else:
                    self.last_prob = self.vad(frame)
                    self._last_frame = frame
                buffer.append(frame, self.last_prob)
                for event in segmenter.push(self.last_prob):
                    self._handle(event, buffer, store, clock)
                buffer.trim(segmenter.oldest_needed_frame())
            # End of stream, an error or stop: what was being said is still saved whole. No
            # frame is left to read: the end of a pipe waits for another process's lock as a
            # file does (a stop still ends the wait within seconds).
            self._live = False
            for event in segmenter.flush():
                self._handle(event, buffer, store, clock)
            if self._waiting:
                self._save_waiting(store, clock)
            if self._waiting:  # still not writable, or another process holds the write lock
                self._keep_waiting()
        except SourceError as exc:
            self.error = str(exc)
            _LOGGER.log(self._source_error_level, "%s", exc)
        except Exception as exc:  # not the source: the stage itself (the store)
            self.died = f"{type(exc).__name__}: {exc}"
            self.error = f"listener failed: {self.died}"
            _LOGGER.exception("listener failed")
        finally:
            conn.close()
            self.finished.set()

    def _take_back_waiting(self, conn: sqlite3.Connection) -> None:
        folder = unsaved_dir(self.settings.storage)
        if folder is None:
            return
        try:
            self._database_id = database_id(conn)
            self._waiting = take_back_unsaved(conn, folder)
        except (OSError, sqlite3.Error) as exc:
            _LOGGER.error("cannot take back the recordings kept in %s: %s", folder, exc)

    def _why_unsaved(self) -> str:
        """Why the database does not take the recordings that wait, as the log says it."""
        if self.store_moved:
            return "was moved"
        return "cannot be written" if self.database_problem else "locked by another process"

    def _keep_waiting(self) -> None:
        """Stopping with recordings the database did not take: the daemon keeps them in the
        runtime directory for its next listener (after a restart, or a microphone reopened);
        what cannot be kept is lost, a line each."""
        why = self._why_unsaved()
        folder = unsaved_dir(self.settings.storage) if self.job_origin is None else None
        kept = 0
        if folder is not None:
            try:
                for heard in self._waiting:
                    keep_unsaved(folder, heard, self._database_id)
                    kept += 1
            except OSError as exc:
                _LOGGER.error("cannot keep recordings in %s: %s", folder, exc.strerror or exc)
        if kept:
            _LOGGER.warning(
                "database %s: %s (%.1f s) kept in %s until the daemon listens again",
                why,
                counted(kept, "recording"),
                sum(heard.duration_s for heard in self._waiting[:kept]),
                folder,
            )
        for heard in self._waiting[kept:]:
            _LOGGER.error(
                "database %s: recording of %.1f s lost on stopping", why, heard.duration_s
            )

    def _save(
        self,
        store: RecordingStore,
        heard: Unsaved,
        in_transaction: Callable[[sqlite3.Connection, Recording], None] | None = None,
    ) -> Recording | None:
        """Store an utterance; while the database is busy (a long purge, another process
        holding the write lock past the busy timeout) the audio is kept and the save retried.
        Audio the audio directory cannot take (its disk full, or read-only) is kept in memory,
        said once, and written to its file as soon as it can be (_probe_audio_dir)."""
        delay_s, no_room = _SAVE_RETRY_S, False
        # A reload may have changed the format; set here, on the one thread that saves.
        store.audio_format = self.settings.recorder.audio_format
        while True:
            memory = self.memory if no_room or disk_low(self.settings) else None
            try:
                with self._lock_wait(store.conn):
                    recording = store.save(
                        heard.samples,
                        source=heard.source,
                        start_s=heard.start_s,
                        started_at=heard.started_at,
                        transcribe=self.settings.asr.enabled,
                        in_transaction=in_transaction,
                        memory=memory,
                    )
            except OSError as exc:  # full since the guard looked (or it is off), or read-only
                if memory is not None or not refused_write(exc) or self.memory is None:
                    raise
                self._audio_refused(store, exc, self.memory)
                no_room = True
                continue
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                # Stopping, the lock was waited for as long as a stop may; a live source's
                # frames go on being read while the recording waits (_save_waiting).
                if self.stop_event.is_set() or self._live:
                    raise
                _LOGGER.warning(
                    "database busy (%s): recording of %.1f s kept in memory, saving again in"
                    " %.0f s",
                    exc,
                    heard.duration_s,
                    delay_s,
                )
                self.stop_event.wait(delay_s)
                delay_s = min(_SAVE_RETRY_MAX_S, delay_s * 2)
                continue
            if memory is None and self.audio_problem is not None:  # a file written
                self._audio_writable(store)
            return recording

    def _lock_wait(self, conn: sqlite3.Connection) -> contextlib.AbstractContextManager[object]:
        """How long a write waits for another process's lock: a live source's frames cannot
        wait (_LIVE_LOCK_WAIT_S); a file's, as long as the busy timeout."""
        if self._live:
            return waiting_at_most(conn, _LIVE_LOCK_WAIT_S)
        return contextlib.nullcontext()

    def _audio_refused(self, store: RecordingStore, exc: OSError, memory: MemoryAudio) -> None:
        """The audio directory refused a file: said once, looked at again in _FULL_RETRY_S."""
        self._probe_at_s = time.monotonic() + _FULL_RETRY_S
        self._free_when_refused_mb = disk_free_mb(store.audio_dir)
        if self.audio_problem is None:
            refused = store.audio_dir
            if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename:
                refused = Path(exc.filename).parent  # a day's directory made by another user
            self.audio_problem = f"cannot write audio to {refused} ({exc.strerror})"
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                self._refused_dir = refused
            _LOGGER.error(
                "%s: recordings' audio kept in memory (at most %d) until it can be written",
                self.audio_problem,
                memory.max_recordings,
            )

    def _probe_audio_dir(self, conn: sqlite3.Connection, store: RecordingStore) -> None:
        """An audio directory remounted read-write (a file made and gone, only while it was
        read-only), or given room, is seen within _FULL_RETRY_S, not at the next utterance;
        then the audio held in memory is written to its files, one a frame (each is a few
        fsyncs: the source's frames are not kept waiting)."""
        self._probe_at_s = time.monotonic() + _FULL_RETRY_S
        if self.audio_problem is not None and not (
            writable(self._refused_dir)
            if self._refused_dir is not None
            else room_again(store.audio_dir, self._free_when_refused_mb)
        ):
            return
        if disk_low(self.settings):  # the guard: held audio waits in memory
            return
        memory = self.memory
        held = memory.ids() if memory is not None else []
        if memory is not None and held:
            if not memory.write_lock.acquire(blocking=False):
                return  # another listener is writing them
            try:
                with self._lock_wait(conn):
                    write_held(conn, self.settings, memory, held[0])
            except OSError as exc:
                if not refused_write(exc):
                    raise
                self._audio_refused(store, exc, memory)
                return
            except sqlite3.OperationalError as exc:
                if not (is_busy(exc) or cannot_write(exc)):
                    raise
                return  # the database's own problem: said when a recording is saved
            finally:
                memory.write_lock.release()
            self._probe_at_s = 0.0  # the next one at the next frame
        if self.audio_problem is not None:
            self._audio_writable(store)

    def _audio_writable(self, store: RecordingStore) -> None:
        _LOGGER.info("can write audio to %s again", store.audio_dir)
        self.audio_problem, self._refused_dir = None, None
        self._probe_at_s = 0.0  # what is held in memory is written from the next frame on

    def _handle(
        self,
        event: SpeechStarted | Utterance,
        buffer: FrameBuffer,
        store: RecordingStore,
        clock: StreamClock,
    ) -> None:
        if isinstance(event, SpeechStarted):
            self.speaking = True
            if self.on_speech_start is not None:
                self.on_speech_start(min(clock.at(event.start_frame * FRAME_S), time.time()))
            return
        self.speaking = False
        start_s = event.start_frame * FRAME_S
        samples = buffer.slice(event.start_frame, event.end_frame)
        started_at = clock.started_at(start_s, samples.size / SAMPLE_RATE_HZ)
        probs = buffer.probs(event.start_frame, event.end_frame)
        if len(self._waiting) >= _MAX_WAITING:
            _LOGGER.error(
                "database %s and %d recordings waiting: recording of %.1f s dropped",
                self._why_unsaved(),
                len(self._waiting),
                samples.size / SAMPLE_RATE_HZ,
            )
            return
        self._waiting.append(Unsaved(samples, start_s, started_at, probs, self.source.name))
        self._save_waiting(store, clock)

    def _save_waiting(self, store: RecordingStore, clock: StreamClock) -> None:
        """Save what waits, oldest first; while the database cannot be written (its disk
        full, or read-only) it waits on in memory (said once), and is tried again every
        _FULL_RETRY_S."""
        if self.store_moved:  # its database is elsewhere, its audio would go to the old path
            return
        while self._waiting:
            heard = self._waiting[0]
            try:
                kept = heard.kept_in
                marking = marking_saved(kept) if kept is not None else None
                recording = self._save(store, heard, marking)
            except Purged:
                _LOGGER.info("a recording kept over the last stop was purged: not saved")
                del self._waiting[0]
                continue
            except sqlite3.OperationalError as exc:
                if is_busy(exc) and self.stop_event.is_set():
                    return  # stopping: kept (or said lost) at the end, with the rest
                if is_busy(exc):  # a live source: tried again later, the frames read meanwhile
                    self._locked(exc)
                    return
                if not cannot_write(exc) or self.job_origin is not None:
                    raise  # a one-off process (analyze) stops: nobody frees room meanwhile
                if self.database_problem is None:
                    self.database_problem = (
                        f"cannot write the database {self.settings.storage.db_path} ({exc})"
                    )
                    _LOGGER.error(
                        "%s: recordings wait in memory (at most %d) until it can be written",
                        self.database_problem,
                        _MAX_WAITING,
                    )
                self._retry_at_s = time.monotonic() + _FULL_RETRY_S
                return
            del self._waiting[0]
            self._busy_retry_s = _SAVE_RETRY_S
            if kept is not None:
                # Else the next start does.
                with contextlib.suppress(OSError, sqlite3.Error), self._lock_wait(store.conn):
                    forget_kept(store.conn, kept)
            if (self.database_problem is not None or self._locked_said) and not self._waiting:
                _LOGGER.info("database written again: the recordings that waited are saved")
                self.database_problem, self._locked_said = None, False
                self._retry_at_s = 0.0
            if recording is not None:  # None: no disk and no memory for its audio
                self._saved(recording, heard.probs, clock)

    def _locked(self, exc: sqlite3.OperationalError) -> None:
        """Another process holds the database's write lock: the recordings wait in memory,
        tried again after 1 s, then 2, 4 ... 30 s; said once."""
        if not self._locked_said:
            self._locked_said = True
            _LOGGER.warning(
                "database %s busy (%s): recordings wait in memory (at most %d) until it is free",
                self.settings.storage.db_path,
                exc,
                _MAX_WAITING,
            )
        self._retry_at_s = time.monotonic() + self._busy_retry_s
        self._busy_retry_s = min(_SAVE_RETRY_MAX_S, self._busy_retry_s * 2)

    def _saved(self, recording: Recording, probs: Float32Array, clock: StreamClock) -> None:
        """A recording is stored: its stamp noted (clock steps), counted, told to the rest."""
        clock.stamped(recording.id)
        self.recordings_saved += 1
        if self.on_speech_end is not None:
            self.on_speech_end(recording)
        if self.vad_traces is not None:
            self.vad_traces.put(recording.id, probs)
        if self.recording_ids is not None:
            self.recording_ids.append(recording.id)
        if self.on_recording is not None:
            self.on_recording(recording)
