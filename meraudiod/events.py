"""The events a recording and its transcript put in the MQTT outbox, in the same
transaction that stores them (called on the listener and worker threads).

One rule for voices: a named person is `identified` with their name; a voice grouped into a
provisional profile is `unknown` with that profile's label (`unknown-1`) as `name` and
`provisional: true`, in speaker events, transcript segments and the state's last speaker
alike; a voice with no profile at all has no name.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .config import MqttSettings
from .messages import SegmentPayload, SpeakerEvent, SpeechEvent, TranscriptEvent, enqueue
from .recordings import Recording, speaker_payload
from .worker import TranscribedRecording


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def speech_start(conn: sqlite3.Connection, m: MqttSettings, ts: float) -> None:
    """Someone started speaking."""
    event = SpeechEvent(node_id=m.node_id, area=m.area, ts=ts, type="start")
    enqueue(conn, event, max_rows=m.outbox_max_rows)


def speech_end(conn: sqlite3.Connection, m: MqttSettings, recording: Recording) -> None:
    """The utterance ended and its recording is saved."""
    event = SpeechEvent(
        node_id=m.node_id,
        area=m.area,
        ts=recording.ended_at,
        type="end",
        recording_id=recording.id,
        rms_dbfs=round(recording.rms_dbfs, 1),
    )
    enqueue(conn, event, max_rows=m.outbox_max_rows)


def transcribed(conn: sqlite3.Connection, m: MqttSettings, result: TranscribedRecording) -> bool:
    """The transcript event and one speaker event per voice heard; False when nothing may
    be published (not speech, or a voice that asked not to be kept).

    A recording transcribed again (`reprocess`) gives a `retranscribed` event, with its
    original times and no speaker events: an automation keyed on `transcript` or on a
    speaker does not act a second time on something said long ago."""
    if result.suspect or result.opt_out:
        return False
    row = conn.execute(
        "SELECT started_at, ended_at, duration_s, rms_dbfs, model FROM recordings WHERE id=?",
        (result.recording_id,),
    ).fetchone()
    segments = tuple(
        SegmentPayload(
            round(seg.start_s, 3),
            round(seg.end_s, 3),
            seg.text,
            speaker=speaker_payload(
                seg.label, seg.speaker_id, seg.speaker_name, _round(seg.score), seg.known
            ),
        )
        for seg in result.segments
        if not seg.suspect
    )
    event = TranscriptEvent(
        node_id=m.node_id,
        area=m.area,
        event_type="retranscribed" if result.reprocessed else "transcript",
        recording_id=result.recording_id,
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        duration_s=round(row["duration_s"], 3),
        text=result.text,
        language=result.language,
        segments=segments,
        model=row["model"] or "",
        rtf=round(result.rtf, 3),
        latency_ms=round(result.latency_ms, 1),
        rms_dbfs=round(row["rms_dbfs"], 1),
    )
    enqueue(conn, event, max_rows=m.outbox_max_rows)
    if result.reprocessed:
        return True
    heard: dict[str, Any] = {}
    for seg in result.segments:
        if seg.label is not None and not seg.suspect and seg.label not in heard:
            heard[seg.label] = seg
    for seg in heard.values():
        enqueue(
            conn,
            SpeakerEvent(
                node_id=m.node_id,
                area=m.area,
                event_type="identified" if seg.known else "unknown",
                speaker_id=seg.speaker_id,
                name=seg.speaker_name,
                provisional=seg.speaker_id is not None and not seg.known,
                score=_round(seg.score),
                recording_id=result.recording_id,
            ),
            max_rows=m.outbox_max_rows,
        )
    return True
