"""The listener thread: frames from a source -> VAD -> segmenter -> stored recordings."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Final

import numpy as np

from .audio import FRAME_S, SAMPLE_RATE_HZ, Float32Array, Int16Array, rms_dbfs
from .config import Settings
from .db import disk_full, is_busy, open_db
from .recordings import MemoryAudio, Recording, RecordingStore
from .retention import disk_low
from .segmenter import Segmenter, SegmenterParams, SpeechStarted, Utterance
from .sources import AudioSource, EndOfStream, SourceError
from .stage import StageThread
from .vad import SileroVad, VadTraces
from .wall_clock import StreamClock, follow_step

_LOGGER = logging.getLogger(__name__)
_READ_TIMEOUT_S = 0.5
_SAVE_RETRY_S: Final = 1.0  # first wait before saving again into a busy database; doubles
_SAVE_RETRY_MAX_S: Final = 30.0
_SAVE_TRIES_WHEN_STOPPING: Final = 3  # on the way out, a locked database is not waited for long


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

    @property
    def level_dbfs(self) -> float | None:
        """Loudness of the last frame heard (None while muted); computed only when read."""
        frame = self._last_frame
        return rms_dbfs(frame) if frame is not None else None

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
        conn = open_db(self.settings.storage.db_path)
        store = RecordingStore(
            conn,
            self.settings.storage.audio_dir,
            self.settings.recorder.audio_format,
            job_origin=self.job_origin,
        )
        segmenter = self._segmenter = Segmenter(self.params)
        buffer = FrameBuffer()
        clock = StreamClock()
        self.vad.reset()
        try:
            while not self.stop_event.is_set():
                try:
                    frame = self.source.read(_READ_TIMEOUT_S)
                except EndOfStream:
                    break
                except SourceError as exc:  # e.g. a file cut part of the way in
                    self.error = str(exc)
                    _LOGGER.error("%s", exc)
                    break  # what was heard up to here is still saved
                follow_step(conn)  # NTP setting the clock moves the stamps too
                if frame is None:
                    continue
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
            # End of stream, an error or stop: what was being said is still saved whole.
            for event in segmenter.flush():
                self._handle(event, buffer, store, clock)
        except SourceError as exc:
            self.error = str(exc)
            _LOGGER.error("%s", exc)
        except Exception as exc:  # not the source: the stage itself (a full disk, the store)
            self.died = f"{type(exc).__name__}: {exc}"
            self.error = f"listener failed: {self.died}"
            _LOGGER.exception("listener failed")
        finally:
            conn.close()
            self.finished.set()

    def _save(
        self, store: RecordingStore, samples: Int16Array, start_s: float, started_at: float
    ) -> Recording | None:
        """Store an utterance; while the database is busy (a long purge, another process
        holding the write lock past the busy timeout) the audio is kept and the save retried."""
        delay_s, tries, no_room = _SAVE_RETRY_S, 0, False
        while True:
            tries += 1
            memory = self.memory if no_room or disk_low(self.settings) else None
            try:
                return store.save(
                    samples,
                    source=self.source.name,
                    start_s=start_s,
                    started_at=started_at,
                    transcribe=self.settings.asr.enabled,
                    memory=memory,
                )
            except OSError as exc:  # the disk filled since the guard looked (or it is off)
                if memory is not None or not disk_full(exc) or self.memory is None:
                    raise
                _LOGGER.error(
                    "disk full writing a recording of %.1f s (%s): kept in memory until"
                    " transcribed",
                    samples.size / SAMPLE_RATE_HZ,
                    exc.strerror,
                )
                no_room = True
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                if self.stop_event.is_set() and tries >= _SAVE_TRIES_WHEN_STOPPING:
                    raise
                _LOGGER.warning(
                    "database busy (%s): recording of %.1f s kept in memory, saving again in"
                    " %.0f s",
                    exc,
                    samples.size / SAMPLE_RATE_HZ,
                    delay_s,
                )
                time.sleep(delay_s)
                delay_s = min(_SAVE_RETRY_MAX_S, delay_s * 2)

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
        # A file read faster than real time is ahead of the clock: never a time to come.
        started_at = min(clock.at(start_s), time.time() - samples.size / SAMPLE_RATE_HZ)
        recording = self._save(store, samples, start_s, started_at)
        if recording is None:
            return  # the disk and the memory for it are full: reported by the daemon
        clock.stamped(recording.id)
        self.recordings_saved += 1
        if self.on_speech_end is not None:
            self.on_speech_end(recording)
        if self.vad_traces is not None:
            self.vad_traces.put(recording.id, buffer.probs(event.start_frame, event.end_frame))
        if self.recording_ids is not None:
            self.recording_ids.append(recording.id)
        if self.on_recording is not None:
            self.on_recording(recording)
