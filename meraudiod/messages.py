"""One frozen dataclass per MQTT message: its topic (relative to the base topic), QoS,
retain flag and payload; and what the MQTT link takes from other threads (`Outgoing`) and
gives to the main one (`Inbound`). Events but the live-only ones go through the SQLite
outbox, written in the same transaction as the data they describe, and reach the broker in
order. The outbox is bounded at every insert; over the bound the oldest live-only and error
events go first, transcripts and speaker events last."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Final

from ulid import ULID

from .config_network import MqttSettings
from .db import Transaction, get_kv, now
from .wall_clock import this_run_age_cutoff

_LOGGER = logging.getLogger(__name__)
SCHEMA_VERSION: Final = 1
# Worth nothing once late: not queued while offline, dropped rather than replayed.
LIVE_ONLY_TOPICS: Final = frozenset({"event/speech"})
# What an automation acts on: dropped last when the outbox is over its bound.
DROPPED_LAST_TOPICS: Final = ("event/transcript", "event/speaker")
_DROP_WARN_EVERY_S: Final = 60.0
_last_drop_warning = 0.0
MAX_STATE_CHARS: Final = 250  # Home Assistant refuses sensor states of 255 characters or more


def job_event_id(recording_id: str, job_id: int, part: str) -> str:
    """The event_id of an event a job makes of a recording (`part`: "transcript",
    "speaker/S1", ...): a ULID with the recording's time and 80 bits of a hash of the three,
    so that the job, run again after a power cut took back its transcript (committed without
    an fsync of its own), makes the same events with the same ids (consumers deduplicate)."""
    try:
        moment = ULID.from_str(recording_id).bytes[:6]
    except ValueError:  # not one of ours: the hash alone
        moment = b""
    digest = hashlib.sha256(f"{recording_id}/{job_id}/{part}".encode()).digest()
    return str(ULID.from_bytes(moment + digest[: 16 - len(moment)]))


@dataclass(frozen=True)
class Event:
    """Base of the events: versioned, with a ULID, the node and its area."""

    topic: ClassVar[str] = "event"
    qos: ClassVar[int] = 1
    node_id: str
    area: str
    event_id: str = field(default_factory=lambda: str(ULID()))
    ts: float = field(default_factory=time.time)

    def to_payload(self) -> dict[str, Any]:
        """The JSON object sent."""
        return {"schema": SCHEMA_VERSION, **asdict(self)}


@dataclass(frozen=True)
class SpeechEvent(Event):
    """Someone started or stopped speaking."""

    topic: ClassVar[str] = "event/speech"
    qos: ClassVar[int] = 0
    type: str = "start"  # start | end
    recording_id: str | None = None
    rms_dbfs: float | None = None


@dataclass(frozen=True)
class SegmentPayload:
    """One transcript segment as published (times from the start of the recording)."""

    start_s: float
    end_s: float
    text: str
    speaker: dict[str, Any] | None = None  # {"label", "id", "name", "score"}, see README
    emotion: str | None = None


@dataclass(frozen=True)
class TranscriptEvent(Event):
    """One per recording, once it is transcribed."""

    topic: ClassVar[str] = "event/transcript"
    # What Home Assistant's event entity keys on: "transcript" for what was just said,
    # "retranscribed" for a recording transcribed again (reprocess), said at started_at.
    event_type: str = "transcript"
    recording_id: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    duration_s: float = 0.0
    text: str = ""
    language: str = ""
    segments: tuple[SegmentPayload, ...] = ()
    model: str = ""
    rtf: float = 0.0
    latency_ms: float = 0.0
    rms_dbfs: float = 0.0


@dataclass(frozen=True)
class SpeakerEvent(Event):
    """A speaker was identified, heard but unknown, enrolled or deleted."""

    topic: ClassVar[str] = "event/speaker"
    event_type: str = "identified"  # identified | unknown | enrolled | deleted
    speaker_id: str | None = None
    name: str | None = None  # a provisional voice's label ("unknown-1") for provisional ones
    provisional: bool = False  # an unknown voice grouped automatically, not a named person
    score: float | None = None
    recording_id: str | None = None


@dataclass(frozen=True)
class ErrorEvent(Event):
    """Something failed: which part, what, and about what."""

    topic: ClassVar[str] = "event/error"
    component: str = ""
    error: str = ""
    context: dict[str, Any] = field(default_factory=dict)


def enqueue(
    conn: sqlite3.Connection,
    event: Event,
    recording_id: str | None = None,
    max_rows: int | None = None,
) -> int:
    """Put an event in the outbox (inside the caller's transaction), keeping at most
    max_rows undelivered events."""
    cur = conn.execute(
        "INSERT INTO outbox (topic, payload, qos, retain, created_at, recording_id)"
        " VALUES (?, ?, ?, 0, ?, ?)",
        (
            event.topic,
            pack_payload(event.to_payload()),
            event.qos,
            now(),
            recording_id or getattr(event, "recording_id", None),
        ),
    )
    if max_rows is not None:
        drop_over_count(conn, max_rows)
    return int(cur.lastrowid or 0)


def pack_payload(payload: dict[str, Any]) -> bytes:
    """An event's JSON as the outbox stores it: deflated. A transcript's JSON (its text
    twice, whole and by segment) is about a 1 KiB page; deflated, it and its speaker events
    share one, and every page an insert or a delete touches is appended to the log whole."""
    return zlib.compress(json.dumps(payload, ensure_ascii=False).encode("utf-8"))


def unpack_payload(stored: str | bytes) -> dict[str, Any]:
    """The JSON object of an outbox row (text: a row an older version stored)."""
    text = zlib.decompress(stored).decode("utf-8") if isinstance(stored, bytes) else stored
    found: dict[str, Any] = json.loads(text)
    return found


def drop_over_count(conn: sqlite3.Connection, max_rows: int) -> int:
    """Delete undelivered events over max_rows: live-only and error events before transcripts
    and speaker events, oldest first (inside the caller's transaction)."""
    over = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]) - max_rows
    if over <= 0:
        return 0
    dropped = conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
        f" ORDER BY topic IN ({', '.join('?' * len(DROPPED_LAST_TOPICS))}), id LIMIT ?)",
        (*DROPPED_LAST_TOPICS, over),
    ).rowcount
    note_dropped(conn, dropped)
    return int(dropped)


def note_dropped(conn: sqlite3.Connection, dropped: int) -> None:
    """Count undelivered events that had to go (shown in status and state); warn now and then."""
    global _last_drop_warning
    if dropped <= 0:
        return
    total = int(get_kv(conn, "outbox_dropped", "0")) + dropped
    conn.execute(  # not set_kv: this runs inside the caller's transaction
        "INSERT INTO kv (key, value) VALUES ('outbox_dropped', ?)"
        " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (str(total),),
    )
    if time.monotonic() - _last_drop_warning >= _DROP_WARN_EVERY_S:
        _last_drop_warning = time.monotonic()
        _LOGGER.warning("MQTT outbox over its limits: %d undelivered events dropped so far", total)


def bound_outbox(conn: sqlite3.Connection, m: MqttSettings) -> int:
    """Drop undelivered events past the age limit (the count limit holds at every insert,
    and is checked here too after a reload lowered it); count what was dropped."""
    cutoff = now() - m.outbox_max_age_days * 86400
    run_started_at, run_cutoff = this_run_age_cutoff(cutoff)  # the clock may have been set
    with Transaction(conn):
        by_age = conn.execute(
            "DELETE FROM outbox WHERE created_at < ? AND (created_at < ? OR created_at < ?)",
            (cutoff, run_started_at, run_cutoff),
        ).rowcount
        note_dropped(conn, by_age)
        dropped = by_age + drop_over_count(conn, m.outbox_max_rows)
    return dropped


@dataclass(frozen=True)
class State:
    """The retained device state."""

    topic: ClassVar[str] = "state"
    listening: bool
    recording: bool
    queue_depth: int
    failed_jobs: int
    outbox_depth: int
    outbox_dropped: int
    models: dict[str, str]
    version: str
    uptime_s: float
    microphone: str
    audio_level_dbfs: float | None
    last_transcript: str | None  # None before the first transcript (Home Assistant: unknown)
    last_transcript_full: str | None
    last_transcript_at: float | None
    last_speaker: str | None  # a provisional voice's label ("unknown-1") when it was one
    last_speaker_provisional: bool | None
    disk_free_mb: float
    degraded: str | None = None

    @property
    def muted(self) -> bool:
        """Not listening: the microphone is closed."""
        return not self.listening

    def to_payload(self) -> dict[str, Any]:
        """The JSON object sent."""
        return {"schema": SCHEMA_VERSION, "muted": self.muted, **asdict(self)}


@dataclass(frozen=True)
class Response:
    """The reply to `request/<command>`."""

    command: str
    status: str  # ok | error
    data: Any = None
    error: str | None = None
    transaction: str | int | None = None
    # What kind of error (not_found, invalid_request, forbidden, conflict, bad_request,
    # busy, stopping, internal): a client branches on this, never on the wording.
    code: str | None = None

    @property
    def topic(self) -> str:
        """response/<command>"""
        return f"response/{self.command}"

    def to_payload(self) -> dict[str, Any]:
        """The JSON object sent."""
        return {
            "status": self.status,
            "data": self.data,
            "error": self.error,
            "code": self.code,
            "transaction": self.transaction,
        }


def truncate_state(text: str) -> str:
    """A sensor state Home Assistant accepts (the full text goes in attributes)."""
    return text if len(text) <= MAX_STATE_CHARS else text[: MAX_STATE_CHARS - 1] + "…"


@dataclass(frozen=True)
class Inbound:
    """A message from the broker for the main thread: the listening switch."""

    kind: str  # "listening"
    name: str
    payload: bytes


@dataclass(frozen=True)
class Outgoing:
    """A message sent directly (state, responses, live-only events), not through the outbox."""

    topic: str  # relative to the base topic, or absolute when absolute=True
    payload: str
    qos: int = 1
    retain: bool = False
    absolute: bool = False
    # A live-only event (event/speech) made at this wall-clock time: news only while the
    # connection it was meant for lasts, dropped rather than sent after an outage.
    live_at: float | None = None

    @classmethod
    def live(cls, event: Event) -> Outgoing:
        """A live-only event, sent straight to the broker: it is not worth a row of the
        outbox, written to the card and deleted again, since it is never replayed."""
        payload = json.dumps(event.to_payload(), ensure_ascii=False)
        return cls(event.topic, payload, qos=event.qos, live_at=now())
