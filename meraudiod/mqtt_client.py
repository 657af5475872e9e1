"""The paho client as meraudiod builds it: base topic, credentials, TLS, last will, the
first CONNECT (with a persistent session), and one step of the network loop that waits on
the broker's socket and a waker instead of polling."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from typing import Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from .config import Settings

_SESSION_EXPIRY_S: Final = 24 * 3600
# The largest packet the broker may send us (MQTT 5; it drops bigger ones for this client):
# a request's topic may be 65,535 bytes and its payload is refused over 16 KiB anyway, while
# a 100 MB one was received whole, copied and queued first (hundreds of MB on a Pi).
MAX_INBOUND_PACKET_BYTES: Final = 128 * 1024


def base_topic(settings: Settings) -> str:
    """<base_topic>/<node_id>."""
    return f"{settings.mqtt.base_topic.rstrip('/')}/{settings.mqtt.node_id}"


def read_password(settings: Settings) -> str | None:
    """The broker password, from the environment/config or its file (never logged)."""
    m = settings.mqtt
    if m.password_file is not None:
        return m.password_file.read_text(encoding="utf-8-sig").strip()  # Notepad's BOM
    return m.password


def daemon_client_id(settings: Settings) -> str:
    """The client id the daemon connects with (unique per device through its node_id)."""
    return f"meraudiod-{settings.mqtt.node_id}"


def make_client(settings: Settings, client_id: str | None = None) -> paho.Client:
    """A paho client with our protocol, credentials, TLS and will."""
    m = settings.mqtt
    v5 = m.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or daemon_client_id(settings),
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else False,  # a persistent session keeps QoS 1 state
    )
    if m.username:
        client.username_pw_set(m.username, read_password(settings))
    if m.tls:
        client.tls_set(
            ca_certs=str(m.tls_ca_file) if m.tls_ca_file else None,
            certfile=str(m.tls_cert_file) if m.tls_cert_file else None,
            keyfile=str(m.tls_key_file) if m.tls_key_file else None,
            cert_reqs=ssl.CERT_NONE if m.tls_insecure and not m.tls_ca_file else ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(m.tls_insecure)
    client.will_set(f"{base_topic(settings)}/status", "offline", qos=1, retain=True)
    return client


def connect(client: paho.Client, settings: Settings) -> None:
    """The first CONNECT; MQTT 5 keeps the session across reconnects, as 3.1.1 does with
    clean_session=False."""
    m = settings.mqtt
    if m.protocol != "5":
        client.connect(m.host, m.port, m.keepalive_s)
        return
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = _SESSION_EXPIRY_S
    props.MaximumPacketSize = MAX_INBOUND_PACKET_BYTES
    client.connect(m.host, m.port, m.keepalive_s, clean_start=False, properties=props)


class Waker:
    """Wakes the MQTT thread out of its wait on the broker's socket: other threads `set()` it
    (a byte on a socket pair), the thread selects on it beside the broker's socket."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def fileno(self) -> int:
        """What select() waits on."""
        return self._read.fileno()

    def set(self) -> None:
        """Wake the thread (from any thread; a wake-up already pending is enough, and after
        close() there is no thread to wake)."""
        with contextlib.suppress(OSError):
            self._write.send(b"\0")

    def clear(self) -> None:
        """Forget the wake-ups so far (the thread is awake and looks at everything)."""
        with contextlib.suppress(BlockingIOError):
            while self._read.recv(4096):
                pass

    def wait(self, timeout_s: float) -> None:
        """Sleep until set() or the timeout (no broker connection to watch meanwhile)."""
        select.select([self], [], [], max(0.0, timeout_s))
        self.clear()

    def close(self) -> None:
        """Close both ends."""
        self._read.close()
        self._write.close()


def network_step(client: paho.Client, waker: Waker, timeout_s: float) -> MQTTErrorCode:
    """Wait up to `timeout_s` for the broker's socket or the waker, then let paho read,
    write and keep the connection alive: paho's API for an application's own select loop
    (`loop_read`, `loop_write`, `loop_misc`), so an idle link sleeps instead of polling."""
    sock = client.socket()
    if sock is None:
        return paho.MQTT_ERR_NO_CONN
    # Bytes TLS already decrypted are not seen by select(): read them without waiting.
    buffered = bool(getattr(sock, "pending", lambda: 0)())
    try:
        fd = sock.fileno()
        writes = [fd] if client.want_write() else []
        wait_s = 0.0 if buffered else timeout_s
        readable, _, _ = select.select([fd, waker.fileno()], writes, [], wait_s)
    except (OSError, ValueError):  # the socket was closed under us: the connection is gone
        return paho.MQTT_ERR_CONN_LOST
    if waker.fileno() in readable:
        waker.clear()
    if buffered or fd in readable:
        rc = client.loop_read()
        if rc != paho.MQTT_ERR_SUCCESS:
            return rc
    if client.want_write():  # also what a callback published during the read
        rc = client.loop_write()
        if rc != paho.MQTT_ERR_SUCCESS:
            return rc
    return client.loop_misc()
