"""The paho client as meraudiod builds it: base topic, credentials, TLS, last will, and the
first CONNECT (with a persistent session)."""

from __future__ import annotations

import ssl
from typing import Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .config import Settings

_SESSION_EXPIRY_S: Final = 24 * 3600


def base_topic(settings: Settings) -> str:
    """<base_topic>/<node_id>."""
    return f"{settings.mqtt.base_topic.rstrip('/')}/{settings.mqtt.node_id}"


def read_password(settings: Settings) -> str | None:
    """The broker password, from the environment/config or its file (never logged)."""
    m = settings.mqtt
    if m.password_file is not None:
        return m.password_file.read_text(encoding="utf-8").strip()
    return m.password


def make_client(settings: Settings, client_id: str | None = None) -> paho.Client:
    """A paho client with our protocol, credentials, TLS and will."""
    m = settings.mqtt
    v5 = m.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"meraudiod-{m.node_id}",
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
    client.connect(m.host, m.port, m.keepalive_s, clean_start=False, properties=props)
