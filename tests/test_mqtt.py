"""MQTT against a real Mosquitto, watched by a separate paho subscriber."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meraudiod.bench_listening import proc_value

from .broker import PASSWORD, USER, Broker, Subscriber
from .conftest import DEMO, DEMO_TRUTH, cli, run_daemon, status_json, wait_running
from .mqtt_daemon import (
    BASE,
    DEMO_PCM,
    DISCOVERY,
    NODE,
    finish,
    mqtt_env,
    request,
    start_daemon,
    stop_daemon,
)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_file_run_end_to_end(env: dict[str, str], broker: Broker, protocol: str) -> None:
    sub = Subscriber(broker.port, [f"{BASE}/#", "homeassistant/#"])
    result = cli(
        "run", "--source", "demo", env=mqtt_env(env, broker, MERAUDIOD_MQTT__PROTOCOL=protocol)
    )
    assert result.returncode == 0, result.stderr
    sub.wait_for(lambda: len(sub.on("/event/transcript")) == len(DEMO_TRUTH), 15)
    sub.wait_for(lambda: sub.on("/status") and sub.on("/status")[-1].payload == b"offline", 10)
    statuses = [m.payload for m in sub.on(f"{BASE}/status")]
    assert statuses[0] == b"online" and statuses[-1] == b"offline"

    assert [m for m in sub.messages if m.topic == DISCOVERY]
    # event/# first: a retained transcript would come before the config and state waited for
    late = Subscriber(broker.port, [f"{BASE}/event/#", DISCOVERY, f"{BASE}/state"])
    late.wait_for(lambda: late.on("/config") and late.on("/state"), 5)
    (discovery,) = late.on("/config")  # retained for Home Assistant, whenever it comes
    assert discovery.retain and late.on("/state")[-1].retain
    assert not late.on("/event/transcript")  # transcripts are never retained
    late.close()
    config = discovery.json()
    assert config["dev"]["ids"] == [f"meraudiod_{NODE}"] and config["o"]["name"] == "meraudiod"
    assert config["avty_t"] == f"{BASE}/status"
    platforms = {c["p"] for c in config["cmps"].values()}
    assert platforms == {"switch", "binary_sensor", "sensor", "event"}
    assert all("uniq_id" in c for c in config["cmps"].values())

    transcripts = [m.json() for m in sub.on("/event/transcript")]
    assert not any(m.retain for m in sub.on("/event/transcript"))
    for event, truth in zip(transcripts, DEMO_TRUTH, strict=True):
        assert event["schema"] == 1 and event["node_id"] == NODE and event["area"] == "kitchen"
        assert event["event_type"] == "transcript" and event["model"] == "tiny.en"
        assert event["segments"] and event["latency_ms"] > 0 and event["rtf"] > 0
        assert len(event["recording_id"]) == 26 and len(event["event_id"]) == 26
        said = set(re.findall(r"[a-z]+", event["text"].lower()))
        words = truth["text"].split()
        assert sum(w in said for w in words) >= 0.7 * len(words)  # tiny.en's slips allowed
    speech = [m.json() for m in sub.on("/event/speech")]
    assert [s["type"] for s in speech] == ["start", "end"] * len(DEMO_TRUTH)
    # no audio ever goes over MQTT: every payload is short text
    assert all(len(m.payload) < 20000 for m in sub.messages)
    state = sub.on(f"{BASE}/state")
    assert state and "queue_depth" in state[-1].json()
    sub.close()


def test_commands_listening_and_bad_payloads(env: dict[str, str], broker: Broker) -> None:
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    proc = start_daemon(mqtt_env(env, broker))
    try:
        sub.wait_online(60)
        assert proc.stdin is not None
        proc.stdin.write(DEMO_PCM)
        proc.stdin.flush()
        sub.wait_for(lambda: len(sub.on("/event/transcript")) == len(DEMO_TRUTH), 60)

        ok = request(sub, "status", json.dumps({"transaction": "t-1"}))
        assert ok["status"] == "ok" and ok["transaction"] == "t-1"
        assert ok["data"]["running"] and ok["data"]["listening"] is True

        listed = request(sub, "recordings/list", json.dumps({"transaction": 7, "limit": 2}))
        assert listed["status"] == "ok" and listed["transaction"] == 7 and len(listed["data"]) == 2
        rec_id = listed["data"][0]["id"]
        got = request(sub, "recordings/get", json.dumps({"id": rec_id}))
        assert got["data"]["id"] == rec_id and got["data"]["segments"]
        # where the file lives is the device's business, as over HTTP (paths: admin only)
        assert "audio_path" not in got["data"] and b"/audio/" not in sub.on("/get")[-1].payload
        searched = request(sub, "recordings/list", json.dumps({"search": "amiable"}))
        assert len(searched["data"]) == 2
        assert request(sub, "speakers/list", "{}")["data"] == []
        config = request(sub, "config/get", "{}")  # broker host, user, paths: admin only
        assert config["status"] == "error" and "allow_admin_commands" in config["error"]
        assert config["data"] is None

        for command, payload, message in [
            ("status", b"{not json", "not valid JSON"),
            ("status", b"[1, 2]", "JSON object"),
            ("status", b"\xff\xfe", "not valid JSON"),
            ("recordings/list", json.dumps({"limit": "many", "transaction": "t-2"}), "limit"),
            ("recordings/list", json.dumps({"colour": "red"}), "colour"),
            ("recordings/get", json.dumps({"id": 42}), "id"),
            ("launch/rockets", "{}", "unknown command"),
            ("status", "x" * 20000, "too large"),
            ("recordings/delete", json.dumps({"ids": [rec_id]}), "allow_admin_commands"),
            ("purge", json.dumps({"older_than_days": 1}), "allow_admin_commands"),
            (
                "speakers/enroll",
                json.dumps({"name": "X", "recording_ids": [rec_id]}),
                "allow_admin",
            ),
        ]:
            reply = request(sub, command, payload)
            assert reply["status"] == "error" and message in reply["error"], (command, reply)
        assert (
            request(sub, "recordings/list", json.dumps({"limit": "x", "transaction": "t-2"}))[
                "transaction"
            ]
            == "t-2"
        )
        # nothing changed, and the daemon is still here
        assert len(request(sub, "recordings/list", "{}")["data"]) == len(DEMO_TRUTH)
        assert proc.poll() is None

        sub.publish(f"{BASE}/listening/set", "OFF")
        sub.wait_for(lambda: sub.on("/listening/state")[-1].payload == b"OFF", 10)
        late = Subscriber(broker.port, [f"{BASE}/listening/state"])
        late.wait_for(lambda: late.on("/listening/state"), 5)
        assert late.on("/listening/state")[-1].payload == b"OFF"
        assert late.on("/listening/state")[-1].retain
        late.close()
        assert request(sub, "status", "{}")["data"]["listening"] is False
        sub.wait_for(lambda: sub.on(f"{BASE}/state")[-1].json()["listening"] is False, 10)
        sub.publish(f"{BASE}/listening/set", "ON")
        sub.wait_for(lambda: sub.on("/listening/state")[-1].payload == b"ON", 10)
    finally:
        finish(proc)
        sub.close()


def test_admin_commands_when_allowed(env: dict[str, str], broker: Broker) -> None:
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    # The HTTP token is set (the stage off): a secret config/get must leave out, as it does
    # the broker's password. It was sent, on a topic every subscriber of the broker can read.
    proc = start_daemon(
        mqtt_env(
            env,
            broker,
            MERAUDIOD_MQTT__ALLOW_ADMIN_COMMANDS="true",
            MERAUDIOD_HTTP__TOKEN="http-token-never-published",
        )
    )
    try:
        sub.wait_online(60)
        assert proc.stdin is not None
        proc.stdin.write(DEMO_PCM)
        proc.stdin.flush()
        sub.wait_for(lambda: len(sub.on("/event/transcript")) == len(DEMO_TRUTH), 60)
        ids = [r["id"] for r in request(sub, "recordings/list", "{}")["data"]]
        config = request(sub, "config/get", "{}")
        assert config["status"] == "ok" and config["data"]["mqtt"]["host"] == "127.0.0.1"
        assert "password" not in config["data"]["mqtt"]
        assert "token" not in config["data"]["http"]
        assert b"http-token-never-published" not in sub.on("/response/config/get")[-1].payload
        deleted = request(sub, "recordings/delete", json.dumps({"ids": ids[:2]}))
        assert deleted["data"] == {"deleted": 2, "missing": 0, "missing_ids": []}
        again = request(sub, "reprocess", json.dumps({"ids": ids[2:3]}))
        assert again["data"] == {"queued": 1, "skipped": []}
        sub.wait_for(lambda: len(sub.on("/event/transcript")) == len(DEMO_TRUTH) + 1, 30)
        purged = request(
            sub, "purge", json.dumps({"start": "2000-01-01T00:00", "end": "2100-01-01T00:00"})
        )
        assert purged["data"]["recordings_deleted"] == len(DEMO_TRUTH) - 2
        assert request(sub, "recordings/list", "{}")["data"] == []
    finally:
        finish(proc)
        sub.close()


@pytest.fixture
def running_daemon(
    env: dict[str, str], broker: Broker
) -> Iterator[tuple[subprocess.Popen[bytes], Subscriber]]:
    sub = Subscriber(broker.port, [f"{BASE}/response/#", f"{BASE}/status"])
    proc = start_daemon(mqtt_env(env, broker))
    sub.wait_online(60)
    yield proc, sub
    finish(proc)
    sub.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.sampled_from(
        ["status", "recordings/list", "recordings/get", "purge", "nope", "config/get"]
    ),
    payload=st.one_of(
        st.binary(min_size=1, max_size=300),  # an empty message is no command (test_mqtt_hostile)
        st.dictionaries(
            st.text(max_size=10),
            st.one_of(
                st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3)
            ),
            max_size=4,
        ).map(json.dumps),
    ),
)
def test_fuzzed_payloads_never_crash_the_daemon(
    running_daemon: tuple[subprocess.Popen[bytes], Subscriber], command: str, payload: bytes | str
) -> None:
    proc, sub = running_daemon
    reply = request(sub, command, payload)
    assert reply["status"] in ("ok", "error")
    assert proc.poll() is None


def test_killed_daemon_leaves_its_last_will(env: dict[str, str], broker: Broker) -> None:
    sub = Subscriber(broker.port, [f"{BASE}/status"])
    proc = start_daemon(mqtt_env(env, broker))
    sub.wait_for(lambda: sub.on("/status") and sub.on("/status")[-1].payload == b"online", 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    sub.wait_for(lambda: sub.on("/status")[-1].payload == b"offline", 10)
    late = Subscriber(broker.port, [f"{BASE}/status"])  # retained for whoever comes later
    late.wait_for(lambda: late.on("/status"), 5)
    assert late.on("/status")[-1].payload == b"offline" and late.on("/status")[-1].retain
    sub.close()
    late.close()


def test_broker_outage_loses_nothing_and_keeps_order(env: dict[str, str], tmp_path: Path) -> None:
    # The subscriber's session outlives the broker's restart, as a real consumer's does:
    # whichever of it and the daemon reconnects first, nothing published is missed by it.
    broker = Broker(tmp_path / "persistent-broker", persistent=True)
    broker.start()
    sub = Subscriber(broker.port, [f"{BASE}/event/transcript", f"{BASE}/status"], persistent=True)
    proc = start_daemon(mqtt_env(env, broker))
    try:
        # Connected first, so that this is an outage and not a broker that was never there.
        sub.wait_online(120)
        broker.stop()  # down before anyone speaks
        deadline = time.monotonic() + 60
        while True:  # the daemon has noticed (its heartbeat says so)
            state = status_json(env)
            if state["mqtt"] and state["mqtt"]["connected"] is False:
                break
            assert time.monotonic() < deadline, f"the outage went unnoticed: {state['mqtt']}"
            time.sleep(0.5)
        assert proc.stdin is not None
        proc.stdin.write(DEMO_PCM)
        proc.stdin.flush()
        db = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # everything transcribed while the broker is down
            done = subprocess.run(
                ["sqlite3", str(db), "SELECT COUNT(*) FROM recordings WHERE status='done'"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if done == str(len(DEMO_TRUTH)):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"only {done} recordings transcribed during the outage")
        broker.start()
        sub.wait_for(lambda: len(sub.on("/event/transcript")) >= len(DEMO_TRUTH), 90)
        time.sleep(1.0)
    finally:
        finish(proc)
        broker.stop()
    events = [m.json() for m in sub.on("/event/transcript")]
    assert len(events) == len(DEMO_TRUTH)
    assert [e["recording_id"] for e in events] == sorted(e["recording_id"] for e in events)
    assert all(e["replayed"] for e in events)
    sub.close()


def test_broker_absent_at_start(env: dict[str, str], broker: Broker) -> None:
    broker.stop()
    proc = start_daemon(mqtt_env(env, broker))
    try:
        time.sleep(3.0)
        assert proc.poll() is None  # no broker is not a reason to die
        broker.start()
        sub = Subscriber(broker.port, [f"{BASE}/status"])
        sub.wait_online(90)
        sub.close()
    finally:
        finish(proc)


def tls_env(env: dict[str, str], broker: Broker, **secret: str) -> dict[str, str]:
    """The daemon's environment for the broker's TLS port as USER, with `secret` (the
    password or its file)."""
    return mqtt_env(
        env,
        broker,
        MERAUDIOD_MQTT__PORT=str(broker.tls_port),
        MERAUDIOD_MQTT__HOST="localhost",
        MERAUDIOD_MQTT__TLS="true",
        MERAUDIOD_MQTT__TLS_CA_FILE=str(broker.folder / "ca.crt"),
        MERAUDIOD_MQTT__USERNAME=USER,
        **secret,
    )


def test_password_and_tls(env: dict[str, str], broker: Broker, tmp_path: Path) -> None:
    secure = tls_env(env, broker, MERAUDIOD_MQTT__PASSWORD=PASSWORD)
    good = cli("mqtt", "test", env=secure, timeout_s=60)
    assert good.returncode == 0, good.stdout + good.stderr
    for step in ("dns", "tcp", "tls", "connect", "roundtrip"):
        assert f"{step}" in good.stdout
    assert PASSWORD not in good.stdout + good.stderr

    wrong = cli("mqtt", "test", env={**secure, "MERAUDIOD_MQTT__PASSWORD": "nope"}, timeout_s=60)
    assert wrong.returncode != 0 and "step connect" in wrong.stderr

    other_ca = tmp_path / "other"
    other_ca.mkdir()
    from .broker import make_certificates

    make_certificates(other_ca)
    untrusted = cli(
        "mqtt",
        "test",
        env={**secure, "MERAUDIOD_MQTT__TLS_CA_FILE": str(other_ca / "ca.crt")},
        timeout_s=60,
    )
    assert untrusted.returncode != 0 and "step tls" in untrusted.stderr
    closed = cli("mqtt", "test", env={**secure, "MERAUDIOD_MQTT__PORT": "1"}, timeout_s=60)
    assert closed.returncode != 0 and "step tcp" in closed.stderr

    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    by_file = {**secure, "MERAUDIOD_MQTT__PASSWORD_FILE": str(password_file)}
    del by_file["MERAUDIOD_MQTT__PASSWORD"]
    sub = Subscriber(broker.port, [f"{BASE}/event/transcript"])  # anonymous listener: same broker
    result = cli("run", "--source", f"file:{DEMO}", env=by_file)
    assert result.returncode == 0, result.stderr
    sub.wait_for(lambda: len(sub.on("/event/transcript")) == len(DEMO_TRUTH), 20)
    assert PASSWORD not in result.stderr
    sub.close()


def test_secret_files_saved_with_a_byte_order_mark(
    env: dict[str, str], broker: Broker, tmp_path: Path
) -> None:
    # A password file saved by Notepad starts with a byte order mark, which no editor shows:
    # it was sent as part of the password, and the broker said "not authorised" to the
    # right password.
    password_file = tmp_path / "pw"
    password_file.write_bytes(b"\xef\xbb\xbf" + PASSWORD.encode() + b"\r\n")
    secure = tls_env(env, broker, MERAUDIOD_MQTT__PASSWORD_FILE=str(password_file))
    result = cli("mqtt", "test", env=secure, timeout_s=60)
    assert result.returncode == 0, result.stdout + result.stderr


def wakeups(pid: int) -> int:
    """The voluntary context switches of a process's threads so far: each a wait that ended."""
    return sum(
        proc_value(pid, f"task/{task.name}/status", "voluntary_ctxt_switches")
        for task in Path(f"/proc/{pid}/task").glob("*")
    )


def test_an_idle_link_wakes_the_daemon_no_more_than_no_link(
    env: dict[str, str], broker: Broker, tmp_path: Path
) -> None:
    """The MQTT thread waits on the broker's socket and its own wake-up, never a 0.1 s poll:
    a daemon idling with MQTT on wakes (voluntary context switches of all its threads, read
    from /proc: the involuntary ones count the other work on the machine) hardly more often
    than the same daemon with MQTT off beside it."""
    off_env = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "mqtt-off")}
    on_env = mqtt_env(env, broker)
    sub = Subscriber(broker.port, [f"{BASE}/status"])
    off = run_daemon(off_env, stderr=subprocess.DEVNULL)
    on = run_daemon(on_env, stderr=subprocess.DEVNULL)
    try:
        wait_running(off_env, off)
        wait_running(on_env, on)
        sub.wait_online(60)
        time.sleep(2)  # the retained state and discovery have gone out
        before = [(time.monotonic(), wakeups(proc.pid)) for proc in (off, on)]
        time.sleep(8)
        after = [(time.monotonic(), wakeups(proc.pid)) for proc in (off, on)]
    finally:
        stop_daemon(off)
        stop_daemon(on)
        sub.close()
    off_rate, on_rate = ((a[1] - b[1]) / (a[0] - b[0]) for b, a in zip(before, after, strict=True))
    assert off_rate > 0 and on_rate - off_rate < 1, (off_rate, on_rate)
