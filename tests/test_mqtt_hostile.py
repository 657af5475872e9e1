"""Messages and brokers that once stopped the daemon (issue 11), and events that made
automations act on the past (issue 12): a real Mosquitto, the daemon as a real process, and
paho as the hostile client."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from meraudiod.command_runner import QUEUE_SIZE

from .broker import Broker, Received, Subscriber
from .conftest import DEMO_TRUTH, cli, db_rows
from .mqtt_daemon import BASE, DEMO_PCM, finish, mqtt_env, request, start_daemon, stop_daemon


@pytest.fixture
def daemon(
    env: dict[str, str], broker: Broker
) -> Iterator[tuple[subprocess.Popen[bytes], Subscriber]]:
    """A running daemon (stdin source) online, and a subscriber to everything it says."""
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    proc = start_daemon(mqtt_env(env, broker))
    sub.wait_online(60)
    try:
        yield proc, sub
    finally:
        stop_daemon(proc)
        sub.close()


def hostile_client(broker: Broker) -> paho.Client:
    """A plain paho client, connected, with its network loop running."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="hostile")
    client.connect("127.0.0.1", broker.port, 30)
    client.loop_start()
    return client


def feed_demo(proc: subprocess.Popen[bytes]) -> None:
    """The five demo utterances into the daemon's stdin."""
    assert proc.stdin is not None
    proc.stdin.write(DEMO_PCM)
    proc.stdin.flush()


# --- issue 11 item 1 and the strict-types papercut ------------------------------------------


def test_crafted_payloads_get_clear_errors_and_the_daemon_stays(
    daemon: tuple[subprocess.Popen[bytes], Subscriber],
) -> None:
    proc, sub = daemon
    for command, payload, message in [
        ("status", b"[" * 5000 + b"]" * 5000, "nested deeper"),
        ("status", b'{"a": ' * 2000 + b"1" + b"}" * 2000, "nested deeper"),
        ("status", b'{"transaction": ' + b"1" * 5000 + b"}", "number over"),
        ("recordings/list", json.dumps({"limit": 10**40}), "number over"),
        ("status", b'{"x": NaN}', "not a number"),
        ("status", json.dumps({"transaction": True}), "transaction"),
        ("recordings/list", json.dumps({"limit": "5", "transaction": "s"}), "limit"),
        ("recordings/list", json.dumps({"limit": 5.0}), "limit"),
        ("recordings/get", json.dumps({"id": ["01M89D7G25TVATVQW1DF088EWQ"]}), "id"),
        ("recordings/list", json.dumps({"cursor": "zzz"}), "cursor"),
        ("purge", json.dumps({"older_than_days": "1"}), "allow_admin_commands"),
        # it queued nothing and said ok, where the CLI refuses (found by a new user)
        ("reprocess", json.dumps({"transaction": "p2"}), "reprocess needs ids or failed"),
    ]:
        reply = request(sub, command, payload)
        assert reply["status"] == "error" and message in reply["error"], (command, reply)
        assert proc.poll() is None, (command, payload[:40])
    # A lone surrogate escape is valid JSON but no text: a bad request, where it was an
    # "internal" error with a traceback in the log once it reached SQLite.
    for command, payload in [
        ("reprocess", b'{"ids": ["\\ud800"], "transaction": "u"}'),
        ("recordings/list", b'{"search": "ok", "speaker": "a\\udfff", "transaction": "u"}'),
    ]:
        reply = request(sub, command, payload)
        assert reply["code"] == "invalid_request" and "UTF-8" in reply["error"], reply
        assert reply["transaction"] == "u"
    # a transaction is echoed when the rest of the request is wrong
    assert (
        request(sub, "recordings/list", json.dumps({"limit": "5", "transaction": "s"}))[
            "transaction"
        ]
        == "s"
    )
    ok = request(sub, "recordings/list", json.dumps({"limit": 5, "transaction": 12345}))
    assert ok["status"] == "ok" and ok["transaction"] == 12345
    # brackets and digits inside strings are text, not nesting or numbers
    text = '\\"[{' * 40 + "1" * 100
    ok = request(sub, "recordings/list", json.dumps({"search": text[:200], "transaction": "q"}))
    assert ok["status"] == "ok" and ok["transaction"] == "q", ok


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_100_mb_request_does_not_reach_the_daemon(
    daemon: tuple[subprocess.Popen[bytes], Subscriber], broker: Broker
) -> None:
    # Each oversized request was received whole by paho, copied, queued and only then
    # refused: 100 MB messages took the daemon's peak memory up by about 380 MB, enough to
    # get a Pi's daemon killed. MQTT 5 lets the daemon tell the broker the largest packet it
    # takes; the broker drops bigger ones for it.
    proc, sub = daemon
    before_mb = peak_rss_mb(proc.pid)
    client = hostile_client(broker)
    try:
        for _ in range(3):
            client.publish(f"{BASE}/request/status", b" " * (100 << 20), qos=1).wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()
    assert request(sub, "status", "{}", timeout_s=30)["status"] == "ok"  # still answering
    assert proc.poll() is None
    assert peak_rss_mb(proc.pid) - before_mb < 50, (before_mb, peak_rss_mb(proc.pid))
    # over 16 KiB but within the packet limit: still answered, with the reason
    reply = request(sub, "status", b" " * (20 << 10))
    assert reply["status"] == "error" and "payload too large" in reply["error"], reply


def test_retained_requests_are_never_replayed(env: dict[str, str], broker: Broker) -> None:
    # A request published with retain (mosquitto_pub -r, or Home Assistant's mqtt.publish
    # with retain: true) was run again at every start and every reconnect: a retained purge
    # deleted the newest recordings each time, and a retained OFF muted the device again
    # after the owner had switched it back on.
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    stale = json.dumps({"transaction": "stale"})
    sub.publish(f"{BASE}/request/recordings/list", stale, retain=True)
    sub.publish(f"{BASE}/listening/set", "OFF", retain=True)
    proc = start_daemon(mqtt_env(env, broker))
    try:
        sub.wait_online(60)
        time.sleep(3)  # the retained messages reach the daemon as it subscribes
        fresh = request(sub, "status", json.dumps({"transaction": "fresh"}))
        assert fresh["data"]["listening"] is True, fresh  # the stale OFF was not obeyed
        replies = [m.json() for m in sub.on("/response/recordings/list")]
        assert not [r for r in replies if r["transaction"] == "stale"], replies
        # published live, even with the retain flag, a request is still answered once
        sub.publish(f"{BASE}/request/recordings/list", json.dumps({"transaction": "live"}), True)
        sub.wait_for(lambda: len(sub.on("/response/recordings/list")) >= 1, 20)
        replies = [m.json()["transaction"] for m in sub.on("/response/recordings/list")]
        assert replies == ["live"], replies
        # Clearing them (an empty retained message, `mosquitto_pub -r -n`) reaches the
        # daemon as an empty command: it was answered, and refused as a switch, a warning.
        sub.publish(f"{BASE}/request/recordings/list", "", retain=True)
        sub.publish(f"{BASE}/listening/set", "", retain=True)
        time.sleep(2)
        replies = [m.json()["transaction"] for m in sub.on("/response/recordings/list")]
        assert replies == ["live"], replies
        said = finish(proc)
        assert "wants ON or OFF" not in said, said
        assert f"empty message on {BASE}/listening/set ignored" in said, said
    finally:
        stop_daemon(proc)
        sub.publish(f"{BASE}/request/recordings/list", "", retain=True)  # clear them
        sub.publish(f"{BASE}/listening/set", "", retain=True)
        sub.close()


def test_commands_sent_while_the_daemon_was_away_are_never_run(
    env: dict[str, str], broker: Broker
) -> None:
    """The daemon's session outlives it (a persistent session): the broker queued the
    commands published while it was stopped, without retain, and handed them over at its
    next start, which obeyed them: an OFF from hours ago muted the device, a request was
    answered to nobody (found by a new user). They arrive before its subscriptions are
    acknowledged, so they are told from live ones and ignored, a line each."""
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    conf = mqtt_env(env, broker)
    proc = start_daemon(conf)
    try:
        sub.wait_online(60)
        finish(proc)  # stopped cleanly: its session stays with the broker
        sub.wait_for(lambda: sub.on(f"{BASE}/status")[-1].payload == b"offline", 10)
        sub.publish(f"{BASE}/listening/set", "OFF")
        sub.publish(f"{BASE}/request/recordings/list", json.dumps({"transaction": "away"}))
        with sub.lock:
            sub.messages.clear()
        proc = start_daemon(conf)
        sub.wait_online(60)
        time.sleep(3)  # anything the broker kept has reached the daemon
        fresh = request(sub, "status", json.dumps({"transaction": "fresh"}))
        assert fresh["data"]["listening"] is True, fresh  # the OFF from the past not obeyed
        replies = [m.json()["transaction"] for m in sub.on("/response/recordings/list")]
        assert replies == [], replies
        said = finish(proc)
    finally:
        stop_daemon(proc)
        sub.close()
    for topic in ("listening/set", "request/recordings/list"):
        assert f"{BASE}/{topic} sent while the daemon was away ignored" in said, said


def test_the_last_listening_switch_of_a_flood_is_obeyed(
    env: dict[str, str], broker: Broker
) -> None:
    # The switches wait in a bounded queue; a full one dropped the newest, so after a flood
    # the owner's last word (OFF: stop listening) could be the one lost.
    sub = Subscriber(broker.port, [f"{BASE}/response/#", f"{BASE}/status"])
    proc = start_daemon(mqtt_env(env, broker))
    client = hostile_client(broker)
    try:
        sub.wait_online(60)
        for last in ("OFF", "ON", "OFF"):
            for i in range(3000):
                client.publish(f"{BASE}/listening/set", "OFF" if i % 2 else "ON", qos=0)
            client.publish(f"{BASE}/listening/set", last, qos=1).wait_for_publish(30)
            time.sleep(5)  # the queue drains (a switch takes a few ms)
            state = request(sub, "status", "{}", timeout_s=60)["data"]
            assert state["listening"] is (last == "ON"), (last, state["listening"])
        finish(proc)
    finally:
        client.disconnect()
        client.loop_stop()
        stop_daemon(proc)
        sub.close()


def test_a_flood_of_switches_that_are_neither_on_nor_off_loses_no_real_one(
    daemon: tuple[subprocess.Popen[bytes], Subscriber], broker: Broker
) -> None:
    # Payloads that are no switch ("bogus") were queued for the main thread like real ones:
    # a flood of them pushed the owner's OFF out of the bounded queue (the oldest go), then
    # each was refused with a warning of its own (hundreds of log lines a second).
    proc, sub = daemon
    client = hostile_client(broker)
    try:
        for i in range(3000):
            client.publish(f"{BASE}/listening/set", f"bogus{i}" if i != 2000 else "OFF", qos=0)
        client.publish(f"{BASE}/listening/set", "bogus-last", qos=1).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()
    sub.wait_for(lambda: sub.on("/listening/state")[-1].payload == b"OFF", 30)
    time.sleep(2)  # what is still queued is handled
    assert request(sub, "status", "{}", timeout_s=60)["data"]["listening"] is False
    stderr = finish(proc)
    warnings = [line for line in stderr.splitlines() if "listening/set wants ON or OFF" in line]
    assert 1 <= len(warnings) <= 3, warnings[:5]


# --- issue 11 item 2 ------------------------------------------------------------------------


def test_request_topic_at_the_mqtt_limit_does_not_take_the_link_down(
    daemon: tuple[subprocess.Popen[bytes], Subscriber], broker: Broker
) -> None:
    proc, sub = daemon
    prefix = f"{BASE}/request/"
    topic = prefix + "x" * (65535 - len(prefix))  # MQTT's limit; its response topic: 1 byte over
    client = hostile_client(broker)
    try:
        client.publish(topic, b"{}", qos=1).wait_for_publish(10)
        client.publish(prefix + "y" * 60000, b"{}", qos=1).wait_for_publish(10)  # fits: answered
    finally:
        client.disconnect()
        client.loop_stop()

    def answers() -> list[Received]:  # the subscriber also sees the request itself
        return [m for m in sub.on("y" * 60000) if "/response/" in m.topic]

    sub.wait_for(answers, 20)
    assert answers()[-1].json()["status"] == "error"  # "unknown command", but answered
    # the link is still up: requests answered, events delivered
    assert request(sub, "status", "{}")["status"] == "ok"
    feed_demo(proc)
    sub.wait_for(lambda: len(sub.on("/event/transcript")) == len(DEMO_TRUTH), 90)
    stderr = finish(proc)
    assert "longer than MQTT allows" in stderr and "Traceback" not in stderr


# --- issue 11 item 3 ------------------------------------------------------------------------


def test_sigterm_with_400_queued_requests_stops_promptly_and_says_offline(
    env: dict[str, str], daemon: tuple[subprocess.Popen[bytes], Subscriber], broker: Broker
) -> None:
    proc, sub = daemon
    feed_demo(proc)
    sub.wait_for(lambda: len(sub.on("/event/transcript")) >= 2, 90)  # the pipeline is busy
    client = hostile_client(broker)
    try:
        infos = [client.publish(f"{BASE}/request/status", b"{}", qos=1) for _ in range(400)]
        for info in infos:
            info.wait_for_publish(30)
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        proc.wait(timeout=60)  # the old daemon blocked here forever (killed by the fixture)
        # The issue asks for 10 s; a little room for a machine shared by many test runs.
        assert time.monotonic() - stopped_at < 15
    finally:
        client.disconnect()
        client.loop_stop()
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    sub.wait_for(lambda: sub.on("/status")[-1].payload == b"offline", 10)
    replies = [m.json() for m in sub.on("/response/status")]
    assert any("busy" in (r["error"] or "") for r in replies)  # answered at once, not queued
    # the outbox was flushed on the way out: every transcript stored was delivered
    assert db_rows(env, "SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 0
    done = db_rows(env, "SELECT COUNT(*) AS n FROM recordings WHERE status='done'")[0]["n"]
    assert len(sub.on("/event/transcript")) == done


# --- issue 11 item 4 ------------------------------------------------------------------------


def test_request_flood_never_delays_transcript_events(env: dict[str, str], broker: Broker) -> None:
    # A year of files in the data directory: a `status` that walked it took a long time.
    clutter = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "clutter"
    clutter.mkdir(parents=True)
    for i in range(20000):
        (clutter / f"{i}.bin").write_bytes(b"x")
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    proc = start_daemon(mqtt_env(env, broker))
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        # Bursts far over the command queue (about 400 requests a second, as before): a
        # steady trickle could be answered as fast as it came on a loaded machine, so no
        # request met a full queue and the "busy" path went untested.
        client = hostile_client(broker)
        try:
            while flooding.is_set():
                for _ in range(4 * QUEUE_SIZE):
                    client.publish(f"{BASE}/request/status", b'{"transaction": "flood"}', qos=0)
                time.sleep(0.3)
        finally:
            client.disconnect()
            client.loop_stop()

    flooder = threading.Thread(target=flood, name="flood", daemon=True)
    try:
        sub.wait_online(60)
        flooder.start()
        sub.wait_for(lambda: len(sub.on("/response/status")) > 50, 60)
        feed_demo(proc)
        # every transcript arrives while the flood goes on (the old daemon: none did)
        sub.wait_for(lambda: len(sub.on("/event/transcript")) == len(DEMO_TRUTH), 120)
        replies = [m.json() for m in sub.on("/response/status")]
        busy = [r for r in replies if r["status"] == "error"]
        assert busy and all("busy" in r["error"] and r["transaction"] == "flood" for r in busy)
        answered = [r for r in replies if r["status"] == "ok"]
        assert answered and answered[-1]["data"]["disk_used_mb"] is None  # counters, no walk
        flooding.clear()
        flooder.join(10)
        finish(proc)
    finally:
        flooding.clear()
        flooder.join(10)
        stop_daemon(proc)
        sub.close()


# --- issue 11 item 12 -----------------------------------------------------------------------


def test_broker_that_never_answers_connect_is_reported(env: dict[str, str]) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP (the kernel does), never says a word
    port = silent.getsockname()[1]
    conf = {
        **env,
        "MERAUDIOD_MQTT__ENABLED": "true",
        "MERAUDIOD_MQTT__HOST": "127.0.0.1",
        "MERAUDIOD_MQTT__PORT": str(port),
    }
    proc = start_daemon(conf)
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("no CONNACK" in line for line in lines):
            time.sleep(0.2)
        assert any("no CONNACK after" in line for line in lines), lines
        while time.monotonic() < deadline:  # the heartbeat, every 5 s, says the same
            shown = cli("status", "--json", env=conf)
            mqtt = json.loads(shown.stdout).get("mqtt") or {}
            if "connecting" in (mqtt.get("error") or ""):
                break
            time.sleep(1)
        assert "connecting to 127.0.0.1" in mqtt["error"] and mqtt["connected"] is False
    finally:
        stop_daemon(proc)
        reader.join(5)
        silent.close()


def test_a_second_client_with_our_client_id_is_named(
    daemon: tuple[subprocess.Popen[bytes], Subscriber], broker: Broker
) -> None:
    """Found by hostile testing: two devices with the same node_id (a cloned SD card) take
    turns on the broker, each connect closing the other's connection, for ever; the log said
    only 'disconnected: Unspecified error'. After a few connections in a row lost within
    seconds it names the likely cause and the client id."""
    proc, _ = daemon
    twin = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="meraudiod-testnode", protocol=paho.MQTTv5
    )
    connects: list[float] = []
    twin.on_connect = lambda *_: connects.append(time.monotonic())
    twin.reconnect_delay_set(min_delay=1, max_delay=1)
    twin.connect("127.0.0.1", broker.port, 30)
    twin.loop_start()
    try:
        deadline = time.monotonic() + 90
        while len(connects) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(connects) >= 6, connects  # they took turns
    finally:
        twin.loop_stop()
        twin.disconnect()
    stderr = finish(proc)
    assert "is another client using the client id meraudiod-testnode" in stderr, stderr[-3000:]
