"""A real Mosquitto broker on free loopback ports, and a paho subscriber that records what
arrives, for the MQTT tests."""

from __future__ import annotations

import getpass
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

USER = "meraudiod"
PASSWORD = "s3cret-pw"


# Ports handed out for servers the tests start: below the kernel's ephemeral range (32768 on,
# where clients' own ports come from), a block per pytest-xdist worker, so that no other
# worker's server or connection can take one between its hand-out and its server's bind.
_PORTS_FROM: Final = 20000
_PORTS_PER_WORKER: Final = 1000
_handed_out = itertools.count()


def free_port() -> int:
    """A loopback port nothing listens on, that no other test worker hands out."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = _PORTS_FROM + int(worker or 0) * _PORTS_PER_WORKER
    for _ in range(_PORTS_PER_WORKER):
        port = first + next(_handed_out) % _PORTS_PER_WORKER
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT: the next one
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + _PORTS_PER_WORKER - 1}")


def make_certificates(folder: Path) -> None:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )


class Broker:
    """mosquitto with an anonymous plain listener and a password + TLS listener."""

    def __init__(self, folder: Path, persistent: bool = False, queue_qos0: bool = False) -> None:
        """persistent: sessions and queued messages survive a restart (saved on stop).
        queue_qos0: a persistent session away also gets the QoS 0 messages sent meanwhile."""
        self.folder = folder
        self.port = free_port()
        self.tls_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        make_certificates(folder)
        passwd = folder / "passwd"
        passwd.write_text("")
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), USER, PASSWORD], check=True)
        persistence = (
            f"persistence true\npersistence_location {folder}/\n"
            if persistent
            else "persistence false\n"
        ) + ("queue_qos0_messages true\n" if queue_qos0 else "")
        (folder / "mosquitto.conf").write_text(
            f"user {getpass.getuser()}\n"  # as root it would drop to a user who cannot read tmp
            "per_listener_settings true\n"
            f"{persistence}"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"listener {self.tls_port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"cafile {folder / 'ca.crt'}\n"
            f"certfile {folder / 'server.crt'}\n"
            f"keyfile {folder / 'server.key'}\n"
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("mosquitto") or "mosquitto", "-c", str(self.folder / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A separate paho client that records every message under the given filters."""

    def __init__(self, port: int, filters: list[str], persistent: bool = False) -> None:
        """persistent: a session the broker keeps (with what it queued) while this client is
        away, also across a restart of a persistent Broker."""
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{free_port()}",
            clean_session=not persistent,
        )
        self.filters = filters
        self.subscribed = 0  # filters the broker has acknowledged (at each connect)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        # Subscribed, not only connected: what is published next is seen.
        self.wait_for(lambda: self.client.is_connected() and self.subscribed >= len(filters), 10)

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        for f in self.filters:
            client.subscribe(f, qos=1)

    def _on_subscribe(self, client: paho.Client, *args: Any) -> None:
        with self.lock:
            self.subscribed += 1

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on(self, suffix: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, condition: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(
            f"timed out after {timeout_s} s; got {[m.topic for m in self.messages]}"
        )

    def wait_online(self, timeout_s: float) -> None:
        """Wait until the daemon has said `online` on its status topic (the subscriber must
        see <base>/status)."""
        self.wait_for(lambda: any(m.payload == b"online" for m in self.on("/status")), timeout_s)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
