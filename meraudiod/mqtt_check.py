"""`meraudiod mqtt test`: the broker checked step by step (DNS, TCP, TLS, CONNECT, round trip)."""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as paho

from .config import Settings
from .mqtt_client import base_topic, make_client


def check_connection(settings: Settings, timeout_s: float = 10.0) -> list[tuple[str, bool, str]]:
    """`meraudiod mqtt test`: DNS, TCP, TLS, CONNECT, and a publish/subscribe round trip."""
    m = settings.mqtt
    steps: list[tuple[str, bool, str]] = []
    try:
        infos = socket.getaddrinfo(m.host, m.port, type=socket.SOCK_STREAM)
        steps.append(("dns", True, f"{m.host} -> {infos[0][4][0]}"))
    except OSError as exc:
        return [("dns", False, f"cannot resolve {m.host}: {exc}")]
    try:
        sock = socket.create_connection((m.host, m.port), timeout=timeout_s)
        steps.append(("tcp", True, f"connected to port {m.port}"))
    except OSError as exc:
        return [*steps, ("tcp", False, f"cannot connect to {m.host}:{m.port}: {exc}")]
    if m.tls:
        try:
            cafile = str(m.tls_ca_file) if m.tls_ca_file else None
            context = ssl.create_default_context(cafile=cafile)
            if m.tls_insecure:
                context.check_hostname = False
                if not m.tls_ca_file:
                    context.verify_mode = ssl.CERT_NONE
            if m.tls_cert_file:
                keyfile = str(m.tls_key_file) if m.tls_key_file else None
                context.load_cert_chain(str(m.tls_cert_file), keyfile)
            with context.wrap_socket(sock, server_hostname=m.host) as tls_sock:
                steps.append(("tls", True, f"{tls_sock.version()}"))
        except (ssl.SSLError, OSError) as exc:
            return [*steps, ("tls", False, f"TLS handshake failed: {exc}")]
    else:
        sock.close()
    result: dict[str, Any] = {}
    got = threading.Event()
    probe_id = f"meraudiod-test-{m.node_id}-{random.randrange(1 << 30)}"
    client = make_client(settings, client_id=probe_id)
    client.will_clear()  # a probe must not mark the device offline

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        result["connect"] = reason

    def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        result["message"] = msg.payload
        got.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(m.host, m.port, m.keepalive_s)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [*steps, ("connect", False, f"{exc}")]
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout_s
        while "connect" not in result and time.monotonic() < deadline:
            time.sleep(0.05)
        reason = result.get("connect")
        if reason is None or reason.is_failure:
            return [*steps, ("connect", False, f"refused: {reason or 'no answer'}")]
        steps.append(("connect", True, "accepted"))
        topic = f"{base_topic(settings)}/test/{random.randrange(1 << 30)}"
        client.subscribe(topic, qos=1)
        time.sleep(0.2)
        client.publish(topic, b"ping", qos=1)
        if got.wait(timeout_s) and result.get("message") == b"ping":
            steps.append(("roundtrip", True, "published and received"))
        else:
            steps.append(("roundtrip", False, "published but nothing came back (ACLs?)"))
    finally:
        client.disconnect()
        client.loop_stop()
    return steps
