"""Builds the stages, starts them (sinks first, the microphone last), runs the main loop,
and stops them in reverse.

The main thread owns signals (they only set the stop event), commands from MQTT (through a
queue), the listening switch, the heartbeat that `meraudiod status` reads, the retained
state, and the systemd watchdog, which is fed only while audio frames arrive and every
thread is alive.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from . import __version__, jobs, models
from .asr import Transcriber
from .commands import (
    CommandContext,
    dispatch,
    get_kv,
    heartbeat_path,
    set_kv,
    status,
    write_heartbeat,
)
from .config import ConfigError, Settings, load_settings
from .db import Transaction, open_db
from .listener import Listener
from .messages import (
    ErrorEvent,
    Event,
    SegmentPayload,
    SpeakerEvent,
    SpeechEvent,
    State,
    TranscriptEvent,
    enqueue,
    truncate_state,
)
from .recordings import MemoryAudio, Recording, remove_orphans
from .retention import Retention, disk_free_mb, disk_low
from .segmenter import SegmenterParams
from .sources import AudioSource, FileSource, MicSource, SourceError, StdinSource
from .systemd import Notifier
from .vad import SileroVad
from .worker import TranscribedRecording, Worker

_LOGGER = logging.getLogger(__name__)
_POLL_S: Final = 0.2
_HEARTBEAT_EVERY_S: Final = 5.0
_STATE_EVERY_S: Final = 30.0
_AUDIO_STALL_S: Final = 5.0  # no frame for this long while listening: the microphone is gone
_MIC_RETRY_MAX_S: Final = 60.0
_LISTENING_KEY: Final = "listening"
_SPEAKER_EVENTS: Final = {"speakers/enroll": "enrolled", "speakers/delete": "deleted"}
# What SIGHUP can change while running; everything else is reported as needing a restart.
_LIVE_SECTIONS: Final = frozenset({"recorder", "retention", "logging"})
_LIVE_KEYS: Final = frozenset(
    {
        "vad.start_threshold",
        "vad.end_threshold",
        "asr.no_speech_threshold",
        "asr.logprob_threshold",
        "asr.max_attempts",
        "asr.retry_delay_s",
        "speakers.threshold",
        "speakers.margin",
        "mqtt.allow_admin_commands",
        "mqtt.outbox_max_age_days",
        "mqtt.outbox_max_rows",
    }
)


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


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

    def listener(self, source: AudioSource, **hooks: Any) -> Listener:
        """A started listener on an already started source."""
        assert self.vad is not None, "open() first"

        def on_recording(recording: Recording) -> None:
            if self.worker is not None:
                self.worker.wake()

        listener = Listener(self.settings, source, self.vad, on_recording=on_recording, **hooks)
        listener.memory = self.memory
        listener.start()
        return listener

    def backlog(self) -> int:
        """Pending plus running jobs."""
        conn = open_db(self.settings.storage.db_path)
        try:
            counts = jobs.counts(conn)
        finally:
            conn.close()
        return counts["pending"] + counts["running"]

    def drain(self) -> None:
        """Wait until every job is done or failed (or stop is set).

        The input has ended and somebody waits for the results, so failed recordings are
        retried at once rather than after asr.retry_delay_s.
        """
        if self.worker is None:
            return
        self.worker.retry_at_once = True
        conn = open_db(self.settings.storage.db_path)
        try:
            jobs.retry_now(conn)
        finally:
            conn.close()
        while not self.stop_event.is_set() and self.backlog() > 0 and self.worker.is_alive():
            self.worker.wake()
            time.sleep(_POLL_S)

    def close(self) -> None:
        """Stop the worker after its current job."""
        self.stop_event.set()
        if self.worker is not None:
            self.worker.join()


class Daemon:
    """The always-on service."""

    def __init__(
        self,
        settings: Settings,
        source: AudioSource,
        stop: threading.Event,
        on_transcribed: Callable[[TranscribedRecording], None] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.stop_event = stop
        # The worker has its own stop so that, on the way out, it ends after the listener.
        self._worker_stop = threading.Event()
        self._mqtt_stop = threading.Event()  # last: it delivers the final events and state
        self.pipeline = Pipeline(settings, self._worker_stop, on_transcribed)
        self.listener: Listener | None = None
        self.listening = True
        self.mic_problem: str | None = None
        self.disk_problem: str | None = None
        self.config_path: str | None = None  # what SIGHUP reloads
        self.cli_overrides: dict[tuple[str, str], Any] = {}  # command-line options win on reload
        self.reload_requested = threading.Event()
        self.error: str | None = None
        self.notifier = Notifier()
        self.inbound: queue.Queue[Any] = queue.Queue(maxsize=100)
        self.mqtt: Any = None  # MqttLink when enabled
        self.retention = Retention(settings, self._worker_stop)
        self.conn: sqlite3.Connection | None = None
        self.recordings_made = 0
        self._started_at = time.monotonic()
        self._mic_retry_s = 1.0
        self._next_mic_retry = 0.0
        # The microphone is not there at all (reopening it fails): waiting for it, degraded,
        # is healthy. One that opens but delivers nothing is a stall, for systemd to restart.
        self._mic_gone = False
        self._last_state: dict[str, Any] | None = None
        self._state_dirty = False

    @property
    def finite(self) -> bool:
        """A file or stdin ends; a microphone does not."""
        return isinstance(self.source, FileSource | StdinSource)

    # --- start -----------------------------------------------------------------------------

    def start(self) -> None:
        """Store and models, then the sinks (MQTT, worker, retention), then the microphone."""
        heartbeat_path(self.settings).parent.mkdir(parents=True, exist_ok=True)
        self.pipeline.open()
        self.conn = open_db(self.settings.storage.db_path)
        # A muted microphone stays muted across restarts; a file or stdin always plays.
        self.listening = self.finite or get_kv(self.conn, _LISTENING_KEY, "ON") == "ON"
        if self.settings.mqtt.enabled:
            self._start_mqtt()
        self.pipeline.start_worker()
        self.retention.start()
        if self.listening:
            self.source.start()  # a missing microphone fails here, before READY
            self._start_listener()
        self._publish_listening()
        self._heartbeat()
        self.notifier.ready(self._status_line())
        _LOGGER.info("ready: %s", self._status_line())

    def _start_mqtt(self) -> None:
        from .mqtt import MqttLink, discovery_payload

        discovery = (
            discovery_payload(self.settings) if self.settings.homeassistant.discovery else None
        )
        self.mqtt = MqttLink(self.settings, self._mqtt_stop, self.inbound, discovery)
        assert self.pipeline.worker is not None or not self.settings.asr.enabled
        if self.pipeline.worker is not None:
            self.pipeline.worker.on_stored.append(self._transcript_event)
        self.mqtt.start()

    def _start_listener(self) -> None:
        hooks: dict[str, Any] = {}
        if self.mqtt is not None:
            hooks = {"on_speech_start": self._speech_start, "on_speech_end": self._speech_end}
        self.listener = self.pipeline.listener(self.source, **hooks)

    # --- events into the outbox (called on the listener and worker threads) -----------------

    def _speech_start(self, conn: sqlite3.Connection, ts: float) -> None:
        m = self.settings.mqtt
        enqueue(conn, SpeechEvent(node_id=m.node_id, area=m.area, ts=ts, type="start"))
        self.mqtt.wake()

    def _speech_end(self, conn: sqlite3.Connection, recording: Recording) -> None:
        event = SpeechEvent(
            node_id=self.settings.mqtt.node_id,
            area=self.settings.mqtt.area,
            ts=recording.ended_at,
            type="end",
            recording_id=recording.id,
            rms_dbfs=round(recording.rms_dbfs, 1),
        )
        enqueue(conn, event)
        self.mqtt.wake()

    def _transcript_event(self, conn: sqlite3.Connection, result: TranscribedRecording) -> None:
        if result.suspect or result.opt_out:
            return  # not speech, or a voice that asked not to be kept: never published
        row = conn.execute(
            "SELECT started_at, ended_at, duration_s, rms_dbfs, model FROM recordings WHERE id=?",
            (result.recording_id,),
        ).fetchone()
        segments = tuple(
            SegmentPayload(
                round(seg.start_s, 3),
                round(seg.end_s, 3),
                seg.text,
                speaker=(
                    {"id": seg.speaker_id, "name": seg.speaker_name, "score": _round(seg.score)}
                    if seg.known
                    else None
                ),
            )
            for seg in result.segments
            if not seg.suspect
        )
        event = TranscriptEvent(
            node_id=self.settings.mqtt.node_id,
            area=self.settings.mqtt.area,
            recording_id=result.recording_id,
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            duration_s=round(row["duration_s"], 3),
            text=result.text,
            language=result.language,
            segments=segments,
            model=row["model"] or "",
            rtf=round(result.rtf, 3),
            latency_ms=round(result.latency_ms, 1),
            rms_dbfs=round(row["rms_dbfs"], 1),
        )
        enqueue(conn, event)
        m = self.settings.mqtt
        heard: dict[str, Any] = {}
        for seg in result.segments:  # one speaker event per voice heard in the recording
            if seg.label is not None and not seg.suspect and seg.label not in heard:
                heard[seg.label] = seg
        for seg in heard.values():
            enqueue(
                conn,
                SpeakerEvent(
                    node_id=m.node_id,
                    area=m.area,
                    event_type="identified" if seg.known else "unknown",
                    speaker_id=seg.speaker_id if seg.known else None,
                    name=seg.speaker_name if seg.known else None,
                    score=_round(seg.score),
                    recording_id=result.recording_id,
                ),
            )
        self.mqtt.wake()
        self._state_dirty = True  # "last transcript" changed

    # --- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Main loop until stopped (or, for a file, until it has played and been transcribed)."""
        assert self.conn is not None, "start() first"
        next_heartbeat = next_state = next_watchdog = 0.0
        while not self.stop_event.is_set():
            try:
                item = self.inbound.get(timeout=_POLL_S)
            except queue.Empty:
                item = None
            if item is not None:
                self._handle_inbound(item)
            t = time.monotonic()
            self._check_audio(t)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if t >= next_heartbeat:
                self._check_disk()
                self._heartbeat()
                next_heartbeat = t + _HEARTBEAT_EVERY_S
            if self.notifier.watchdog_interval_s and t >= next_watchdog:
                if self._healthy():
                    self.notifier.watchdog()
                next_watchdog = t + self.notifier.watchdog_interval_s
            if self.mqtt is not None and (t >= next_state or self._state_changed()):
                self._publish_state()
                next_state = t + _STATE_EVERY_S
            if self._finished():
                break
        return 1 if self.error else 0

    def _finished(self) -> bool:
        """A file or stdin has played, and its recordings are transcribed."""
        listener = self.listener
        if listener is None or not listener.finished.is_set():
            return False
        if listener.error:
            self.error = listener.error
            return not isinstance(self.source, MicSource)  # a microphone is retried
        if not self.finite:
            return False
        self.pipeline.drain()
        return True

    def _healthy(self) -> bool:
        """Every thread alive, and audio arriving (or muted, or the microphone gone and
        waited for)."""
        threads_ok = self.retention.is_alive() and (
            self.pipeline.worker is None or self.pipeline.worker.is_alive()
        )
        if self.mqtt is not None:
            threads_ok = threads_ok and self.mqtt.is_alive()
        if not self.listening:
            return threads_ok
        listener = self.listener
        audio_ok = self._mic_gone or (
            listener is not None
            and listener.is_alive()
            and time.monotonic() - listener.last_frame_at < _AUDIO_STALL_S
        )
        return threads_ok and audio_ok

    def _check_audio(self, t: float) -> None:
        """A microphone that stopped delivering is reopened with backoff, not a crash loop."""
        if not isinstance(self.source, MicSource) or not self.listening:
            return
        listener = self.listener
        stalled = (
            listener is None
            or not listener.is_alive()
            or (listener.frames_read > 0 and t - listener.last_frame_at > _AUDIO_STALL_S)
            or (listener.frames_read == 0 and t - self._started_at > _AUDIO_STALL_S)
        )
        if not stalled:
            if self.mic_problem:
                _LOGGER.info("microphone is back")
                self.mic_problem = None
                self.notifier.status(self._status_line())
            self._mic_retry_s = 1.0
            return
        if t < self._next_mic_retry:
            return
        self.mic_problem = "microphone lost: retrying"
        self.notifier.status(self._status_line())
        _LOGGER.warning("no audio from %s; reopening it", self.source.name)
        if listener is not None:
            listener.stop(timeout_s=5.0)
        self.source.stop()
        try:
            self.source.start()
            self._start_listener()
            self._started_at = t
            self._mic_gone = False
        except SourceError as exc:
            self.mic_problem = f"microphone lost: {exc}"
            self._mic_gone = True
            _LOGGER.error("%s", exc)
        self._next_mic_retry = t + self._mic_retry_s
        self._mic_retry_s = min(_MIC_RETRY_MAX_S, self._mic_retry_s * 2)

    def _handle_inbound(self, item: Any) -> None:
        assert self.conn is not None
        if item.kind == "listening":
            value = item.payload.decode("utf-8", "replace").strip().upper()
            if value in ("ON", "OFF"):
                self.set_listening(value == "ON")
            else:
                _LOGGER.warning("listening/set wants ON or OFF, got %r", value[:20])
                self._publish_listening()
            return
        context = CommandContext(
            self.conn,
            self.settings,
            admin=self.settings.mqtt.allow_admin_commands,
            runtime=self,
        )
        response = dispatch(context, item.name, item.payload)
        kind = _SPEAKER_EVENTS.get(item.name)
        if response.status == "ok" and kind is not None:
            m = self.settings.mqtt
            self._publish_event(
                SpeakerEvent(
                    node_id=m.node_id,
                    area=m.area,
                    event_type=kind,
                    name=response.data["name"],
                )
            )
        if self.mqtt is not None:
            from .mqtt import Outgoing

            self.mqtt.send(Outgoing(response.topic, json.dumps(response.to_payload(), default=str)))
        self._publish_state()

    def _publish_event(self, event: Event) -> None:
        """An event of the main thread's own (not part of a recording's transaction)."""
        if self.mqtt is None or self.conn is None:
            return
        with Transaction(self.conn):
            enqueue(self.conn, event)
        self.mqtt.wake()

    def speaker_stage(self) -> Any:
        """The worker's loaded speaker models, for enrolment over MQTT (None when off)."""
        return self.pipeline.worker.speakers if self.pipeline.worker is not None else None

    def set_listening(self, on: bool) -> None:
        """Open or close the microphone; persisted across restarts."""
        assert self.conn is not None
        if on != self.listening:
            self.listening = on
            set_kv(self.conn, _LISTENING_KEY, "ON" if on else "OFF")
            if not isinstance(self.source, MicSource):
                if self.listener is not None:  # a file or a pipe: keep reading, record nothing
                    self.listener.muted = not on
            elif on:
                self.source.start()
                self._start_listener()
            else:  # muted means the microphone is closed
                if self.listener is not None:
                    self.listener.stop()
                self.source.stop()
            _LOGGER.info("listening %s", "ON" if on else "OFF")
            self.notifier.status(self._status_line())
            self._heartbeat()
        self._publish_listening()
        self._publish_state()

    # --- state, heartbeat -------------------------------------------------------------------

    @property
    def degraded(self) -> str | None:
        """What is wrong, in a few words (None when all is well)."""
        return "; ".join(p for p in (self.mic_problem, self.disk_problem) if p) or None

    def _check_disk(self) -> None:
        """Below the free-space threshold, audio stays in memory; say so everywhere."""
        low = disk_low(self.settings)
        if low == (self.disk_problem is not None):
            return
        free_mb = disk_free_mb(self.settings.storage.data_dir)
        if low:
            self.disk_problem = f"disk almost full ({free_mb:.0f} MB free): audio not written"
            _LOGGER.error("%s", self.disk_problem)
            m = self.settings.mqtt
            self._publish_event(
                ErrorEvent(
                    node_id=m.node_id,
                    area=m.area,
                    component="storage",
                    error=self.disk_problem,
                    context={"free_mb": round(free_mb)},
                )
            )
        else:
            _LOGGER.info("disk space is back (%.0f MB free)", free_mb)
            self.disk_problem = None
        self.notifier.status(self._status_line())
        self._publish_state()

    def _status_line(self) -> str:
        if self.degraded:
            return self.degraded
        return f"listening on {self.source.name}" if self.listening else "muted"

    def _snapshot(self) -> dict[str, Any]:
        listener = self.listener
        return {
            "pid": os.getpid(),
            "at": time.time(),
            "listening": self.listening,
            "degraded": self.degraded,
            "microphone": self.source.name,
            "audio_level_dbfs": (
                round(listener.level_dbfs, 1)
                if listener is not None and listener.level_dbfs is not None and self.listening
                else None
            ),
            "recording": bool(listener is not None and listener.speaking),
            "dropped_frames": self.source.dropped_frames,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "mqtt": (
                {"connected": bool(self.mqtt.online), "error": self.mqtt.last_error}
                if self.mqtt is not None
                else None
            ),
            "version": __version__,
        }

    def _heartbeat(self) -> None:
        write_heartbeat(self.settings, self._snapshot())

    def _state(self) -> State:
        assert self.conn is not None
        info = status(self.conn, self.settings, disk_use=False)
        snap = self._snapshot()
        last = info["last_transcript"] or {}
        return State(
            listening=self.listening,
            recording=snap["recording"],
            queue_depth=info["backlog"],
            failed_jobs=info["jobs"]["failed"],
            outbox_depth=info["outbox_pending"],
            outbox_dropped=info["outbox_dropped"],
            models={k: v for k, v in info["models"].items() if v},
            version=__version__,
            uptime_s=snap["uptime_s"],
            microphone=snap["microphone"],
            audio_level_dbfs=snap["audio_level_dbfs"],
            last_transcript=truncate_state(last.get("text") or ""),
            last_transcript_full=last.get("text") or "",
            last_transcript_at=last.get("started_at"),
            last_speaker=info["last_speaker"] or "",
            disk_free_mb=round(disk_free_mb(self.settings.storage.data_dir), 1),
            degraded=self.degraded,
        )

    def _state_changed(self) -> bool:
        if self._state_dirty:
            self._state_dirty = False
            return True
        listener = self.listener
        speaking = bool(listener is not None and listener.speaking)
        return self._last_state is None or self._last_state.get("recording") != speaking

    def _publish_state(self) -> None:
        if self.mqtt is None:
            return
        from .mqtt import Outgoing

        payload = self._state().to_payload()
        self._last_state = payload
        self.mqtt.send(Outgoing("state", json.dumps(payload), qos=1, retain=True))

    def _publish_listening(self) -> None:
        if self.mqtt is None:
            return
        from .mqtt import Outgoing

        value = "ON" if self.listening else "OFF"
        self.mqtt.send(Outgoing("listening/state", value, qos=1, retain=True))

    # --- SIGHUP -----------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the configuration: apply what can change live, report what cannot."""
        try:
            fresh = load_settings(self.config_path)
        except ConfigError as exc:
            _LOGGER.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.status(f"reload failed: {exc}")
            return
        for (section, key), value in self.cli_overrides.items():
            object.__setattr__(getattr(fresh, section), key, value)
        old, new = self.settings.model_dump(), fresh.model_dump()
        applied, needs_restart = [], []
        for section, values in new.items():
            for key, value in values.items():
                if old[section][key] == value:
                    continue
                name = f"{section}.{key}"
                if section in _LIVE_SECTIONS or name in _LIVE_KEYS:
                    # In place (stages hold these section objects); `fresh` validated the values.
                    object.__setattr__(
                        getattr(self.settings, section), key, getattr(getattr(fresh, section), key)
                    )
                    applied.append(name)
                else:
                    needs_restart.append(name)
        if applied:
            logging.getLogger().setLevel(self.settings.logging.level)
            if self.listener is not None:
                self.listener.update_params(
                    SegmenterParams.from_settings(self.settings.vad, self.settings.recorder)
                )
        _LOGGER.info("reloaded configuration: applied %s", ", ".join(applied) or "nothing")
        if needs_restart:
            _LOGGER.warning("these settings need a restart: %s", ", ".join(needs_restart))
        self.notifier.status(
            self._status_line()
            + (f"; restart needed for {', '.join(needs_restart)}" if needs_restart else "")
        )

    # --- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Reverse order: the microphone and listener (saving what was being said), then the
        worker after its current job, then retention, then MQTT (which says `offline`)."""
        self.notifier.stopping()
        self.stop_event.set()
        if self.listener is not None:
            self.listener.stop()
        self.source.stop()
        self._worker_stop.set()
        self.pipeline.close()
        self.retention.join()
        if self.conn is not None:
            self._publish_state()  # the last word before `offline`
        self._mqtt_stop.set()
        if self.mqtt is not None:
            self.mqtt.join()
        write_heartbeat(self.settings, {**self._snapshot(), "at": 0.0})  # stopped
        if self.conn is not None:
            self.conn.close()
