"""Builds the stages, starts them (sinks first, the microphone last), runs the main loop,
and stops them in reverse.

The main thread owns signals (they only set the stop event), the listening switch (through
a queue from MQTT), the heartbeat that `meraudiod status` reads, the retained
state, and the systemd watchdog, which is fed only while audio frames arrive and every
thread is alive.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from . import events
from .checks import check_writable, mqtt_file_problems
from .config import ConfigError, Settings, apply_live, load_settings
from .db import Transaction, get_kv, open_db, set_kv
from .diarization import DiarizationError
from .listener import Listener
from .messages import (
    ErrorEvent,
    Event,
    Outgoing,
    Response,
    SpeechEvent,
    enqueue,
)
from .microphone import AudioSupervisor
from .pipeline import Pipeline
from .recordings import Recording
from .retention import Retention, disk_free_mb, disk_low
from .segmenter import SegmenterParams
from .sources import AudioSource, FileSource, MicSource, StdinSource
from .stage import StageThread
from .status import (
    configured_models,
    daemon_snapshot,
    heartbeat_path,
    retained_state,
    write_heartbeat,
)
from .systemd import Notifier
from .voiceprints import SpeakerError
from .worker import TranscribedRecording

_LOGGER = logging.getLogger(__name__)
_POLL_S: Final = 0.2
_HEARTBEAT_EVERY_S: Final = 5.0
_STATE_EVERY_S: Final = 30.0
_LISTENING_KEY: Final = "listening"
_READ_ONLY_COMMANDS: Final = frozenset(
    {"status", "recordings/list", "recordings/get", "speakers/list", "config/get"}
)
_COMMAND_STOP_S: Final = 5.0  # a long request (an enrolment) is not waited for longer


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
        # What this process loads (a reload may load or free the speaker models).
        self.models = configured_models(settings)
        self.source = source
        self.stop_event = stop
        # The worker has its own stop so that, on the way out, it ends after the listener.
        self._worker_stop = threading.Event()
        self._mqtt_stop = threading.Event()  # last: it delivers the final events and state
        self.pipeline = Pipeline(settings, self._worker_stop, on_transcribed)
        self.listening = True
        self.disk_problem: str | None = None
        self.mqtt_problem: str | None = None
        self.stage_problem: str | None = None  # a stage thread died: the daemon stops
        self.asr_problem: str | None = None  # every Wyoming server down
        self.config_path: str | None = None  # what SIGHUP reloads
        self.cli_overrides: dict[tuple[str, str], Any] = {}  # command-line options win on reload
        self.reload_requested = threading.Event()
        self.error: str | None = None
        self.notifier = Notifier()
        self.inbound: queue.Queue[Any] = queue.Queue(maxsize=100)
        self.mqtt: Any = None  # MqttLink when enabled
        self.commands: Any = None  # CommandRunner (MQTT requests) when MQTT is enabled
        self.http: Any = None  # HttpStage when enabled
        self.retention = Retention(settings, self._worker_stop)
        self.conn: sqlite3.Connection | None = None
        self.recordings_made = 0
        self.started_at = time.monotonic()
        self.audio = AudioSupervisor(source, self._start_listener, self._announce)
        self._last_state: dict[str, Any] | None = None
        self._state_dirty = False

    @property
    def finite(self) -> bool:
        """A file or stdin ends; a microphone does not."""
        return isinstance(self.source, FileSource | StdinSource)

    # --- start -----------------------------------------------------------------------------

    def start(self) -> None:
        """Store and models, then the sinks (MQTT, worker, retention, HTTP), then the
        microphone."""
        check_writable(self.settings)  # one line naming the directory, not a traceback
        heartbeat_path(self.settings).parent.mkdir(parents=True, exist_ok=True)
        self.pipeline.open()
        self.conn = open_db(self.settings.storage.db_path)
        # A muted microphone stays muted across restarts; a file or stdin always plays.
        self.listening = self.finite or get_kv(self.conn, _LISTENING_KEY, "ON") == "ON"
        if self.settings.mqtt.enabled:
            if self.pipeline.worker is not None:  # into the outbox even while MQTT is off
                self.pipeline.worker.on_stored.append(self._transcript_event)
            self._start_mqtt()
        self.pipeline.start_worker()
        self.retention.start()
        if self.settings.http.enabled:
            self._start_http()
        if self.listening:  # a missing file fails here, before READY; a microphone is waited for
            self.audio.open(time.monotonic())
        self._publish_listening()
        self._heartbeat()
        self.notifier.ready(self._status_line())
        _LOGGER.info("ready: %s", self._status_line())

    def _start_mqtt(self) -> None:
        """The MQTT thread and the thread its requests run on; while a file it needs cannot be
        read or loaded (a root-only secret under User=meraudiod, a bad certificate), MQTT
        stays off and degraded, tried again every heartbeat."""
        from .command_runner import CommandRunner
        from .homeassistant import discovery_message
        from .mqtt import MqttLink

        problems = mqtt_file_problems(self.settings)
        if problems:
            if self.mqtt_problem is None:
                _LOGGER.error("MQTT off until it can use its files: %s", "; ".join(problems))
            self.mqtt_problem = "MQTT off: " + "; ".join(problems)
            self.notifier.status(self._status_line())
            return
        if self.mqtt_problem is not None:
            _LOGGER.info("MQTT files usable: connecting")
            self.mqtt_problem = None
            self.notifier.status(self._status_line())
        discovery = (
            discovery_message(self.settings) if self.settings.homeassistant.discovery else None
        )
        # Requests run on their own thread, so that none delays the watchdog or an event.
        self.commands = CommandRunner(
            self.settings, self.stop_event, self._reply, runtime=self, after=self._after_command
        )
        self.mqtt = MqttLink(
            self.settings, self._mqtt_stop, self.inbound, discovery, self.commands.submit
        )
        self.commands.start()
        self.mqtt.start()

    def _start_http(self) -> None:
        from .http.stage import HttpStage

        self.http = HttpStage(self.settings, self)
        if self.pipeline.worker is not None:
            self.pipeline.worker.on_stored.append(self._transcript_live)
        self.http.start()  # a port in use or a missing token fails here, before READY

    @property
    def listener(self) -> Listener | None:
        """The listener on the source (None until one was started)."""
        return self.audio.listener

    @property
    def mic_problem(self) -> str | None:
        """What is wrong with the audio input (None when all is well)."""
        return self.audio.problem

    def _start_listener(self) -> Listener:
        return self.pipeline.listener(self.source, **self.speech_hooks(self.source.name))

    # --- events into the outbox and to the HTTP event stream (listener and worker threads) --

    def speech_hooks(self, source: str) -> dict[str, Any]:
        """A listener's speech start and end events: straight to the MQTT link (live only:
        not sent while the broker is known to be away, nor after an outage, since it would be
        news of the past; so never a row of the outbox), and to the sockets of the HTTP stage
        (also for a live audio socket's own listener)."""
        if not self.settings.mqtt.enabled and self.http is None:
            return {}
        m = self.settings.mqtt

        def send(event: SpeechEvent) -> None:
            if self.mqtt is not None and not self.mqtt.cut_off:
                self.mqtt.send(Outgoing.live(event))
            if self.http is not None:
                self.http.hub.publish(event, source)

        def on_speech_start(ts: float) -> None:
            send(events.speech_start_event(m, ts))

        def on_speech_end(recording: Recording) -> None:
            send(events.speech_end_event(m, recording))

        return {"on_speech_start": on_speech_start, "on_speech_end": on_speech_end}

    def _transcript_event(self, conn: sqlite3.Connection, result: TranscribedRecording) -> None:
        if events.transcribed(conn, self.settings.mqtt, result):
            if self.mqtt is not None:
                self.mqtt.wake()
            if not result.reprocessed:  # reprocess leaves the last transcript alone
                self._state_dirty = True

    # --- commands (called on the command runner's thread) ----------------------------------

    def _reply(self, response: Response) -> None:
        self.mqtt.send(Outgoing(response.topic, json.dumps(response.to_payload(), default=str)))

    def _after_command(self, conn: sqlite3.Connection, response: Response) -> None:
        """The state is republished after a command that changed something."""
        if response.command not in _READ_ONLY_COMMANDS:  # e.g. the backlog or a speaker changed
            self._state_dirty = True
            if self.pipeline.worker is not None:  # `reprocess` queued jobs: look now
                self.pipeline.worker.wake()

    def published(self, event: Event) -> None:
        """A command (over MQTT or HTTP) queued an event, e.g. a speaker enrolled: MQTT
        delivers it now, and the live sockets get it too."""
        if self.mqtt is not None:
            self.mqtt.wake()
        if self.http is not None:
            self.http.hub.publish(event, "commands")

    def _transcript_live(self, conn: sqlite3.Connection, result: TranscribedRecording) -> None:
        for event in events.transcript_events(conn, self.settings.mqtt, result):
            self.http.hub.publish(event, result.source)

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
            if self._check_stages():
                break
            if self.listening:
                self.audio.check(t)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if t >= next_heartbeat:
                if self.mqtt_problem is not None:
                    self._start_mqtt()
                self._check_disk()
                self._check_asr()
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
        self._check_stages()  # a file run that ended because a stage died never exits 0
        return 1 if self.error else 0

    def _check_stages(self) -> bool:
        """A stage thread that died is reported (log, STATUS=, status, event/error) and the
        daemon stops with a non-zero exit, for systemd to restart it: never a dead stage
        behind a fed watchdog. True once one has died."""
        if self.stage_problem is not None:
            return True
        listener = self.listener
        for stage in self._stages():
            # A listener ends with its stream or its microphone; the others only on stop()
            # (the command runner follows the daemon's own stop event: ended then is no death).
            stopping = self.stop_event.is_set()
            ended = stage is not listener and not stage.is_alive() and not stopping
            if stage.died or ended:
                self._stage_died(stage.thread_name, stage.died or "its thread ended")
                return True
        return False

    def _stages(self) -> list[StageThread]:
        stages = (
            self.pipeline.worker,
            self.retention,
            self.mqtt,
            self.commands,
            self.http,
            self.listener,
        )
        return [stage for stage in stages if stage is not None and stage.started]

    def _stage_died(self, name: str, why: str) -> None:
        self.stage_problem = self.error = f"the {name} stage died: {why}"
        _LOGGER.error("%s; stopping (systemd restarts the service)", self.error)
        self.notifier.status(self.error)
        self._heartbeat()
        m = self.settings.mqtt
        event = ErrorEvent(node_id=m.node_id, area=m.area, component=name, error=self.error)
        try:
            self._publish_event(event)  # delivered by MQTT on its way out
        except sqlite3.Error as exc:  # the store may be what failed
            _LOGGER.error("cannot queue the error event: %s", exc)

    def _finished(self) -> bool:
        """A file or stdin has played, and its recordings are transcribed."""
        listener = self.listener
        if listener is None or not listener.finished.is_set():
            return False
        if listener.error:
            self.error = listener.error
            if isinstance(self.source, MicSource):
                return False  # a microphone is retried
        if not self.finite or self.stop_event.is_set():  # asked to stop: the backlog waits
            return False
        # What was heard before an error is transcribed too; a SIGTERM meanwhile ends the wait.
        self.pipeline.drain(self.stop_event)
        return True

    def _healthy(self) -> bool:
        """Every thread alive, and audio arriving (or muted, or the microphone gone and
        waited for)."""
        listener = self.listener  # its health is the audio's, below
        threads_ok = all(stage.is_alive() for stage in self._stages() if stage is not listener)
        if not self.listening:
            return threads_ok
        return threads_ok and self.audio.healthy(time.monotonic())

    def _handle_inbound(self, item: Any) -> None:
        """The listening switch (requests go to the command runner, not here)."""
        value = item.payload.decode("utf-8", "replace").strip().upper()
        if value in ("ON", "OFF"):
            self.set_listening(value == "ON")
        else:
            _LOGGER.warning("listening/set wants ON or OFF, got %r", value[:20])
            self._publish_listening()

    def _publish_event(self, event: Event) -> None:
        """An event of the main thread's own (not part of a recording's transaction)."""
        if self.mqtt is None or self.conn is None:
            return
        with Transaction(self.conn):
            enqueue(self.conn, event, max_rows=self.settings.mqtt.outbox_max_rows)
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
                self.audio.open(time.monotonic())  # a missing microphone is waited for
            else:  # muted means the microphone is closed, and no longer waited for
                self.audio.close()
            _LOGGER.info("listening %s", "ON" if on else "OFF")
            self.notifier.status(self._status_line())
            self._heartbeat()
        self._publish_listening()
        self._publish_state()

    # --- state, heartbeat -------------------------------------------------------------------

    @property
    def degraded(self) -> str | None:
        """What is wrong, in a few words (None when all is well)."""
        problems = (
            self.stage_problem,
            self.mic_problem,
            self.disk_problem,
            self.mqtt_problem,
            self.asr_problem,
        )
        return "; ".join(p for p in problems if p) or None

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

    def _check_asr(self) -> None:
        """Degraded while the ASR backend says so (every Wyoming server down)."""
        worker = self.pipeline.worker
        problem = worker.transcriber.problem() if worker is not None else None
        if problem != self.asr_problem:
            self.asr_problem = problem
            _LOGGER.log(logging.WARNING if problem else logging.INFO, "%s", problem or "ASR ok")
            self.notifier.status(self._status_line())
            self._publish_state()

    def _status_line(self) -> str:
        if self.degraded:
            return self.degraded
        return f"listening on {self.source.name}" if self.listening else "muted"

    def _announce(self) -> None:
        """The audio's state changed: say so in `systemctl status`."""
        self.notifier.status(self._status_line())

    def _heartbeat(self, stopped: bool = False) -> None:
        try:
            write_heartbeat(
                self.settings, {**daemon_snapshot(self), **({"at": 0.0} if stopped else {})}
            )
        except OSError as exc:  # `status` goes stale; the daemon itself carries on
            _LOGGER.error("cannot write the heartbeat for `status`: %s", exc)

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
        assert self.conn is not None
        payload = retained_state(self.conn, self).to_payload()
        self._last_state = payload
        self.mqtt.send(Outgoing("state", json.dumps(payload), qos=1, retain=True))

    def _publish_listening(self) -> None:
        if self.mqtt is None:
            return
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
        self._update_speakers()
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

    def _update_speakers(self) -> None:
        """Load or free the speaker models as speakers/diarization were turned on or off; a
        model that will not load leaves them off, said in the log."""
        try:
            changed = self.pipeline.update_speakers()
        except (SpeakerError, DiarizationError) as exc:
            _LOGGER.error("speakers and diarization stay off: %s", exc)
            for section in (self.settings.speakers, self.settings.diarization):
                object.__setattr__(section, "enabled", False)
            changed = None
        if changed:
            _LOGGER.info("%s", changed)
        self.models = configured_models(self.settings)

    # --- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Reverse order: the microphone and listener (saving what was being said), HTTP,
        then the worker after its current job, then retention, then MQTT (which says
        `offline`)."""
        self.notifier.stopping()
        self.stop_event.set()
        self.audio.close()
        if self.http is not None:  # its live sockets' listeners save what they heard
            self.http.stop()
        self._worker_stop.set()
        self.pipeline.close()
        self.retention.join()
        if self.commands is not None:  # stops after the request it is running
            self.commands.join(timeout_s=_COMMAND_STOP_S)
        if self.conn is not None:
            self._publish_state()  # the last word before `offline`
        self._mqtt_stop.set()
        if self.mqtt is not None:
            self.mqtt.join()
        died = [stage for stage in self._stages() if stage.died]
        if died and self.stage_problem is None:  # on the way out: the run still fails
            self.stage_problem = self.error = (
                f"the {died[0].thread_name} stage died: {died[0].died}"
            )
        if self.conn is not None:  # it started, and wrote a heartbeat
            self._heartbeat(stopped=True)
            self.conn.close()
