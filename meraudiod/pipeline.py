"""What `run` and `analyze` share: start-up recovery of the store, the models, the worker
that drains the jobs table, and listeners that feed it from a source.

The daemon (`run`) serves the store: it recovers what dead processes left and works on the
daemon's jobs. `analyze` may run beside a live daemon on the same data directory, so it
recovers nothing and queues, claims and waits for only jobs of its own."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final

from . import jobs, models
from .asr import SpeechToText, Transcriber
from .config import Settings
from .db import cannot_write, check_integrity, open_db
from .deletion import finish_forgetting
from .held_audio import finish_held_writes, keep_held_on_stop, take_back_spilled
from .listener import Listener
from .memory import release_memory, unmap_loaded_library_pages
from .recordings import MemoryAudio, Recording, remove_crashed_writes
from .sources import AudioSource
from .vad import SileroVad, VadTraces
from .wording import counted
from .worker import TranscribedRecording, Worker

_LOGGER = logging.getLogger(__name__)
_POLL_S: Final = 0.2


class Pipeline:
    """Database recovery, models and the worker: what `run` and `analyze` share."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        on_transcribed: Callable[[TranscribedRecording], None] | None = None,
        serves_store: bool = True,
    ) -> None:
        self.settings = settings
        self.stop_event = stop
        self.on_transcribed = on_transcribed
        self.serves_store = serves_store
        # Whose jobs this process queues and works on: None is the daemon's (kept across its
        # restarts); a one-off process (analyze) has its own.
        self.job_origin = None if serves_store else jobs.owner_id()
        self.worker: Worker | None = None
        self.memory = MemoryAudio()  # recordings waiting in RAM while the disk is full
        # The microphone's and every live audio socket's, for what they hold unsaved.
        self._listeners: weakref.WeakSet[Listener] = weakref.WeakSet()
        self._listeners_lock = threading.Lock()  # added on a socket's thread, read on others
        self._store_moved = False  # the data directory was moved under the daemon
        # The listeners' VAD per frame, which the Wyoming client cuts recordings with.
        self.vad_traces = VadTraces() if settings.asr.backend == "wyoming" else None
        self.opened = False  # store recovered and models loaded

    def open(self, recovered: bool = False) -> None:
        """Recover the store (unless the caller has: `recover`), load the models, start the
        worker. Fails fast with a message."""
        storage = self.settings.storage
        storage.audio_dir.mkdir(parents=True, exist_ok=True)
        if not recovered:
            conn = open_db(storage.db_path)
            try:
                self.recover(conn)
            finally:
                conn.close()
        transcriber = self._speech_to_text() if self.settings.asr.enabled else None
        # After Whisper: its load needs twice its resident size for a moment, and the peak is
        # lower with onnxruntime not yet in memory. A missing or broken VAD model still fails
        # here, before anything runs.
        self._new_vad()
        if transcriber is not None:
            self.worker = Worker(self.settings, transcriber, self.stop_event, self.on_transcribed)
            self.worker.memory = self.memory
            self.worker.vad_traces = self.vad_traces
            self.worker.job_origin = self.job_origin
            self.update_speakers()  # fails fast when a model is missing
        # Before any stage runs (memory.py): what loading touched and will not touch again.
        _LOGGER.debug("unmapped %d kB of library pages", unmap_loaded_library_pages())
        self.opened = True

    def recover(self, conn: sqlite3.Connection) -> None:
        """Check the database, then (the daemon only) recover what dead processes left: jobs
        left running, half-written audio, deleted text still in the index. Run again after
        it was cut short (a lock, a kill), it finishes."""
        storage = self.settings.storage
        check_integrity(conn, storage.db_path)
        if not self.serves_store:
            return
        requeued = jobs.requeue_stale(conn, storage.runtime_dir, self.settings.asr.max_attempts)
        if requeued:
            _LOGGER.warning(
                "requeued %s left running by a stopped process", counted(requeued, "job")
            )
        remove_crashed_writes(conn, storage.audio_dir)
        finish_held_writes(conn, storage.audio_dir)
        take_back_spilled(conn, self.settings, self.memory)
        if finish_forgetting(conn):
            _LOGGER.warning("merged deleted text out of the index (a delete was killed)")

    def update_speakers(self) -> str | None:
        """Load the speaker models when speakers or diarization are on and they are not
        loaded; free them when both are off (at start, and after a reload turned them on or
        off). Returns what changed, or None."""
        worker = self.worker
        if worker is None:
            return None
        wanted = self.settings.speakers.enabled or self.settings.diarization.enabled
        if wanted and worker.speakers is None:
            from .speakers import SpeakerStage

            worker.speakers = SpeakerStage(self.settings)
            return "speaker models loaded"
        if not wanted and worker.speakers is not None:
            worker.speakers = None  # the job in hand keeps its own reference until it ends
            release_memory()
            return "speaker models freed"
        return None

    def _speech_to_text(self) -> SpeechToText:
        """The local model, or the Wyoming servers (with the local model as the fallback
        only when asr.fallback = local: with wait, Whisper is never loaded)."""
        asr = self.settings.asr
        local = None
        if asr.backend == "local" or asr.fallback == "local":
            models_dir = self.settings.storage.resolved_models_dir
            path = models.resolve(asr.model, models_dir, asr.allow_download)
            local = Transcriber(path, asr, model_name=asr.model, stop=self.stop_event)
        if asr.backend == "local":
            assert local is not None
            return local
        from .asr_wyoming import WyomingTranscriber

        # Its own VAD: the Silero state is per stream, and the listener has the other one.
        vad = SileroVad(models.vad_file(self.settings), threads=self.settings.vad.threads)
        return WyomingTranscriber(self.settings, vad, self.stop_event, local)

    def start_worker(self) -> None:
        """Start transcribing the backlog."""
        if self.worker is not None:
            self.worker.start()

    def _new_vad(self) -> SileroVad:
        return SileroVad(models.vad_file(self.settings), threads=self.settings.vad.threads)

    def listener(self, source: AudioSource, keep_ids: bool = False, **hooks: Any) -> Listener:
        """A started listener on an already started source, with a VAD of its own (the
        model carries state from frame to frame, so two listeners, such as the microphone's
        and a live audio socket's, never share one)."""

        def on_recording(recording: Recording) -> None:
            if self.worker is not None:
                self.worker.wake()

        listener = Listener(
            self.settings,
            source,
            self._new_vad(),
            on_recording=on_recording,
            keep_ids=keep_ids,
            job_origin=self.job_origin,
            **hooks,
        )
        listener.memory = self.memory
        listener.vad_traces = self.vad_traces
        listener.start()
        with self._listeners_lock:
            self._listeners.add(listener)
        return listener

    def store_moved(self) -> None:
        """The data directory was moved under the daemon: nothing more is written to the old
        path (what the listeners hear is kept in run_dir for the next start)."""
        self._store_moved = True
        for listener in self._running():
            listener.store_moved = True

    @property
    def waiting_to_save(self) -> int:
        """Recordings the running listeners hold while the database does not take them."""
        return sum(x.waiting_to_save for x in self._running())

    def _running(self) -> list[Listener]:
        with self._listeners_lock:
            return [x for x in self._listeners if x.is_alive()]

    def drain(self, stop: threading.Event | None = None) -> None:
        """Wait until every job of this process is done or failed (or stop, or the worker's
        stop, is set).

        The input has ended and somebody waits for the results, so a failed recording's
        retry is made due at once rather than after asr.retry_delay_s.
        """
        if self.worker is None:
            return
        conn = open_db(self.settings.storage.db_path)
        try:
            stopped = self.stop_event.is_set
            while not (stopped() or (stop and stop.is_set())) and self.worker.is_alive():
                if jobs.unfinished(conn, self.job_origin) == 0:
                    return
                try:
                    jobs.retry_now(conn, self.job_origin)
                except sqlite3.OperationalError as exc:
                    if not cannot_write(exc):
                        raise
                    # A full or read-only disk: the retries keep their times, and the worker
                    # waits for the disk (said once, by the worker and the health check).
                self.worker.wake()
                time.sleep(_POLL_S)
        finally:
            conn.close()

    def close(self) -> None:
        """Stop the worker after its current job."""
        self.stop_event.set()
        if self.worker is not None:
            self.worker.wake()  # an idle worker sleeps until woken (or for seconds)
            self.worker.join()
        # In the runtime directory, if it can be; not when the data directory was moved: its
        # announcement would make a database anew at the old path.
        if len(self.memory) and self.serves_store and not self._store_moved:
            keep_held_on_stop(self.settings, self.memory)
        elif len(self.memory):  # nowhere else to keep it
            _LOGGER.warning(
                "audio of %s held in memory lost on stopping: the audio directory"
                " could not be written",
                counted(len(self.memory), "recording"),
            )
