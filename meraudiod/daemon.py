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

from . import __version__, events
from .commands import CommandContext, dispatch
from .config import ConfigError, Settings, apply_live, load_settings
from .db import Transaction, get_kv, open_db, set_kv
from .listener import Listener
from .messages import (
    ErrorEvent,
    Event,
    SpeakerEvent,
    State,
    enqueue,
    truncate_state,
)
from .pipeline import Pipeline
from .recordings import Recording
from .retention import Retention, disk_free_mb, disk_low
from .segmenter import SegmenterParams
from .sources import AudioSource, FileSource, MicSource, SourceError, StdinSource
from .status import heartbeat_path, status, write_heartbeat
from .systemd import Notifier
from .worker import TranscribedRecording

_LOGGER = logging.getLogger(__name__)
_POLL_S: Final = 0.2
_HEARTBEAT_EVERY_S: Final = 5.0
_STATE_EVERY_S: Final = 30.0
_AUDIO_STALL_S: Final = 5.0  # no frame for this long while listening: the microphone is gone
_MIC_RETRY_MAX_S: Final = 60.0
_LISTENING_KEY: Final = "listening"
_SPEAKER_EVENTS: Final = {"speakers/enroll": "enrolled", "speakers/delete": "deleted"}


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
        from .homeassistant import discovery_message
        from .mqtt import MqttLink

        discovery = (
            discovery_message(self.settings) if self.settings.homeassistant.discovery else None
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
        events.speech_start(conn, self.settings.mqtt, ts)
        self.mqtt.wake()

    def _speech_end(self, conn: sqlite3.Connection, recording: Recording) -> None:
        events.speech_end(conn, self.settings.mqtt, recording)
        self.mqtt.wake()

    def _transcript_event(self, conn: sqlite3.Connection, result: TranscribedRecording) -> None:
        if events.transcribed(conn, self.settings.mqtt, result):
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
            if isinstance(self.source, MicSource):
                return False  # a microphone is retried
        if not self.finite:
            return False
        self.pipeline.drain()  # what was heard before an error is transcribed too
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
        if listener is not None and listener.is_alive():
            # Stuck in the driver: a second listener beside it would save the same audio
            # twice; the next try comes after the backoff.
            _LOGGER.error("the listener of %s does not stop; not reopening yet", self.source.name)
            self._next_mic_retry = t + self._mic_retry_s
            self._mic_retry_s = min(_MIC_RETRY_MAX_S, self._mic_retry_s * 2)
            return
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
        free_mb = disk_free_mb(self.settings.storage.audio_dir)  # where audio is written
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
        applied, needs_restart = apply_live(self.settings, fresh)
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
