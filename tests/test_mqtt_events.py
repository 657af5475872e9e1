"""Events an automation can trust (issue 12): a reprocessed recording is not news, an outage
replays no stale state, the outbox drops transcripts last, and Home Assistant sees one rule
for voices. A real Mosquitto, the daemon as a real process, real SQLite files."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import soundfile

from meraudiod.config import Settings
from meraudiod.daemon import Daemon
from meraudiod.db import get_kv, open_db
from meraudiod.messages import Outgoing, SpeechEvent, TranscriptEvent, enqueue, unpack_payload
from meraudiod.mqtt import MqttLink
from meraudiod.sources import open_source

from .broker import Broker, Subscriber
from .conftest import DEMO_TRUTH, TEST_DATA, cli, db_rows, wait_for
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

STRANGER = TEST_DATA / "ls_1034_0000.flac"  # a voice nobody enrolled


def online(sub: Subscriber) -> bool:
    statuses = sub.on(f"{BASE}/status")
    return bool(statuses) and statuses[-1].payload == b"online"


def feed_demo(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(DEMO_PCM)
    proc.stdin.flush()


def by_type(sub: Subscriber, event_type: str) -> list[dict[str, object]]:
    events = [m.json() for m in sub.on("/event/transcript")]
    return [e for e in events if e["event_type"] == event_type]


def test_reprocess_does_not_fire_a_transcript_automation(
    env: dict[str, str], broker: Broker
) -> None:
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    proc = start_daemon(mqtt_env(env, broker, MERAUDIOD_MQTT__ALLOW_ADMIN_COMMANDS="true"))
    try:
        sub.wait_for(lambda: online(sub), 60)
        feed_demo(proc)
        sub.wait_for(lambda: len(by_type(sub, "transcript")) == len(DEMO_TRUTH), 90)
        originals = {e["recording_id"]: e for e in by_type(sub, "transcript")}
        newest = max(originals)
        # The newest's text, not only its time: a replay faster than real time stamps several
        # recordings alike, and the state of the one before could pass for it (seen in CI).
        sub.wait_for(
            lambda: (
                sub.on(f"{BASE}/state")[-1].json()["last_transcript_full"]
                == originals[newest]["text"]
            ),
            40,
        )
        states_before = len(sub.on(f"{BASE}/state"))
        last = sub.on(f"{BASE}/state")[-1].json()
        oldest = min(originals)
        queued = request(sub, "reprocess", json.dumps({"ids": [oldest, newest]}))
        assert queued["data"] == {"queued": 2, "skipped": []}
        sub.wait_for(lambda: len(by_type(sub, "retranscribed")) == 2, 90)
        finish(proc)
    finally:
        stop_daemon(proc)
    # An automation keyed on event_type "transcript" fired once per utterance, never again.
    assert len(by_type(sub, "transcript")) == len(DEMO_TRUTH)
    for again in by_type(sub, "retranscribed"):
        first = originals[str(again["recording_id"])]
        assert again["started_at"] == first["started_at"]  # the original time
        assert again["ended_at"] == first["ended_at"] and again["text"]
    # ... and the state's last transcript stayed what it was, while waiting and after.
    for message in sub.on(f"{BASE}/state")[states_before:]:
        state = message.json()
        assert state["last_transcript"] == last["last_transcript"]
        assert state["last_transcript_at"] == last["last_transcript_at"]
    sub.close()


def test_outage_replays_no_stale_state_and_no_speech_and_keeps_transcripts(
    env: dict[str, str], tmp_path: Path
) -> None:
    # A consumer whose session outlives the broker's restart: whichever of it and the daemon
    # reconnects first, it misses nothing the daemon sends afterwards (QoS 0 included).
    broker = Broker(tmp_path / "persistent-broker", persistent=True, queue_qos0=True)
    broker.start()
    conf = mqtt_env(env, broker, MERAUDIOD_MQTT__OUTBOX_MAX_ROWS="10")
    late = Subscriber(broker.port, [f"{BASE}/#"], persistent=True)
    proc = start_daemon(conf)
    try:
        late.wait_for(lambda: online(late), 60)
        broker.stop()

        def noticed() -> bool:  # the daemon has noticed (its heartbeat says so)
            shown = json.loads(cli("status", "--json", env=conf).stdout)
            return bool(shown["mqtt"]) and not shown["mqtt"]["connected"]

        wait_for(noticed, 30, "the daemon to see the broker gone", poll_s=0.5)
        feed_demo(proc)
        most_rows = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the bound holds at every moment, not every minute
            most_rows = max(most_rows, db_rows(env, "SELECT COUNT(*) AS n FROM outbox")[0]["n"])
            done = db_rows(env, "SELECT COUNT(*) AS n FROM recordings WHERE status='done'")
            if done[0]["n"] == len(DEMO_TRUTH):
                break
            time.sleep(0.1)
        assert 0 < most_rows <= 10
        with late.lock:  # what came before the outage is not under test
            late.messages.clear()
        broker.start()
        late.wait_for(lambda: len(late.on("/event/transcript")) == len(DEMO_TRUTH), 120)
        late.wait_for(lambda: late.on(f"{BASE}/state"), 30)
        finish(proc)  # the last state, then offline
    finally:
        stop_daemon(proc)
    late.wait_for(lambda: late.on(f"{BASE}/status")[-1].payload == b"offline", 10)
    broker.stop()
    transcripts = [m.json() for m in late.on("/event/transcript")]
    assert all(t["replayed"] for t in transcripts)  # none dropped, in order, marked late
    assert [t["recording_id"] for t in transcripts] == sorted(
        t["recording_id"] for t in transcripts
    )
    assert not late.on("/event/speech")  # "someone is speaking", an outage ago: not news
    newest = max(transcripts, key=lambda t: str(t["recording_id"]))
    # Only the latest state, never a snapshot of the past. (A state from before the outage,
    # with no transcript yet, may come back from the persistent broker's own retained store.)
    # By text too: stdin read faster than real time may stamp several recordings alike.
    states = [m.json() for m in late.on(f"{BASE}/state")]
    shown = [(st["last_transcript_at"], st["last_transcript_full"]) for st in states]
    assert (newest["started_at"], newest["text"]) in shown, shown
    assert set(shown) <= {(None, None), (newest["started_at"], newest["text"])}, shown
    late.close()


def test_outbox_drops_speech_before_transcripts_at_every_insert(tmp_path: Path) -> None:
    conn = open_db(tmp_path / "outbox.db")
    try:
        for i in range(5):
            conn.execute("BEGIN IMMEDIATE")
            enqueue(conn, TranscriptEvent(node_id="n", area="", text=f"t{i}"), max_rows=10)
            conn.execute("COMMIT")
            for kind in ("start", "end", "start", "end"):
                conn.execute("BEGIN IMMEDIATE")
                enqueue(conn, SpeechEvent(node_id="n", area="", type=kind), max_rows=10)
                conn.execute("COMMIT")
                assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] <= 10
        rows = conn.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
        texts = [
            unpack_payload(r["payload"])["text"] for r in rows if r["topic"] == "event/transcript"
        ]
        assert texts == [f"t{i}" for i in range(5)]  # every transcript kept, in order
        assert len(rows) == 10 and get_kv(conn, "outbox_dropped", "0") == "15"
    finally:
        conn.close()


def test_home_assistant_discovery_qos_and_unknown_before_first_transcript(
    env: dict[str, str], broker: Broker
) -> None:
    sub = Subscriber(broker.port, [f"{BASE}/#", DISCOVERY])
    proc = start_daemon(mqtt_env(env, broker))
    try:
        sub.wait_for(lambda: online(sub) and sub.on(f"{BASE}/state"), 60)
        (discovery,) = sub.on(DISCOVERY)
        components = discovery.json()["cmps"]
        # HA <= 2026.5 ignores the device-level qos: each component carries its own.
        assert components and all(c.get("qos") == 1 for c in components.values())
        assert "retranscribed" in components["transcript"]["evt_typ"]
        state = sub.on(f"{BASE}/state")[-1].json()
        assert state["last_transcript"] is None and state["last_speaker"] is None  # "unknown"
        assert state["last_transcript_full"] is None
        finish(proc)
    finally:
        stop_daemon(proc)
        sub.close()


def test_a_provisional_voice_has_one_name_everywhere(
    env: dict[str, str], broker: Broker, speaker_models: Path
) -> None:
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    conf = mqtt_env(env, broker, MERAUDIOD_SPEAKERS__ENABLED="true")
    result = cli("run", "--source", f"file:{STRANGER}", env=conf, timeout_s=300)
    assert result.returncode == 0, result.stderr
    sub.wait_for(lambda: sub.on(f"{BASE}/status")[-1].payload == b"offline", 30)
    (profile,) = db_rows(env, "SELECT name, provisional FROM speakers")
    assert profile["provisional"] and profile["name"].startswith("unknown-")
    speakers = [m.json() for m in sub.on("/event/speaker")]
    grouped = [e for e in speakers if e["speaker_id"] is not None]
    assert grouped and all(e["event_type"] == "unknown" for e in speakers)
    for event in grouped:  # the label the Last speaker sensor shows, not null
        assert event["name"] == profile["name"] and event["provisional"] is True
    for event in speakers:  # too little speech to group: no profile, no name
        if event["speaker_id"] is None:
            assert event["name"] is None and event["provisional"] is False
    segments = [s for m in sub.on("/event/transcript") for s in m.json()["segments"]]
    speakers_of = [s["speaker"] for s in segments if s["speaker"] is not None]
    voiced = [v for v in speakers_of if v["id"] is not None]
    assert voiced and all(v["name"] == profile["name"] and v["provisional"] is True for v in voiced)
    for v in speakers_of:  # a local label with no profile: no name, not provisional
        assert v["label"] and (v["id"] is not None or (v["name"] is None and not v["provisional"]))
    state = sub.on(f"{BASE}/state")[-1].json()
    assert state["last_speaker"] == profile["name"] and state["last_speaker_provisional"] is True
    sub.close()


def test_an_event_an_older_version_stored_as_text_is_still_delivered(
    env: dict[str, str], broker: Broker, tmp_path: Path
) -> None:
    """Events are stored deflated now; a row an older version left in the outbox as JSON
    text goes out as it was, beside a new one."""
    old = TranscriptEvent(node_id=NODE, area="kitchen", text="said before the upgrade")
    conn = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    conn.execute(
        "INSERT INTO outbox (topic, payload, qos, created_at) VALUES (?, ?, 1, ?)",
        (old.topic, json.dumps(old.to_payload()), time.time()),
    )
    conn.execute("BEGIN IMMEDIATE")
    enqueue(conn, TranscriptEvent(node_id=NODE, area="kitchen", text="said after it"))
    conn.execute("COMMIT")
    conn.close()
    sub = Subscriber(broker.port, [f"{BASE}/event/transcript"])
    quiet = tmp_path / "silence.wav"
    soundfile.write(quiet, np.zeros(16000, dtype=np.int16), 16000)
    result = cli("run", "--source", f"file:{quiet}", env=mqtt_env(env, broker))
    assert result.returncode == 0, result.stderr
    sub.wait_for(lambda: len(sub.on("/event/transcript")) == 2, 30)
    got = [m.json() for m in sub.on("/event/transcript")]
    assert [e["text"] for e in got] == ["said before the upgrade", "said after it"]
    assert got[0]["event_id"] == old.event_id
    assert not db_rows(env, "SELECT id FROM outbox")
    sub.close()


def test_a_speech_event_made_before_an_outage_is_not_sent_after_it(
    settings: Settings, tmp_path: Path
) -> None:
    """`event/speech` goes straight to the link, not through the outbox: one made before an
    outage and still waiting when the broker comes back is dropped (news of the past), one
    made after goes out. The link runs on its own thread against a real broker; the
    subscriber's session (QoS 0 queued too) outlives the broker's restart, so whichever of
    it and the link reconnects first, it gets everything the link sends afterwards."""
    broker = Broker(tmp_path / "persistent-broker", persistent=True, queue_qos0=True)
    broker.start()
    settings.mqtt.enabled, settings.mqtt.host, settings.mqtt.port = True, "127.0.0.1", broker.port
    settings.mqtt.node_id = NODE
    sub = Subscriber(broker.port, [f"{BASE}/event/speech"], persistent=True)
    stop = threading.Event()
    link = MqttLink(settings, stop, queue.Queue(), None)
    link.start()
    try:
        wait_for(lambda: link.online, 30, "the link online")
        link.send(Outgoing.live(SpeechEvent(node_id=NODE, area="", type="start")))
        sub.wait_for(lambda: sub.on("/event/speech"), 10)  # while connected: sent at once
        broker.stop()
        wait_for(lambda: link.cut_off, 30, "the link to notice the outage")
        link.send(Outgoing.live(SpeechEvent(node_id=NODE, area="", type="end")))
        time.sleep(4)  # failed attempts: the link's backoff grows past a second
        broker.start()
        wait_for(lambda: link.online, 60, "the link back online")
        link.send(Outgoing.live(SpeechEvent(node_id=NODE, area="", type="start")))
        sub.wait_for(lambda: len(sub.on("/event/speech")) >= 2, 30)
        time.sleep(1)  # anything else the link would send has arrived by now
    finally:
        stop.set()
        link.join(30)
        sub.close()
        broker.stop()
    assert [m.json()["type"] for m in sub.on("/event/speech")] == ["start", "start"]


def test_a_reconnect_sends_no_state_older_than_the_last_transcript(
    settings: Settings, tmp_path: Path
) -> None:
    """The retained state is computed by the daemon's main loop. A transcript stored, then
    the broker restarted before the loop had run again: the link republished the state as
    last computed, without that transcript (seen once in CI, the machine loaded). A stored
    transcript now takes the old state off the link; the loop's next pass sends the new one.
    The daemon runs in this process with its main loop held back, the broker is real."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    settings.mqtt.enabled, settings.mqtt.host, settings.mqtt.port = True, "127.0.0.1", broker.port
    settings.mqtt.node_id = NODE
    settings.audio.source = f"file:{TEST_DATA / 'ls_103_0000.flac'}"
    daemon = Daemon(settings, open_source(settings.audio.source, settings.audio), threading.Event())
    try:
        daemon.start()
        daemon.surfaces.publish_state()  # as the loop's first pass does
        link = daemon.surfaces.mqtt
        wait_for(lambda: link.online, 30, "the link online")
        conn = open_db(settings.storage.db_path)
        wait_for(
            lambda: [r[0] for r in conn.execute("SELECT status FROM recordings")] == ["done"],
            120,
            "the recording transcribed",
        )
        broker.stop()
        wait_for(lambda: link.cut_off, 30, "the link to notice the outage")
        broker.start()  # its retained store empty: what it has, the link sent
        wait_for(lambda: link.online, 60, "the link back online")
        sub = Subscriber(broker.port, [f"{BASE}/state"])  # subscribed once it returns
        time.sleep(1)
        stale = [m.json() for m in sub.on(f"{BASE}/state")]
        daemon.surfaces.publish_state()  # the loop's next pass
        sub.wait_for(lambda: len(sub.on(f"{BASE}/state")) > len(stale), 10)
        sub.close()
    finally:
        daemon.stop()
        broker.stop()
    assert stale == [], stale
    (fresh,) = [m.json() for m in sub.on(f"{BASE}/state")]
    assert "rachel" in str(fresh["last_transcript_full"]).lower(), fresh


def test_the_last_state_counts_the_outbox_as_the_stop_left_it(
    env: dict[str, str], broker: Broker
) -> None:
    """The state said before `offline` was computed before the outbox was delivered and its
    delivered rows deleted: a file run that ended showed `outbox_depth: 8` for good, where
    `status` said 0 (found by a new user). It is now computed once they are."""
    proc = start_daemon(mqtt_env(env, broker))
    try:
        feed_demo(proc)
        finish(proc)
    finally:
        stop_daemon(proc)
    late = Subscriber(broker.port, [f"{BASE}/state", f"{BASE}/status"])
    late.wait_for(lambda: late.on(f"{BASE}/state") and late.on(f"{BASE}/status"), 10)
    state = late.on(f"{BASE}/state")[-1].json()
    late.close()
    assert late.on(f"{BASE}/status")[-1].payload == b"offline"
    shown = json.loads(cli("status", "--json", env=env).stdout)
    assert shown["outbox_pending"] == 0, shown
    assert state["outbox_depth"] == 0 and state["queue_depth"] == 0, state
