"""The MQTT link: one named thread runs paho's network loop, the reconnect loop with
jittered exponential backoff (the first connect at boot included), and the outbox drain.

paho callbacks run on this thread and only decode and enqueue, never blocking: requests go
to the command runner (which answers "busy" when its queue is full), the listening switch to
the main thread's queue; `online` is published once the subscriptions are acknowledged and
the retained state and discovery are republished. Retained messages are never queued: only
the latest of each topic goes out. Outbox rows are sent one at a time, in order, and deleted
only after the broker acknowledged them (QoS 1), so a broker outage or a crash loses nothing;
what is sent late carries `"replayed": true` (mqtt_delivery.py). One message that cannot be
published is logged and dropped; it never takes the link down.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import paho.mqtt.client as paho

from .config import Settings
from .db import now, open_db
from .messages import Inbound as Inbound  # the link's types, where its callers find them
from .messages import Outgoing as Outgoing
from .messages import bound_outbox
from .mqtt_client import (
    Waker,
    base_topic,
    connect,
    daemon_client_id,
    make_client,
    network_step,
)
from .mqtt_delivery import OutboxDelivery
from .stage import StageThread

_LOGGER = logging.getLogger(__name__)
_LOOP_S: Final = 0.1  # one step while connecting or saying goodbye
# An idle link sleeps until the broker's socket or another thread wakes it; at the latest
# after this long (or half the keep-alive), for paho's keep-alive ping.
_IDLE_WAIT_S: Final = 5.0
_BACKOFF_MIN_S: Final = 1.0
_BACKOFF_MAX_S: Final = 60.0
_BOUND_EVERY_S: Final = 60.0
_GOODBYE_S: Final = 5.0
_CONNACK_WAIT_S: Final = 5.0  # a broker that accepted TCP but says nothing: say so, retry
_SAY_DROPS_EVERY_S: Final = 10.0  # a flood of switches is logged once a while, not each
# Lost this soon after connecting this many times in a row: most likely another client with
# our client id (a second device with the same node_id, from a cloned SD card) takes turns.
_SHORT_LIVED_S: Final = 10.0
_SHORT_LIVED_IN_A_ROW: Final = 3
MAX_TOPIC_BYTES: Final = 65535  # MQTT's limit on a topic name (UTF-8)


class MqttLink(StageThread):
    """Connection, subscriptions, discovery, outbox delivery; on its own thread."""

    thread_name = "mqtt"

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        inbound: queue.Queue[Inbound],
        discovery: Outgoing | None,
        on_request: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.settings = settings
        self.stop_event = stop
        self.inbound = inbound
        self.on_request = on_request  # the command runner's submit: never blocks
        self.discovery = discovery
        self.base = base_topic(settings)
        self.connected = False
        self.online = False
        self.last_error: str | None = None
        self._outgoing: queue.Queue[Outgoing] = queue.Queue(maxsize=1000)
        self._retained: dict[str, Outgoing] = {}  # the latest of each; republished on connect
        self._retained_due: set[str] = set()  # changed since last sent
        self._retained_lock = threading.Lock()
        self._waker = Waker()
        self._client: paho.Client | None = None
        self._connected_at = 0.0
        self._pending_subs: set[int] = set()
        self._delivery = OutboxDelivery(self.base, self._waker)
        self._republish_discovery = False
        self._backoff_s = _BACKOFF_MIN_S
        self._ever_tried = False
        self._switches_dropped = 0
        self._refused_switch = ("", 0)  # neither ON nor OFF: the last one, and how many
        self._short_lived = 0  # connections in a row lost within _SHORT_LIVED_S
        self._drops_said_at = -_SAY_DROPS_EVERY_S
        # Events created while there was no connection are sent late and say so.
        self._offline_since: float | None = None
        self._replay_before = 0.0
        # The retained state as the stop leaves it, made on this thread's connection once
        # the outbox is delivered and its delivered rows deleted (Surfaces.stop_mqtt).
        self.last_state: Callable[[sqlite3.Connection], Outgoing] | None = None

    # --- called from other threads ---------------------------------------------------------

    @property
    def cut_off(self) -> bool:
        """The broker is known to be unreachable (an outage, or no broker at boot); False
        while the first connection is still being made."""
        return self._offline_since is not None

    def wake(self) -> None:
        """New rows in the outbox."""
        self._waker.set()

    def send(self, message: Outgoing) -> None:
        """Publish directly. A retained message is never queued: only the latest of its topic
        goes out (now, or on the next connect), so a reconnect never replays old state."""
        if message.retain:
            with self._retained_lock:
                self._retained[message.topic] = message
                self._retained_due.add(message.topic)
            self._waker.set()
            return
        try:
            self._outgoing.put_nowait(message)
        except queue.Full:
            _LOGGER.warning("MQTT send queue full; dropped %s", message.topic)
        self._waker.set()

    def outdated(self, topic: str) -> None:
        """The retained message of `topic` no longer holds (a newer one is being computed):
        not sent, nor republished on a reconnect, until the next `send` of it."""
        with self._retained_lock:
            self._retained.pop(topic, None)
            self._retained_due.discard(topic)

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        conn = open_db(self.settings.storage.db_path, stop=self.stop_event)
        client = self._client = make_client(self.settings)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        next_attempt = 0.0
        next_bound = 0.0
        try:
            while not self.stop_event.is_set():
                try:
                    due = not self.connected and time.monotonic() >= next_attempt
                    if due and not self._connect(client):
                        next_attempt = time.monotonic() + self._next_backoff()
                    if self.connected:
                        wait_s = self._idle_s(next_bound)
                        rc = network_step(client, self._waker, wait_s)
                        if rc != paho.MQTT_ERR_SUCCESS and self.connected:
                            self._lost(f"network loop: {paho.error_string(rc)}")
                            next_attempt = time.monotonic() + self._next_backoff()
                            continue
                        self._deliver(conn, client)
                    else:
                        self._waker.wait(self._idle_s(min(next_bound, next_attempt)))
                    if time.monotonic() >= next_bound:
                        bound_outbox(conn, self.settings.mqtt)
                        next_bound = time.monotonic() + _BOUND_EVERY_S
                    self._delivery.delete_delivered(conn)
                except Exception as exc:  # a bug in one message or callback: log, go on
                    _LOGGER.exception("MQTT link: %s", exc)
                    self.last_error = f"internal error: {exc}"
                    self._waker.wait(_LOOP_S)
            self._say_goodbye(conn, client)
        finally:
            try:
                self._delivery.delete_delivered(conn, force=True)
            finally:
                conn.close()
                self._waker.close()

    def join(self, timeout_s: float | None = None) -> None:
        """Wake the thread (its stop event is set) and wait for it to end."""
        self._waker.set()
        super().join(timeout_s)

    def _idle_s(self, next_due: float) -> float:
        """How long the thread may sleep: until `next_due` (time.monotonic()), a batch of
        delivered events to delete, or the next look at the keep-alive, whichever is first."""
        until = min(
            next_due, time.monotonic() + min(_IDLE_WAIT_S, self.settings.mqtt.keepalive_s / 2)
        )
        delete_at = self._delivery.delete_due_at()
        if delete_at is not None:
            until = min(until, delete_at)
        return max(0.0, until - time.monotonic())

    def _connect(self, client: paho.Client) -> bool:
        m = self.settings.mqtt
        try:
            if self._ever_tried:
                client.reconnect()
            else:
                self._ever_tried = True
                connect(client, self.settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"cannot connect to {m.host}:{m.port}: {exc}"
            _LOGGER.warning("MQTT %s", self.last_error)
            self._offline_since = self._offline_since or now()
            return False
        # CONNACK arrives through the loop; on_connect decides. Until then status says so,
        # rather than showing an older error.
        self.last_error = f"connecting to {m.host}:{m.port} (waiting for CONNACK)"
        started = time.monotonic()
        deadline = started + _CONNACK_WAIT_S
        closed = False
        while not self.connected and time.monotonic() < deadline and not self.stop_event.is_set():
            if network_step(client, self._waker, _LOOP_S) != paho.MQTT_ERR_SUCCESS:
                closed = True
                break
            if self.last_error and self.last_error.startswith("refused"):
                break  # the broker said no: wait for the backoff
        if not self.connected:
            self._offline_since = self._offline_since or now()
            if not (self.last_error or "").startswith("refused"):
                waited_s = time.monotonic() - started
                why = "closed before CONNACK" if closed else f"no CONNACK after {waited_s:.0f} s"
                self.last_error = f"connecting to {m.host}:{m.port} ({why})"
                _LOGGER.warning("MQTT %s; retrying", self.last_error)
        return self.connected

    def _next_backoff(self) -> float:
        delay = self._backoff_s * random.uniform(0.5, 1.0)  # jitter: no reconnect storms
        self._backoff_s = min(_BACKOFF_MAX_S, self._backoff_s * 2)
        return delay

    def _lost(self, reason: str) -> None:
        t = now()
        self._offline_since = self._offline_since or t
        self.connected = self.online = False
        self._short_lived = self._short_lived + 1 if t - self._connected_at < _SHORT_LIVED_S else 0
        if self._short_lived >= _SHORT_LIVED_IN_A_ROW:
            reason += (
                f"; lost {self._short_lived} times in a row within {_SHORT_LIVED_S:.0f} s of"
                " connecting: is another client using the client id"
                f" {daemon_client_id(self.settings)} (a second"
                " device with the same mqtt.node_id, e.g. from a cloned SD card)?"
            )
        self.last_error = reason
        _LOGGER.warning("MQTT connection lost: %s", reason)

    def _say_goodbye(self, conn: sqlite3.Connection, client: paho.Client) -> None:
        """Deliver what is still in the outbox (a little while), then a clean `offline`."""
        if not self.connected:
            return
        deadline = time.monotonic() + _GOODBYE_S
        while self.connected and time.monotonic() < deadline:
            network_step(client, self._waker, _LOOP_S)
            self._deliver(conn, client)
            unsent = self._delivery.unsent(conn)
            idle = (
                not self._delivery.in_flight and self._outgoing.empty() and not self._retained_due
            )
            if idle and not unsent:
                break
        if self.last_state is not None:
            try:
                self._delivery.delete_delivered(conn, force=True)
                self._publish(client, self.last_state(conn))
            except sqlite3.Error as exc:  # the store may be why the daemon stops
                _LOGGER.warning("MQTT: the last state not sent: %s", exc)
        info = client.publish(f"{self.base}/status", "offline", qos=1, retain=True)
        while not info.is_published() and time.monotonic() < deadline + 2.0:
            network_step(client, self._waker, _LOOP_S)
        self.connected = self.online = False  # a goodbye, not a lost connection
        client.disconnect()
        network_step(client, self._waker, _LOOP_S)

    # --- paho callbacks (this thread): decode, set flags, enqueue --------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = f"refused by broker: {reason}"
            _LOGGER.error("MQTT connection %s", self.last_error)
            return
        self.connected = True
        self.last_error = None
        self._connected_at = now()
        self._replay_before = self._connected_at if self._offline_since is not None else 0.0
        self._offline_since = None
        self._backoff_s = _BACKOFF_MIN_S
        # What was in flight stays in flight: paho resends it (DUP) and its PUBACK clears it.
        _LOGGER.info("MQTT connected to %s:%d", self.settings.mqtt.host, self.settings.mqtt.port)
        topics = [f"{self.base}/listening/set", f"{self.base}/request/#"]
        if self.discovery is not None:
            topics.append(f"{self.settings.homeassistant.discovery_prefix}/status")
        self._pending_subs = set()
        for topic in topics:
            _, mid = client.subscribe(topic, qos=1)
            if mid is not None:
                self._pending_subs.add(mid)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        self._pending_subs.discard(mid)
        if self._pending_subs or self.online:
            return
        # Subscribed: republish retained state and discovery, then announce ourselves.
        self._publish_discovery(client)
        with self._retained_lock:
            latest = list(self._retained.values())
            self._retained_due.clear()
        for message in latest:
            self._publish(client, message)
        client.publish(f"{self.base}/status", "online", qos=1, retain=True)
        self.online = True

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self.connected:
            self._lost(f"disconnected: {reason}")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        if msg.retain and topic.startswith(f"{self.base}/") and msg.payload:
            # Kept by the broker and handed over as we subscribe: a command from the past (a
            # retained purge ran at every start, a retained OFF muted again after an ON).
            _LOGGER.warning("retained %.80s ignored: publish commands without retain", topic)
        elif not msg.payload and self._is_command(topic):
            # How a retained command is cleared (`mosquitto_pub -r -n`): no command at all.
            _LOGGER.info("empty message on %.80s ignored", topic)
        elif not self.online and self._is_command(topic):
            # Queued by the broker for our session while we were away (stopped, or cut
            # off), handed over before our subscriptions are acknowledged: from the past
            # too (an OFF from hours ago muted the device at its next start).
            _LOGGER.warning("%.80s sent while the daemon was away ignored", topic)
        elif topic == f"{self.base}/listening/set":
            self._switch(bytes(msg.payload))
        elif topic.startswith(f"{self.base}/request/"):
            name = topic.removeprefix(f"{self.base}/request/")
            response_topic = f"{self.base}/response/{name}"
            if len(response_topic.encode("utf-8")) > MAX_TOPIC_BYTES:
                _LOGGER.warning(
                    "request ignored: its response topic would be longer than MQTT allows"
                    " (%d bytes)",
                    MAX_TOPIC_BYTES,
                )
            elif self.on_request is not None:
                self.on_request(name, bytes(msg.payload))
        elif topic.endswith("/status") and msg.payload == b"online":
            self._republish_discovery = True  # Home Assistant restarted

    def _is_command(self, topic: str) -> bool:
        return topic == f"{self.base}/listening/set" or topic.startswith(f"{self.base}/request/")

    def _switch(self, payload: bytes) -> None:
        """Queue a listening switch for the main thread. Only the latest counts: a full queue
        (a flood) loses its oldest switch, never the newest, which had lost the owner's last
        OFF. A payload that is neither ON nor OFF is refused here, never queued (a flood of
        them pushed the owner's OFF out), and the true state sent again. Drops and refusals
        are logged once in a while, not once each."""
        value = payload.decode("utf-8", "replace").strip().upper()
        if value in ("ON", "OFF"):
            item = Inbound("listening", "listening/set", value.encode())
            while True:
                try:
                    self.inbound.put_nowait(item)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self.inbound.get_nowait()
                    self._switches_dropped += 1
        else:
            self._refused_switch = (value[:20], self._refused_switch[1] + 1)
            with self._retained_lock:  # a UI that showed the bad value shows the truth
                if "listening/state" in self._retained:
                    self._retained_due.add("listening/state")
        if time.monotonic() - self._drops_said_at < _SAY_DROPS_EVERY_S:
            return
        if self._switches_dropped:
            _LOGGER.warning(
                "listening/set: a flood of switches; %d older ones dropped, the latest kept",
                self._switches_dropped,
            )
        if self._refused_switch[1]:
            _LOGGER.warning(
                "listening/set wants ON or OFF, got %r; %d such refused (said once in %.0f s)",
                *self._refused_switch,
                _SAY_DROPS_EVERY_S,
            )
        if self._switches_dropped or self._refused_switch[1]:
            self._switches_dropped, self._refused_switch = 0, ("", 0)
            self._drops_said_at = time.monotonic()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        # paho may call this inside publish() itself (QoS 0 written at once), so only note it.
        self._delivery.acked(mid)

    # --- publishing ------------------------------------------------------------------------

    def _publish(self, client: paho.Client, message: Outgoing) -> None:
        topic = message.topic if message.absolute else f"{self.base}/{message.topic}"
        try:
            client.publish(topic, message.payload, qos=message.qos, retain=message.retain)
        except ValueError as exc:  # e.g. a topic over MQTT's limit: this message only
            _LOGGER.warning("MQTT message to %.80s not sent: %s", topic, exc)

    def _publish_discovery(self, client: paho.Client) -> None:
        if self.discovery is not None:
            self._publish(client, self.discovery)

    def _deliver(self, conn: sqlite3.Connection, client: paho.Client) -> None:
        if not self.online:
            return
        if self._republish_discovery:
            self._republish_discovery = False
            self._publish_discovery(client)
        with self._retained_lock:
            due = [self._retained[topic] for topic in sorted(self._retained_due)]
            self._retained_due.clear()
        for message in due:
            self._publish(client, message)
        while True:
            try:
                message = self._outgoing.get_nowait()
            except queue.Empty:
                break
            if message.live_at is None or message.live_at >= self._replay_before:
                self._publish(client, message)  # else made before an outage: not news
        self._delivery.send_next(conn, client, self._replay_before)
