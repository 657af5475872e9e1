"""What `run` and `analyze` share: start-up recovery of the store, the models, the worker
that drains the jobs table, and listeners that feed it from a source."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from . import jobs, models
from .asr import Transcriber
from .config import Settings
from .db import open_db
from .listener import Listener
from .recordings import MemoryAudio, Recording, remove_orphans
from .sources import AudioSource
from .vad import SileroVad
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
    ) -> None:
        self.settings = settings
        self.stop_event = stop
        self.on_transcribed = on_transcribed
        self.worker: Worker | None = None
        self.vad: SileroVad | None = None
        self.memory = MemoryAudio()  # recordings waiting in RAM while the disk is full

    def open(self) -> None:
        """Recover the store, load the models, start the worker. Fails fast with a message."""
        storage = self.settings.storage
        storage.audio_dir.mkdir(parents=True, exist_ok=True)
        conn = open_db(storage.db_path)
        try:
            requeued = jobs.requeue_stale(conn)
            if requeued:
                _LOGGER.warning("requeued %d jobs left running by a stopped process", requeued)
            remove_orphans(conn, storage.audio_dir)
        finally:
            conn.close()
        self.vad = SileroVad(models.vad_file(self.settings), threads=self.settings.vad.threads)
        if self.settings.asr.enabled:
            asr = self.settings.asr
            path = models.resolve(asr.model, storage.resolved_models_dir, asr.allow_download)
            transcriber = Transcriber(path, asr, model_name=asr.model)
            self.worker = Worker(self.settings, transcriber, self.stop_event, self.on_transcribed)
            self.worker.memory = self.memory
            if self.settings.speakers.enabled or self.settings.diarization.enabled:
                from .speakers import SpeakerStage  # fails fast when a model is missing

                self.worker.speakers = SpeakerStage(self.settings)

    def start_worker(self) -> None:
        """Start transcribing the backlog."""
        if self.worker is not None:
            self.worker.start()

    def listener(self, source: AudioSource, vad: SileroVad | None = None, **hooks: Any) -> Listener:
        """A started listener on an already started source; a second source at the same
        time (a live socket) brings its own VAD, whose state is per stream."""
        assert self.vad is not None, "open() first"

        def on_recording(recording: Recording) -> None:
            if self.worker is not None:
                self.worker.wake()

        listener = Listener(
            self.settings, source, vad or self.vad, on_recording=on_recording, **hooks
        )
        listener.memory = self.memory
        listener.start()
        return listener

    def drain(self) -> None:
        """Wait until every job is done or failed (or stop is set).

        The input has ended and somebody waits for the results, so a failed recording's
        retry is made due at once rather than after asr.retry_delay_s.
        """
        if self.worker is None:
            return
        conn = open_db(self.settings.storage.db_path)
        try:
            while not self.stop_event.is_set() and self.worker.is_alive():
                jobs.retry_now(conn)
                counts = jobs.counts(conn)
                if counts["pending"] + counts["running"] == 0:
                    return
                self.worker.wake()
                time.sleep(_POLL_S)
        finally:
            conn.close()

    def close(self) -> None:
        """Stop the worker after its current job."""
        self.stop_event.set()
        if self.worker is not None:
            self.worker.join()
