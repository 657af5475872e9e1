"""The daemon's surfaces, what the world outside reaches it through: the MQTT link and the
thread its requests run on, the HTTP stage, and what the daemon publishes on them (events,
the retained state, the listening switch's state).

Everything here runs on the main thread unless said otherwise; the listener, the worker and
the command runner call in through the hooks it hands them.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from typing import TYPE_CHECKING, Any, Final

from . import events
from .checks import mqtt_file_problems
from .db import Transaction, cannot_write
from .messages import Event, Outgoing, Response, SpeechEvent, enqueue
from .recordings import Recording
from .status import retained_state
from .worker import TranscribedRecording

if TYPE_CHECKING:
    from .daemon import Daemon

_LOGGER = logging.getLogger(__name__)
_READ_ONLY_COMMANDS: Final = frozenset(
    {"status", "recordings/list", "recordings/get", "speakers/list", "config/get"}
)
_COMMAND_STOP_S: Final = 5.0  # a long request (an enrolment) is not waited for longer


class Surfaces:
    """The MQTT link, the command runner and the HTTP stage of one daemon, and what it
    publishes on them."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self._mqtt_stop = threading.Event()  # last: it delivers the final events and state
        self.mqtt: Any = None  # MqttLink when enabled
        self.commands: Any = None  # CommandRunner (MQTT requests) when MQTT is enabled
        self.http: Any = None  # HttpStage when enabled
        self.mqtt_problem: str | None = None  # MQTT's files cannot be used: off, retried
        self._last_state: dict[str, Any] | None = None
        self._state_dirty = False
        # A state computed across a change is old: changes are counted, under the lock
        # that its sending takes.
        self._state_changes = 0
        self._state_lock = threading.Lock()

    # --- start and stop --------------------------------------------------------------------

    def start_mqtt(self) -> None:
        """The worker's transcripts into the outbox (even while MQTT is off), then MQTT."""
        worker = self.daemon.pipeline.worker
        if worker is not None:
            worker.on_stored.append(self._transcript_event)
            worker.on_committed.append(self._transcript_committed)
        self.connect_mqtt()

    def connect_mqtt(self) -> None:
        """The MQTT thread and the thread its requests run on; while a file it needs cannot be
        read or loaded (a root-only secret under User=meraudiod, a bad certificate), MQTT
        stays off and degraded, tried again every heartbeat."""
        from .command_runner import CommandRunner
        from .homeassistant import discovery_message
        from .mqtt import MqttLink

        daemon = self.daemon
        problems = mqtt_file_problems(self.settings)
        if problems:
            if self.mqtt_problem is None:
                _LOGGER.error("MQTT off until it can use its files: %s", "; ".join(problems))
            self.mqtt_problem = "MQTT off: " + "; ".join(problems)
            daemon.notifier.status(daemon.health.status_line())
            return
        if self.mqtt_problem is not None:
            _LOGGER.info("MQTT files usable: connecting")
            self.mqtt_problem = None
            daemon.notifier.status(daemon.health.status_line())
        discovery = (
            discovery_message(self.settings) if self.settings.homeassistant.discovery else None
        )
        # Requests run on their own thread, so that none delays the watchdog or an event.
        self.commands = CommandRunner(
            self.settings, daemon.stop_event, self._reply, runtime=daemon, after=self._after_command
        )
        self.mqtt = MqttLink(
            self.settings, self._mqtt_stop, daemon.inbound, discovery, self.commands.submit
        )
        self.commands.start()
        self.mqtt.start()

    def start_http(self) -> None:
        """The HTTP stage, with the worker's transcripts for its live sockets."""
        from .http.stage import HttpStage

        self.http = HttpStage(self.settings, self.daemon)
        worker = self.daemon.pipeline.worker
        if worker is not None:
            worker.on_stored.append(self._transcript_live)
        self.http.start()  # a port in use or a missing token fails here, before READY

    def stop_http(self) -> None:
        """The HTTP stage (its live sockets' listeners save what they heard)."""
        if self.http is not None:
            self.http.stop()

    def stop_mqtt(self) -> None:
        """The command runner after the request it is running, the last state, then MQTT
        (which says `offline`)."""
        if self.commands is not None:
            self.commands.join(timeout_s=_COMMAND_STOP_S)
        if self.mqtt is not None and self.daemon.conn is not None:
            self.mqtt.last_state = self._state_message  # the last word before `offline`
        self._mqtt_stop.set()
        if self.mqtt is not None:
            self.mqtt.join()

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
        if events.transcribed(conn, self.settings.mqtt, result) and self.mqtt is not None:
            self.mqtt.wake()

    def _transcript_committed(self, result: TranscribedRecording) -> None:
        # Once committed: a state computed before then on another connection is old.
        if not result.reprocessed:  # reprocess leaves the last transcript alone
            self._state_outdated()

    def _transcript_live(self, conn: sqlite3.Connection, result: TranscribedRecording) -> None:
        for event in events.transcript_events(conn, self.settings.mqtt, result):
            self.http.hub.publish(event, result.source)

    # --- commands (called on the command runner's thread) ----------------------------------

    def _reply(self, response: Response) -> None:
        self.mqtt.send(Outgoing(response.topic, json.dumps(response.to_payload(), default=str)))

    def _after_command(self, conn: sqlite3.Connection, response: Response) -> None:
        """The state is republished after a command that changed something."""
        if response.command not in _READ_ONLY_COMMANDS:  # e.g. the backlog or a speaker changed
            self._state_outdated()
            worker = self.daemon.pipeline.worker
            if worker is not None:  # `reprocess` queued jobs: look now
                worker.wake()

    def published(self, event: Event) -> None:
        """A command (over MQTT or HTTP) queued an event, e.g. a speaker enrolled: MQTT
        delivers it now, and the live sockets get it too."""
        if self.mqtt is not None:
            self.mqtt.wake()
        if self.http is not None:
            self.http.hub.publish(event, "commands")

    # --- the main thread's own messages -----------------------------------------------------

    def handle_inbound(self, item: Any) -> None:
        """The listening switch (requests go to the command runner, not here)."""
        value = item.payload.decode("utf-8", "replace").strip().upper()
        if value in ("ON", "OFF"):
            self.daemon.set_listening(value == "ON")
        else:
            _LOGGER.warning("listening/set wants ON or OFF, got %r", value[:20])
            self.publish_listening()

    def publish_event(self, event: Event) -> None:
        """An event of the main thread's own (not part of a recording's transaction). One the
        database cannot take in the outbox (its disk full, or read-only) is sent as it is
        (lost if the broker is away)."""
        conn = self.daemon.conn
        if self.mqtt is None or conn is None:
            return
        try:
            with Transaction(conn):
                enqueue(conn, event, max_rows=self.settings.mqtt.outbox_max_rows)
        except sqlite3.OperationalError as exc:
            if not cannot_write(exc):
                raise
            self.mqtt.send(Outgoing(event.topic, json.dumps(event.to_payload()), qos=event.qos))
            return
        self.mqtt.wake()

    def _state_outdated(self) -> None:
        """The retained state changed (on the worker's or the command runner's thread): the
        main loop computes it anew; until then a reconnect does not send the old one (it
        did, a transcript behind)."""
        with self._state_lock:
            self._state_changes += 1
            self._state_dirty = True
            if self.mqtt is not None:
                self.mqtt.outdated("state")

    def state_changed(self) -> bool:
        """Something the retained state shows changed since it was last published."""
        with self._state_lock:
            dirty, self._state_dirty = self._state_dirty, False
        if dirty:
            return True
        listener = self.daemon.listener
        speaking = bool(listener is not None and listener.speaking)
        return self._last_state is None or self._last_state.get("recording") != speaking

    def _state_message(self, conn: sqlite3.Connection) -> Outgoing:
        return _retained("state", retained_state(conn, self.daemon).to_payload())

    def publish_state(self) -> None:
        """The retained state, now."""
        if self.mqtt is None:
            return
        conn = self.daemon.conn
        assert conn is not None
        changes = self._state_changes
        payload = retained_state(conn, self.daemon).to_payload()
        with self._state_lock:
            if changes != self._state_changes:  # made old meanwhile: the next pass, anew
                return
            self._last_state = payload
            self.mqtt.send(_retained("state", payload))

    def publish_listening(self) -> None:
        """The listening switch's retained state."""
        if self.mqtt is None:
            return
        value = "ON" if self.daemon.listening else "OFF"
        self.mqtt.send(Outgoing("listening/state", value, qos=1, retain=True))


def _retained(topic: str, payload: dict[str, Any]) -> Outgoing:
    """A retained message of JSON, at QoS 1 (the device's state)."""
    return Outgoing(topic, json.dumps(payload), qos=1, retain=True)
