"""Finished utterances: audio written atomically, then the recording row and its job in one
transaction. What is on disk without a row (a crash between the two) is removed at start-up."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import soundfile
from ulid import ULID

from . import jobs
from .audio import SAMPLE_RATE_HZ, Int16Array, rms_dbfs
from .db import Transaction, now

_LOGGER = logging.getLogger(__name__)
_TMP_SUFFIX = ".part"


@dataclass(frozen=True)
class Recording:
    """A stored recording."""

    id: str
    source: str
    started_at: float
    ended_at: float
    start_s: float
    end_s: float
    duration_s: float
    audio_path: Path | None  # None: kept in memory because the disk is too full
    rms_dbfs: float
    closed_at: float


def write_audio_atomically(path: Path, samples: Int16Array, audio_format: str) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "wb") as handle:
        soundfile.write(
            handle, samples, SAMPLE_RATE_HZ, format=audio_format.upper(), subtype="PCM_16"
        )
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class MemoryAudio:
    """Recordings held in RAM while the disk is too full to write them; bounded."""

    def __init__(self, max_recordings: int = 32) -> None:
        self.max_recordings = max_recordings
        self._items: dict[str, Int16Array] = {}
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, rec_id: str, samples: Int16Array) -> bool:
        """Keep a recording's audio; False (and counted) when memory is full."""
        with self._lock:
            if len(self._items) >= self.max_recordings:
                self.dropped += 1
                return False
            self._items[rec_id] = samples
            return True

    def pop(self, rec_id: str) -> Int16Array | None:
        """Take a recording's audio out (once transcribed it is not kept)."""
        with self._lock:
            return self._items.pop(rec_id, None)

    def __len__(self) -> int:
        return len(self._items)


class RecordingStore:
    """Writes recordings under `audio_dir` and registers them with a pending job."""

    def __init__(self, conn: sqlite3.Connection, audio_dir: Path, audio_format: str) -> None:
        self.conn = conn
        self.audio_dir = audio_dir
        self.audio_format = audio_format

    def save(
        self,
        samples: Int16Array,
        source: str,
        start_s: float,
        started_at: float,
        transcribe: bool = True,
        in_transaction: Callable[[sqlite3.Connection, Recording], None] | None = None,
        memory: MemoryAudio | None = None,
    ) -> Recording | None:
        """Store one utterance; once this returns, a crash cannot lose it.

        `in_transaction` runs inside the transaction that inserts the rows (e.g. the
        speech-end event for the outbox), so both are stored or neither. With `memory`
        (the disk is too full) the audio is kept in RAM for the worker instead of written;
        None is returned when that memory is full too.
        """
        rec_id = str(ULID())
        duration_s = samples.size / SAMPLE_RATE_HZ
        path: Path | None = None
        if memory is None:
            path = self.audio_dir / Path(*_day_parts(started_at)) / f"{rec_id}.{self.audio_format}"
            write_audio_atomically(path, samples, self.audio_format)
        elif not memory.put(rec_id, samples):
            _LOGGER.error("disk full and memory full: recording of %.1f s dropped", duration_s)
            return None
        recording = Recording(
            id=rec_id,
            source=source,
            started_at=started_at,
            ended_at=started_at + duration_s,
            start_s=start_s,
            end_s=start_s + duration_s,
            duration_s=duration_s,
            audio_path=path,
            rms_dbfs=rms_dbfs(samples),
            closed_at=now(),
        )
        try:
            with Transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO recordings (id, source, started_at, ended_at, start_s, end_s,"
                    " duration_s, audio_path, rms_dbfs, closed_at, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec_id,
                        source,
                        recording.started_at,
                        recording.ended_at,
                        start_s,
                        recording.end_s,
                        duration_s,
                        str(path) if path else None,
                        recording.rms_dbfs,
                        recording.closed_at,
                        "pending" if transcribe else "done",
                    ),
                )
                if transcribe:
                    jobs.enqueue(self.conn, rec_id)
                if in_transaction is not None:
                    in_transaction(self.conn, recording)
        except BaseException:
            if path is not None:
                path.unlink(missing_ok=True)
            elif memory is not None:
                memory.pop(rec_id)
            raise
        _LOGGER.info(
            "recording %s: %.2f s from %s at %.2f s, %.1f dBFS",
            rec_id,
            duration_s,
            source,
            start_s,
            recording.rms_dbfs,
        )
        return recording


def _day_parts(wall_s: float) -> tuple[str, str, str]:
    import time

    t = time.localtime(wall_s)
    return f"{t.tm_year:04d}", f"{t.tm_mon:02d}", f"{t.tm_mday:02d}"


# Only what this module writes: <audio_dir>/YYYY/MM/DD/<ULID>.<flac|wav>[.part]. Nothing else
# under audio_dir is ever touched, whatever directory it is configured to be.
_OWN_FILE: Final = re.compile(r"\d{4}/\d{2}/\d{2}/[0-9A-HJKMNP-TV-Z]{26}\.(flac|wav)(\.part)?")


def remove_orphans(conn: sqlite3.Connection, audio_dir: Path) -> int:
    """Delete our half-written files and our audio that no recording row points to."""
    if not audio_dir.is_dir():
        return 0
    known = {
        str(row[0])
        for row in conn.execute("SELECT audio_path FROM recordings WHERE audio_path IS NOT NULL")
    }
    removed = 0
    for path in audio_dir.glob("[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]/*"):
        relative = path.relative_to(audio_dir).as_posix()
        ours = path.is_file() and _OWN_FILE.fullmatch(relative) is not None
        if ours and (path.name.endswith(_TMP_SUFFIX) or str(path) not in known):
            path.unlink(missing_ok=True)
            removed += 1
    for day in sorted(audio_dir.glob("[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]"), reverse=True):
        for folder in (day, day.parent, day.parent.parent):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    if removed:
        _LOGGER.warning("removed %d orphaned audio files from %s", removed, audio_dir)
    return removed


def delete_recordings(conn: sqlite3.Connection, rec_ids: list[str]) -> int:
    """Delete recordings with their audio, text, index rows, jobs, undelivered events and
    the voice embeddings taken from them. Returns how many existed."""
    paths = []
    with Transaction(conn):
        for rec_id in rec_ids:
            row = conn.execute("SELECT audio_path FROM recordings WHERE id=?", (rec_id,)).fetchone()
            if row is None:
                continue
            paths.append(row["audio_path"])
            conn.execute("DELETE FROM outbox WHERE recording_id=?", (rec_id,))
            conn.execute("DELETE FROM speaker_embeddings WHERE recording_id=?", (rec_id,))
            conn.execute("DELETE FROM recordings WHERE id=?", (rec_id,))
    for path in paths:
        if path:
            Path(path).unlink(missing_ok=True)
    if paths:
        forget_deleted_text(conn)
    return len(paths)


def delete_recording(conn: sqlite3.Connection, rec_id: str) -> bool:
    """Delete one recording (see delete_recordings). True if it existed."""
    return delete_recordings(conn, [rec_id]) == 1


def forget_deleted_text(conn: sqlite3.Connection) -> None:
    """Make deleted text unrecoverable from the database file.

    secure_delete zeroes freed pages, but the full-text index keeps deleted words in its
    segments until they are merged, and the WAL keeps old pages until a checkpoint.
    """
    conn.execute("INSERT INTO segments_fts(segments_fts) VALUES ('optimize')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def export_recording(conn: sqlite3.Connection, rec_id: str, out_dir: Path) -> list[Path]:
    """Copy the audio and write the recording with its segments as JSON into out_dir."""
    import json

    data = recording_details(conn, rec_id)
    if data is None:
        raise KeyError(rec_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if data["audio_path"] and Path(data["audio_path"]).is_file():
        audio_out = out_dir / Path(data["audio_path"]).name
        shutil.copyfile(data["audio_path"], audio_out)
        written.append(audio_out)
    json_out = out_dir / f"{rec_id}.json"
    json_out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(json_out)
    return written


def recording_details(conn: sqlite3.Connection, rec_id: str) -> dict[str, Any] | None:
    """The recording row with its segments (times relative to the recording)."""
    import json

    row = conn.execute("SELECT * FROM recordings WHERE id=?", (rec_id,)).fetchone()
    if row is None:
        return None
    data = dict(zip(row.keys(), tuple(row), strict=True))
    data["segments"] = [
        {
            "start_s": s["start_s"],
            "end_s": s["end_s"],
            "text": s["text"],
            "avg_logprob": s["avg_logprob"],
            "no_speech_prob": s["no_speech_prob"],
            "compression_ratio": s["compression_ratio"],
            "suspect": s["suspect"],
            "words": json.loads(s["words"]) if s["words"] else [],
            # A named person, or None for an unknown voice (also one grouped provisionally).
            "speaker": {"id": s["speaker_id"], "name": s["p_name"], "score": s["speaker_score"]}
            if s["speaker_id"] and s["p_name"] and not s["p_provisional"]
            else None,
            "speaker_label": s["speaker_label"],  # the local speaker inside the recording
            "speaker_score": s["speaker_score"],  # best score, kept for unknown voices too
        }
        for s in conn.execute(
            "SELECT s.*, p.name AS p_name, p.provisional AS p_provisional FROM segments s"
            " LEFT JOIN speakers p ON p.id = s.speaker_id WHERE s.recording_id=? ORDER BY s.idx",
            (rec_id,),
        )
    ]
    # Who the local speakers were matched to, with score and margin over the runner-up.
    data["speakers"] = [
        dict(zip(m.keys(), tuple(m), strict=True))
        for m in conn.execute(
            "SELECT m.label, m.speaker_id, p.name, p.provisional, m.score, m.margin, m.speech_s"
            " FROM speaker_mappings m LEFT JOIN speakers p ON p.id = m.speaker_id"
            " WHERE m.recording_id=? ORDER BY m.label",
            (rec_id,),
        )
    ]
    return data


def analysis_record(conn: sqlite3.Connection, rec_id: str) -> dict[str, Any]:
    """One recording as `analyze --json` prints it (segment times are offsets into the file)."""
    data = recording_details(conn, rec_id) or {}
    offset = data.get("start_s", 0.0)
    return {
        "id": rec_id,
        "start_s": round(data.get("start_s", 0.0), 3),
        "end_s": round(data.get("end_s", 0.0), 3),
        "text": data.get("text"),
        "state": data.get("status"),
        "segments": [
            {
                "start_s": round(offset + s["start_s"], 3),
                "end_s": round(offset + s["end_s"], 3),
                "text": s["text"],
                "suspect": s["suspect"],
                "speaker": s["speaker"],
            }
            for s in data.get("segments", [])
        ],
    }
