"""What a stored recording looks like to whoever reads it: its details with segments and
speakers (CLI, MQTT, HTTP), one `analyze --json` record, and an export to a folder."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .jobs import pid_alive
from .recordings import audio_file, normalise_id


def export_recording(
    conn: sqlite3.Connection, audio_dir: Path, rec_id: str, out_dir: Path
) -> list[Path]:
    """Copy the audio and write the recording with its segments as JSON into out_dir."""
    data = recording_details(conn, audio_dir, rec_id)
    if data is None:
        raise KeyError(rec_id)
    rec_id = data["id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if data["audio_path"] and Path(data["audio_path"]).is_file():
        audio_out = out_dir / Path(data["audio_path"]).name
        _write_whole(audio_out, lambda tmp: shutil.copyfile(data["audio_path"], tmp))
        written.append(audio_out)
    json_out = out_dir / f"{rec_id}.json"
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    _write_whole(json_out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    written.append(json_out)
    return written


def _write_whole(dest: Path, write: Callable[[Path], object]) -> None:
    """Write `dest` through a temporary file beside it, renamed once complete: a full disk
    leaves no truncated file under its name. An error in the writing names `dest` (a full
    disk's would name the file copied from)."""
    _remove_killed_writes(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if str(tmp) not in (exc.filename, exc.filename2):
            raise  # not the writing: e.g. the audio file may not be read
        raise OSError(exc.errno, exc.strerror, str(dest)) from exc


def _remove_killed_writes(dest: Path) -> None:
    """The temporary files of `dest` whose process is gone (an export killed mid-copy); one
    of a process still running is its export in progress."""
    prefix = f".{dest.name}."
    for part in dest.parent.glob(f"{glob.escape(prefix)}*.part"):
        pid = part.name[len(prefix) : -len(".part")]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)


def speaker_payload(
    label: str | None, speaker_id: str | None, name: str | None, score: float | None, known: bool
) -> dict[str, Any] | None:
    """A segment's speaker as JSON shows it, the same in the CLI, over MQTT and HTTP: the
    local label ("S1") whenever the recording was analysed; the profile's id, name and score
    when the voice has one, with `provisional` true for a voice grouped automatically
    (`unknown-N`, what Home Assistant's Last speaker shows too); id, name and score null when
    it has none; None when speaker analysis did not run."""
    if label is None and speaker_id is None:
        return None
    if speaker_id is None:
        name = score = None
    return {
        "label": label,
        "id": speaker_id,
        "name": name,
        "score": score,
        "provisional": speaker_id is not None and not known,
    }


def recording_details(
    conn: sqlite3.Connection, audio_dir: Path, rec_id: str
) -> dict[str, Any] | None:
    """The recording row (its audio as a full path) with its segments (times relative to the
    recording); its `state` is what `recordings list` calls it (`running` while a worker has
    its job)."""
    row = conn.execute(
        "SELECT r.*, CASE WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.recording_id = r.id"
        " AND j.state = 'running') THEN 'running' ELSE r.status END AS state"
        " FROM recordings r WHERE r.id=?",
        (normalise_id(rec_id),),
    ).fetchone()
    if row is None:
        return None
    data = dict(zip(row.keys(), tuple(row), strict=True))
    del data["status"]  # one name for it everywhere: `state`
    for key in ("start_s", "end_s", "duration_s"):  # to the ms, as `recordings list` gives them
        data[key] = round(data[key], 3)
    if data["audio_path"]:
        data["audio_path"] = str(audio_file(audio_dir, data["audio_path"]))
    data["segments"] = [
        {
            "start_s": round(s["start_s"], 3),  # was 30.432000000000002
            "end_s": round(s["end_s"], 3),
            "text": s["text"],
            "avg_logprob": s["avg_logprob"],
            "no_speech_prob": s["no_speech_prob"],
            "compression_ratio": s["compression_ratio"],
            "suspect": s["suspect"],
            "words": json.loads(s["words"]) if s["words"] else [],
            "speaker": speaker_payload(
                s["speaker_label"],
                s["speaker_id"],
                s["p_name"],
                s["speaker_score"],
                bool(s["speaker_id"] and s["p_name"] and not s["p_provisional"]),
            ),
        }
        for s in conn.execute(
            "SELECT s.*, p.name AS p_name, p.provisional AS p_provisional FROM segments s"
            " LEFT JOIN speakers p ON p.id = s.speaker_id WHERE s.recording_id=? ORDER BY s.idx",
            (data["id"],),
        )
    ]
    # Every voice analysed in it, as `analyze --json` gives them (voice_matches: as stored).
    data["speakers"] = [
        {
            **(
                speaker_payload(
                    m["label"],
                    m["speaker_id"],
                    m["name"],
                    m["score"],
                    bool(m["speaker_id"] and m["name"] and not m["provisional"]),
                )
                or {}
            ),
            "speech_s": round(m["speech_s"], 2),
        }
        for m in voice_matches(conn, data["id"])
    ]
    return data


def voice_matches(conn: sqlite3.Connection, rec_id: str) -> list[dict[str, Any]]:
    """Who each local speaker of a recording was matched to, as stored: the score and the
    margin over the runner-up kept for an unknown voice too (`recordings show` prints them)."""
    return [
        dict(zip(m.keys(), tuple(m), strict=True))
        for m in conn.execute(
            "SELECT m.label, m.speaker_id, p.name, p.provisional, m.score, m.margin, m.speech_s"
            " FROM speaker_mappings m LEFT JOIN speakers p ON p.id = m.speaker_id"
            " WHERE m.recording_id=? ORDER BY m.label",
            (rec_id,),
        )
    ]


def analysis_record(conn: sqlite3.Connection, audio_dir: Path, rec_id: str) -> dict[str, Any]:
    """One recording as `analyze --json` prints it (segment times are offsets into the file),
    with every voice analysed in it, even one whose words Whisper distrusted."""
    data = recording_details(conn, audio_dir, rec_id) or {}
    offset = data.get("start_s", 0.0)
    return {
        "id": data.get("id", rec_id),
        "start_s": round(data.get("start_s", 0.0), 3),
        "end_s": round(data.get("end_s", 0.0), 3),
        "text": data.get("text"),
        "state": data.get("state"),
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
        "speakers": data.get("speakers", []),
    }
