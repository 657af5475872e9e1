"""The events of a recording and its transcript: the transcript and speaker events go into
the MQTT outbox in the same transaction that stores the transcript (on the worker thread);
the live-only speech events are built here and sent straight to the link (on the listener
thread); the HTTP event stream sends the same events.

One rule for voices: a named person is `identified` with their name; a voice grouped into a
provisional profile is `unknown` with that profile's label (`unknown-1`) as `name` and
`provisional: true`, in speaker events, transcript segments and the state's last speaker
alike; a voice with no profile at all has no name.
"""

from __future__ import annotations

import sqlite3

from .config_network import MqttSettings
from .messages import (
    Event,
    SegmentPayload,
    SpeakerEvent,
    SpeechEvent,
    TranscriptEvent,
    enqueue,
    job_event_id,
)
from .recording_views import speaker_payload
from .recordings import Recording
from .speakers import SegmentSpeaker
from .worker import TranscribedRecording


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def speech_start_event(m: MqttSettings, ts: float) -> SpeechEvent:
    """The event of someone starting to speak."""
    return SpeechEvent(node_id=m.node_id, area=m.area, ts=ts, type="start")


def speech_end_event(m: MqttSettings, recording: Recording) -> SpeechEvent:
    """The event of an utterance that ended and was saved."""
    return SpeechEvent(
        node_id=m.node_id,
        area=m.area,
        ts=recording.ended_at,
        type="end",
        recording_id=recording.id,
        rms_dbfs=round(recording.rms_dbfs, 1),
    )


def transcribed(conn: sqlite3.Connection, m: MqttSettings, result: TranscribedRecording) -> bool:
    """The transcript event and one speaker event per voice heard into the outbox; False
    when nothing may be published (not speech, or a voice that asked not to be kept)."""
    found = transcript_events(conn, m, result)
    for event in found:
        enqueue(conn, event, max_rows=m.outbox_max_rows)
    return bool(found)


def transcript_events(
    conn: sqlite3.Connection, m: MqttSettings, result: TranscribedRecording
) -> list[Event]:
    """The transcript event and one speaker event per voice heard (none when nothing may be
    published): what MQTT and the HTTP event stream both send.

    Who spoke is a fact about the voice, what was said a fact about the words: a recording
    Whisper distrusted (`suspect`: noise, or a language it does not know) gives no transcript
    event, but still a speaker event for each voice the segmentation heard. A voice that
    asked not to be kept (`opt_out`) gives nothing: the recording is deleted.

    A recording transcribed again (`reprocess`) gives a `retranscribed` event, with its
    original times and no speaker events: an automation keyed on `transcript` or on a
    speaker does not act a second time on something said long ago."""
    if result.opt_out:
        return []
    found: list[Event] = [] if result.suspect else [_transcript_event(conn, m, result)]
    if result.reprocessed:
        return found
    heard: dict[str, SegmentSpeaker] = {}
    for seg in result.segments:  # suspect segments too: the label is the segmentation's
        if seg.label is not None and seg.label not in heard:
            heard[seg.label] = seg
    for label, seg in heard.items():
        found.append(
            SpeakerEvent(
                node_id=m.node_id,
                area=m.area,
                event_id=job_event_id(result.recording_id, result.job_id, f"speaker/{label}"),
                event_type="identified" if seg.known else "unknown",
                speaker_id=seg.speaker_id,
                name=seg.speaker_name,
                provisional=seg.speaker_id is not None and not seg.known,
                score=_round(seg.score),
                recording_id=result.recording_id,
            )
        )
    return found


def _transcript_event(
    conn: sqlite3.Connection, m: MqttSettings, result: TranscribedRecording
) -> TranscriptEvent:
    """The transcript event of a recording, its trusted segments only."""
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
    return TranscriptEvent(
        node_id=m.node_id,
        area=m.area,
        event_id=job_event_id(result.recording_id, result.job_id, "transcript"),
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
