"""The daemon as a real subprocess with MQTT on (reading PCM from its stdin), and a request
over the broker, for the MQTT tests."""

from __future__ import annotations

import subprocess
from typing import Any

from meraudiod.audio import decode_file

from .broker import Broker, Subscriber
from .conftest import DEMO, run_daemon

NODE = "testnode"
BASE = f"meraudiod/{NODE}"
DISCOVERY = f"homeassistant/device/meraudiod_{NODE}/config"
DEMO_PCM = decode_file(DEMO).astype("<i2").tobytes()


def mqtt_env(env: dict[str, str], broker: Broker, **extra: str) -> dict[str, str]:
    """The `env` fixture plus MQTT on, pointed at the broker."""
    values = {
        "MERAUDIOD_MQTT__ENABLED": "true",
        "MERAUDIOD_MQTT__HOST": "127.0.0.1",
        "MERAUDIOD_MQTT__PORT": str(broker.port),
        "MERAUDIOD_MQTT__NODE_ID": NODE,
        "MERAUDIOD_MQTT__AREA": "kitchen",
    }
    return {**env, **values, **extra}


def start_daemon(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """`meraudiod run --source stdin` as a process; feed it PCM on stdin."""
    return run_daemon(env, *args, stdout=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes]) -> str:
    """End of input: the daemon must exit 0; its stderr."""
    assert proc.stdin is not None
    proc.stdin.close()
    stderr = proc.stderr.read() if proc.stderr else b""
    proc.wait(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    return stderr.decode()


def request(sub: Subscriber, command: str, payload: bytes | str, timeout_s: float = 10) -> Any:
    """Publish a request and wait for its response (the subscriber must see response/#)."""
    before = len(sub.on(f"/response/{command}"))
    sub.publish(f"{BASE}/request/{command}", payload)
    sub.wait_for(lambda: len(sub.on(f"/response/{command}")) > before, timeout_s)
    return sub.on(f"/response/{command}")[-1].json()


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """Teardown after a failure: end of input, then a kill if it does not stop (a daemon that
    ignores its end must not outlive the test, nor make the test wait forever)."""
    if proc.poll() is not None:
        return
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
