"""The events a recording and its transcript put in the MQTT outbox, in the same
transaction that stores them (called on the listener and worker threads)."""

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
    enqueue(conn, SpeechEvent(node_id=m.node_id, area=m.area, ts=ts, type="start"))


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
    enqueue(conn, event)


def transcribed(conn: sqlite3.Connection, m: MqttSettings, result: TranscribedRecording) -> bool:
    """The transcript event and one speaker event per voice heard; False when nothing may
    be published (not speech, or a voice that asked not to be kept)."""
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
    enqueue(conn, event)
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
                speaker_id=seg.speaker_id if seg.known else None,
                name=seg.speaker_name if seg.known else None,
                score=_round(seg.score),
                recording_id=result.recording_id,
            ),
        )
    return True
