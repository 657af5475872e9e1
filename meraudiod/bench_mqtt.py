"""What `bench` needs to measure the daemon with MQTT on, as most devices run it: a real
Mosquitto broker on a free loopback port for the length of the bench, the environment that
points a bench daemon at it, and a subscriber that counts the events it delivers (a figure
with MQTT on means nothing if none arrived). On a machine without mosquitto, `bench` says so
in one line and reports the figures with MQTT off only.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .config import Settings
from .mqtt_client import base_topic
from .signals import child_process

_START_TIMEOUT_S: Final = 10.0
# Debian and Ubuntu install the broker in /usr/sbin, which a user's PATH often leaves out.
_SBIN_DIRS: Final = ("/usr/sbin", "/usr/local/sbin")
MOSQUITTO_MISSING: Final = (
    "mosquitto is not installed: MQTT-on figures not measured (apt install mosquitto)"
)


def mosquitto_path(search_path: str | None = None) -> str | None:
    """The mosquitto program on `search_path` (PATH, and /usr/sbin which a user's PATH often
    leaves out); None if it is not installed."""
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which("mosquitto", path=search_path)


@contextlib.contextmanager
def local_broker(search_path: str | None = None) -> Iterator[int | None]:
    """A throwaway Mosquitto (anonymous, no persistence) on 127.0.0.1 and a free port; its
    port, or None when mosquitto is not installed (on `search_path`, see mosquitto_path).
    Stopped and its folder removed after."""
    program = mosquitto_path(search_path)
    if program is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="meraudiod-bench-broker-") as folder:
        conf = Path(folder) / "mosquitto.conf"
        conf.write_text(
            f"user {getpass.getuser()}\n"  # as root it would drop to a user who cannot read tmp
            "persistence false\n"
            "log_dest none\n"
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
        )
        with child_process(
            [program, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as broker:
            _await_port(broker, port)
            yield port


def _await_port(broker: subprocess.Popen[bytes], port: int) -> None:
    give_up_at = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if broker.poll() is not None or time.monotonic() > give_up_at:
                raise RuntimeError(f"mosquitto did not start on port {port}") from None
            time.sleep(0.05)


def mqtt_overrides(port: int) -> dict[str, str]:
    """The environment keys that turn a bench daemon's MQTT on, to the local broker (its
    node id, base topic and the rest as configured)."""
    return {
        "MERAUDIOD_MQTT__ENABLED": "true",
        "MERAUDIOD_MQTT__HOST": "127.0.0.1",
        "MERAUDIOD_MQTT__PORT": str(port),
    }


class EventCounter:
    """A separate paho client counting the events the broker passes on from the daemon."""

    def __init__(self, settings: Settings, port: int) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.count = 0
        # Every event of the daemon (<base>/event/...), none of its state or replies.
        self._filter = "/".join((base_topic(settings), "event", "#"))
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{port}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not self._subscribed.wait(_START_TIMEOUT_S):
            self.close()
            raise RuntimeError("the bench's MQTT subscriber could not subscribe")

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(self._filter, qos=1)

    def _on_message(self, *_: Any) -> None:
        with self._lock:
            self.count += 1

    def close(self) -> None:
        """Disconnect and stop its network thread."""
        self._client.disconnect()
        self._client.loop_stop()
