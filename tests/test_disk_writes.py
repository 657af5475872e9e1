"""Fewer writes to the SD card, and the promises kept: a saved recording survives a SIGKILL
right after its save (and its save is fsynced, for a power cut); what is committed without
an fsync of its own never leaves the connection relaxed for the next commit; a transcript is
on the card before its audio is deleted, and one a power cut took back after its events were
published is made again with the same event_ids; delivered events, deleted in batches, are
sent again after a crash with the same event_id, never lost."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from ulid import ULID

from meraudiod import events, jobs
from meraudiod.audio import decode_file
from meraudiod.bench_disk import WalMeter
from meraudiod.config import Settings
from meraudiod.db import PAGE_BYTES, Transaction, open_db
from meraudiod.messages import (
    ErrorEvent,
    SegmentPayload,
    SpeakerEvent,
    TranscriptEvent,
    enqueue,
)
from meraudiod.recordings import Recording, RecordingStore
from meraudiod.speakers import SegmentSpeaker
from meraudiod.worker import TranscribedRecording

from .broker import Broker, Subscriber
from .conftest import TEST_DATA, cli, db_rows, run_daemon, stored_audio, wait_for
from .mqtt_daemon import BASE, mqtt_env, start_daemon

SHORT = TEST_DATA / "ls_103_0000.flac"
SENTENCE = (
    "and mister john dashwood had then leisure to consider how much there might be"
    " prudently in his power to do for them while the family of dashwood had long been"
    " settled in sussex"
)
_FULL = 2  # PRAGMA synchronous


def test_a_new_database_has_small_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    new = open_db(tmp_path / "new.db")
    assert new.execute("PRAGMA page_size").fetchone()[0] == PAGE_BYTES == 1024
    new.close()
    old_path = tmp_path / "old.db"
    old = sqlite3.connect(old_path)
    old.execute("PRAGMA page_size=4096")
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE before_us (x)")
    old.close()
    kept = open_db(old_path)  # migrated in place, nothing rewritten
    assert kept.execute("PRAGMA page_size").fetchone()[0] == 4096
    assert kept.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 0
    kept.close()


def test_the_save_is_fsynced_and_the_claim_leaves_the_connection_durable(
    settings: Settings,
) -> None:
    """The save commits at synchronous=FULL (a power cut cannot take it back); the claim
    commits at NORMAL, and the connection is FULL again after it, also after a claim that
    could not take the write lock."""
    conn = open_db(settings.storage.db_path)
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    seen: list[int] = []

    def inside(c: sqlite3.Connection, recording: Recording) -> None:
        seen.append(int(c.execute("PRAGMA synchronous").fetchone()[0]))

    samples = decode_file(SHORT)
    store.save(samples, "test", 0.0, time.time(), in_transaction=inside)
    store.save(samples, "test", 9.0, time.time(), in_transaction=inside)
    assert seen == [_FULL, _FULL]
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    assert jobs.claim(conn, lease_s=60) is not None
    conn.set_trace_callback(None)
    assert statements[0] == "PRAGMA synchronous=NORMAL" and statements[1] == "BEGIN IMMEDIATE"
    assert statements[-1] == "PRAGMA synchronous=FULL"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == _FULL

    holder = sqlite3.connect(settings.storage.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    conn.execute("PRAGMA busy_timeout=50")
    try:
        jobs.claim(conn, lease_s=60)
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
    else:
        raise AssertionError("the claim took a lock another connection held")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == _FULL
    with Transaction(conn, durable=False):
        pass
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == _FULL
    conn.execute("PRAGMA synchronous=NORMAL")  # whatever came before, a durable commit is FULL
    with Transaction(conn) as inside_durable:
        assert inside_durable.execute("PRAGMA synchronous").fetchone()[0] == _FULL
    conn.close()


def test_a_recording_survives_a_sigkill_right_after_its_save(env: dict[str, str]) -> None:
    """The daemon is killed the moment the recording's row is visible: the row, its job and
    its whole audio file are there, and the next start transcribes it."""

    def saved() -> bool:
        try:
            return bool(db_rows(env, "SELECT id FROM recordings"))
        except sqlite3.OperationalError:
            return False  # not created yet

    proc = run_daemon(env, source=f"file:{SHORT}", stderr=subprocess.DEVNULL)
    try:
        wait_for(saved, 120, "a saved recording", poll_s=0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    (rec,) = db_rows(env, "SELECT id, audio_path, duration_s, status FROM recordings")
    (job,) = db_rows(env, f"SELECT state FROM jobs WHERE recording_id='{rec['id']}'")
    assert job["state"] in ("pending", "running") and rec["status"] == "pending"
    audio, rate = soundfile.read(stored_audio(env, rec["audio_path"]), dtype="int16")
    assert rate == 16000 and abs(audio.size / rate - rec["duration_s"]) < 0.01

    quiet = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).parent / "silence.wav"
    soundfile.write(quiet, np.zeros(16000, dtype=np.int16), 16000)
    result = cli("run", "--source", f"file:{quiet}", env=env)
    assert result.returncode == 0, result.stderr
    (done,) = db_rows(env, "SELECT status, text FROM recordings")
    assert done["status"] == "done" and done["text"]


def test_a_delivered_event_not_yet_deleted_at_a_crash_is_sent_again_with_its_event_id(
    env: dict[str, str], broker: Broker
) -> None:
    """Delivered events are deleted in batches: killed before its batch, the daemon sends
    the transcript again at the next start, with the same event_id (never lost, and a
    consumer can tell it is the same event); a clean exit deletes what was delivered."""
    sub = Subscriber(broker.port, [f"{BASE}/event/transcript"])
    daemon_env = mqtt_env(env, broker)
    proc = start_daemon(daemon_env)
    try:
        assert proc.stdin is not None
        proc.stdin.write(decode_file(SHORT).astype("<i2").tobytes())
        proc.stdin.write(np.zeros(16000, dtype="<i2").tobytes())  # the end of the utterance
        proc.stdin.flush()  # and stdin stays open: the daemon is still listening
        sub.wait_for(lambda: sub.on("/event/transcript"), 120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    first = sub.on("/event/transcript")[0].json()
    assert db_rows(env, "SELECT id FROM outbox WHERE topic='event/transcript'")

    quiet = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).parent / "silence.wav"
    soundfile.write(quiet, np.zeros(16000, dtype=np.int16), 16000)
    result = cli("run", "--source", f"file:{quiet}", env=daemon_env)
    assert result.returncode == 0, result.stderr
    sub.wait_for(lambda: len(sub.on("/event/transcript")) == 2, 30)
    again = sub.on("/event/transcript")[1].json()
    assert again["event_id"] == first["event_id"]
    assert again["recording_id"] == first["recording_id"] and again["text"] == first["text"]
    assert not db_rows(env, "SELECT id FROM outbox")  # the clean exit deleted them
    sub.close()


def test_speech_events_go_straight_to_the_broker_never_through_the_outbox(
    env: dict[str, str], broker: Broker
) -> None:
    """event/speech is live-only (QoS 0, never replayed after an outage): it goes to the
    link directly, not into the outbox, where each cost an insert and a delete on the card
    for nothing. It still arrives, start then end, before its recording's transcript; the
    transcript and speaker events still go through the outbox."""
    db = open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    db.executescript(
        "CREATE TABLE outbox_seen (topic TEXT);"
        "CREATE TRIGGER outbox_seen AFTER INSERT ON outbox"
        " BEGIN INSERT INTO outbox_seen VALUES (new.topic); END;"
    )
    db.close()
    sub = Subscriber(broker.port, [f"{BASE}/event/#"])
    result = cli("run", "--source", f"file:{SHORT}", env=mqtt_env(env, broker))
    assert result.returncode == 0, result.stderr
    sub.wait_for(lambda: sub.on("/event/transcript"), 30)
    topics = [m.topic.removeprefix(f"{BASE}/") for m in sub.messages]
    (start, end) = [m.json() for m in sub.on("/event/speech")]
    (transcript,) = [m.json() for m in sub.on("/event/transcript")]
    assert start["type"] == "start" and end["type"] == "end"
    assert end["recording_id"] == transcript["recording_id"]
    assert topics.index("event/transcript") > topics.index("event/speech") + 1, topics
    written = {row["topic"] for row in db_rows(env, "SELECT topic FROM outbox_seen")}
    assert "event/transcript" in written and "event/speech" not in written, written
    sub.close()


def _traced_run(env: dict[str, str], tmp_path: Path, source: Path) -> list[str]:
    """`meraudiod run` on a file under strace: its writes, syncs, sends and unlinks, each
    with the file or socket named."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    log = tmp_path / "strace.log"
    calls = "pwrite64,write,sendto,fsync,fdatasync,unlink,unlinkat"
    strace = ["strace", "-f", "-y", "-s", "120", "-e", f"trace={calls}", "-o", str(log)]
    result = subprocess.run(
        [*strace, sys.executable, "-m", "meraudiod", "run", "--source", f"file:{source}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if "ptrace" in result.stderr and result.returncode != 0:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def _log_synced_since_last_write(lines: list[str]) -> bool:
    """Did the SQLite log get an fsync after the last write to it in these lines?"""
    for line in reversed(lines):
        if "-wal>" not in line:
            continue
        return " fsync(" in line or " fdatasync(" in line
    return True


def test_a_transcript_a_power_cut_took_back_is_made_again_with_the_same_event_ids(
    env: dict[str, str], broker: Broker, speaker_models: Path
) -> None:
    """The transcript commits without an fsync of its own and its events are published
    without waiting for one: a power cut can take back a transcript a consumer has seen. Its
    recording is then transcribed again at the next start, and the events come again with
    the same event_ids (here: the data directory as the power cut leaves it, the save on the
    card and nothing after it, run twice)."""
    data = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    conn = open_db(data / "meraudiod.db")
    store = RecordingStore(conn, data / "audio", "flac")
    assert store.save(decode_file(SHORT), source="x", start_s=0.0, started_at=1000.0)
    conn.close()
    saved_only = data.parent / "saved-only"
    shutil.copytree(data, saved_only)
    run_env = mqtt_env(
        env, broker, MERAUDIOD_SPEAKERS__ENABLED="true", MERAUDIOD_DIARIZATION__ENABLED="true"
    )
    sent = []
    for _ in range(2):
        sent.append(_events_of_a_run(run_env, broker, _silence(data.parent)))
        shutil.rmtree(data)
        shutil.copytree(saved_only, data)  # what the power cut leaves
    assert sent[0] == sent[1] and "rachel" in str(sent[0]).lower(), sent


def test_a_job_claimed_before_a_power_cut_is_done_again_whoever_has_its_pid_now(
    env: dict[str, str],
) -> None:
    """A later save may have put a job's claim on the card without its transcript, which
    may have been published. After the reboot another process (or the daemon itself) may
    have the pid that claimed it, whose lease has not run out: claimed before this boot, the
    job is still taken back at the next start and its recording transcribed again."""
    data = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    conn = open_db(data / "meraudiod.db")
    store = RecordingStore(conn, data / "audio", "flac")
    assert store.save(decode_file(SHORT), source="x", start_s=0.0, started_at=1000.0)
    with Transaction(conn):
        conn.execute(  # pid 1 is always alive; the lease has nine minutes to go
            "UPDATE jobs SET state='running', owner=?, lease_until=?, updated_at=?",
            (f"{socket.gethostname()}:1", time.time() + 540, jobs.boot_time() - 60),
        )
    conn.close()
    result = cli("run", "--source", f"file:{_silence(data.parent)}", env=env, timeout_s=60)
    assert result.returncode == 0, result.stderr
    (rec,) = db_rows(env, "SELECT status, text FROM recordings")
    assert rec["status"] == "done" and "rachel" in rec["text"].lower(), dict(rec)


def test_a_transcript_whose_audio_is_only_in_memory_is_on_the_card_before_its_event(
    env: dict[str, str], broker: Broker, tmp_path: Path
) -> None:
    """Below min_free_disk_mb the audio is kept in memory only, until it can be written: a
    power cut meanwhile could not make the transcript again (no audio), so it commits with
    an fsync of its own, before its event is published."""
    sub = Subscriber(broker.port, [f"{BASE}/event/transcript"])
    full = mqtt_env(env, broker, MERAUDIOD_RETENTION__MIN_FREE_DISK_MB=str(10**12))
    lines = _traced_run(full, tmp_path, SHORT)
    sub.wait_for(lambda: sub.on("/event/transcript"), 30)
    sub.close()
    (rec,) = db_rows(env, "SELECT audio_path, text FROM recordings")
    assert rec["audio_path"] is None and "rachel" in rec["text"].lower(), rec
    published = [i for i, line in enumerate(lines) if "event/transcript" in line]
    assert published, "the trace shows no transcript sent to the broker"
    for i in published:
        assert _log_synced_since_last_write(lines[:i]), lines[max(0, i - 20) : i + 1]


def _events_of_a_run(env: dict[str, str], broker: Broker, source: Path) -> list[Any]:
    """(topic, event_id, text) of each transcript and speaker event of `run` on `source`."""
    sub = Subscriber(broker.port, [f"{BASE}/event/transcript", f"{BASE}/event/speaker"])
    result = cli("run", "--source", f"file:{source}", env=env)
    assert result.returncode == 0, result.stderr
    sub.wait_for(lambda: sub.on("/event/transcript") and sub.on("/event/speaker"), 30)
    sub.close()
    return sorted((m.topic, m.json()["event_id"], m.json().get("text")) for m in sub.messages)


def test_a_job_makes_its_events_with_the_same_ids_every_time(settings: Settings) -> None:
    """What the power cut test rests on, and why the HTTP event stream and MQTT give one
    transcript the same event_id: the ids come from the recording, the job and the part;
    another job of the same recording (a `reprocess`) makes other ids."""
    conn = open_db(settings.storage.db_path)
    store = RecordingStore(conn, settings.storage.audio_dir, "flac")
    rec = store.save(decode_file(SHORT), source="x", start_s=0.0, started_at=1000.0)
    assert rec is not None
    said = [
        SegmentSpeaker(0.0, 2.0, SENTENCE, None, label, None, None, 0.2, False)
        for label in ("S1", "S2")
    ]
    result = TranscribedRecording(
        rec.id, "x", 0.0, 2.0, SENTENCE, "en", False, 0.1, 300.0, tuple(said), job_id=7
    )
    m = settings.mqtt

    def ids(result: TranscribedRecording) -> list[str]:
        return [event.event_id for event in events.transcript_events(conn, m, result)]

    first = ids(result)
    assert first == ids(result) and len(set(first)) == 3  # a transcript, two voices
    assert not set(first) & set(ids(replace(result, job_id=8)))
    assert all(ULID.from_str(i).timestamp == ULID.from_str(rec.id).timestamp for i in first)


def _silence(folder: Path) -> Path:
    """A file with nothing to record: a run that only works on the backlog."""
    path = folder / "silence.wav"
    soundfile.write(path, np.zeros(16000, dtype=np.int16), 16000)
    return path


def test_with_keep_audio_off_the_transcript_is_on_the_card_before_the_audio_goes(
    env: dict[str, str], tmp_path: Path
) -> None:
    """retention.keep_audio = false deletes the audio once transcribed: not before the
    transcript, committed without an fsync of its own, is on the card."""
    lines = _traced_run({**env, "MERAUDIOD_RETENTION__KEEP_AUDIO": "false"}, tmp_path, SHORT)
    (rec,) = db_rows(env, "SELECT status, audio_path, text FROM recordings")
    assert rec["status"] == "done" and rec["text"] and rec["audio_path"] is None
    removed = [i for i, line in enumerate(lines) if "unlink" in line and ".flac" in line]
    removed = [i for i in removed if ".part" not in lines[i]]
    assert removed, "the trace shows no audio file deleted"
    for i in removed:
        assert _log_synced_since_last_write(lines[:i]), lines[max(0, i - 20) : i + 1]


def test_a_transcript_and_its_speaker_event_share_a_page_of_the_outbox(
    settings: Settings,
) -> None:
    """A transcript event (its text twice: whole and by segment) is about 900 bytes of JSON;
    stored as it is, it and its speaker event took a 1 KiB page each, written whole to the
    log at the insert and again at the delete. Stored deflated they share one: fewer pages
    appended to the log per recording, and the same events delivered (tests/test_mqtt.py)."""
    conn = open_db(settings.storage.db_path)
    keep_log = open_db(settings.storage.db_path)  # the log stays while this is open
    meter = WalMeter(settings.storage.db_path)
    words = SENTENCE.split()
    frames, recordings = 0, 40
    for n in range(recordings):
        texts = [" ".join(words[(n + i) % 7 :] + words[: (n + i) % 7]) for i in range(2)]
        segments = tuple(
            SegmentPayload(3.0 * i, 3.0 * i + 2.9, text, {"label": "S1", "id": None})
            for i, text in enumerate(texts)
        )
        transcript = TranscriptEvent(
            node_id="kitchen",
            area="Kitchen",
            recording_id=f"{n:026d}",
            text=" ".join(texts),
            segments=segments,
            model="tiny.en",
        )
        speaker = SpeakerEvent(
            node_id="kitchen", area="Kitchen", event_type="unknown", recording_id=f"{n:026d}"
        )
        assert len(json.dumps(transcript.to_payload())) > 800
        meter.poll()
        before = meter.bytes_written
        with Transaction(conn, durable=False):
            enqueue(conn, transcript)
            enqueue(conn, speaker)
        meter.poll()
        frames += (meter.bytes_written - before) // (PAGE_BYTES + 24)
        if n % 4 == 3:  # delivered and deleted in batches, as the link does
            with Transaction(conn, durable=False):
                conn.execute("DELETE FROM outbox")
    # Stored as text: 6.7 pages per recording; deflated: 5.2.
    assert frames / recordings < 5.7, frames / recordings
    conn.close()
    keep_log.close()


def test_an_event_without_a_recording_leaves_the_recording_index_alone(
    settings: Settings,
) -> None:
    """An error event (no recording) is one table row: its insert appends the outbox page
    and the id counter to the log, not a page of the index by recording as well; the delete
    path by recording still has its index."""
    conn = open_db(settings.storage.db_path)
    keep_log = open_db(settings.storage.db_path)  # the log stays while this is open
    meter = WalMeter(settings.storage.db_path)
    for ts in (1.0, 2.0):  # the first insert of a connection may touch more (the schema)
        meter.poll()
        before = meter.bytes_written
        with Transaction(conn, durable=False):
            enqueue(conn, ErrorEvent(node_id="n", area="", ts=ts, component="test", error="x"))
        meter.poll()
    frames = (meter.bytes_written - before) // (PAGE_BYTES + 24)
    assert frames == 2, frames  # outbox and sqlite_sequence
    plan = conn.execute("EXPLAIN QUERY PLAN DELETE FROM outbox WHERE recording_id='x'")
    assert "USING INDEX outbox_recording" in " ".join(str(row[3]) for row in plan)
    conn.close()
    keep_log.close()
