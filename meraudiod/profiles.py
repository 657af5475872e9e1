"""Stored voice profiles, as an admin manages them: list, rename, merge, delete, opt out (enrol
and `speakers test` in enrolment.py).

A profile is a row in `speakers` with several embeddings in `speaker_embeddings` (one per
enrolment clip or, for a provisional "unknown-N" profile, per recording it was grown from).
Renaming a provisional profile makes it a named person; merging moves one profile's
embeddings and attributions into another. Deleting removes the embeddings (and, if asked,
every recording the person was heard in). A "do not keep" profile is still recognised, so
that recordings matched to it are deleted once processed (worker.py).
"""

from __future__ import annotations

import sqlite3
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from . import models
from .audio import Float32Array
from .config import Settings
from .db import Transaction, now
from .deletion import delete_recordings, forget_deleted_text, mark_unforgotten
from .scoring import Calibration
from .speaker_commands import MAX_NAME_CHARS
from .speakers import is_provisional_name
from .voiceprints import load_profiles, model_id


class ProfileError(Exception):
    """A profile operation is not possible; the message says why."""


class Missing(ProfileError):
    """The profile, file or recording named does not exist."""


class NameTaken(ProfileError):
    """Another profile has that name already: merging the two is the way, which each surface
    words as its own (speaker_commands.name_taken)."""

    def __init__(self, source: str, target: str) -> None:
        super().__init__(f"{target!r} exists already")
        self.source = source  # the profile renamed, as stored
        self.target = target


def current_model(settings: Settings) -> str:
    """The id embeddings of the configured model are stored with (without loading it)."""
    name = settings.speakers.model
    if name in models.manifest():
        return model_id(name, Path(name))
    return model_id(name, Path(name).expanduser())


# Speech enough for a good reference (enrolment.clip_warnings says when a clip has less),
# and the length `consistency` scores each embedding at.
GOOD_ENROL_SPEECH_S: Final = 3.0


@dataclass(frozen=True)
class ProfileInfo:
    """One profile as `speakers list` shows it."""

    id: str
    name: str
    provisional: bool
    opt_out: bool
    embeddings: int  # usable with the current model
    stale: int  # made with another model: ignored until re-enrolled
    speech_s: float
    recordings: int
    last_heard_at: float | None
    created_at: float
    # How alike its embeddings are: the lowest confidence of one against the others (None
    # with a single embedding). Low means one clip is unlike the rest: re-enrol it.
    consistency: float | None = None


def profile_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    """The named profile's row (find_profile); Missing names the command that lists them."""
    row = find_profile(conn, name)
    if row is None:
        raise Missing(f"no speaker named {name!r} (see `meraudiod speakers list`)")
    return row


def find_profile(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    """The profile of that name as typed, or as stored: without its surrounding spaces, in
    Unicode's composed or (a name stored by an older version) decomposed form."""
    bare = name.strip()
    forms = (name, bare, _composed(bare), unicodedata.normalize("NFD", bare))
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM speakers WHERE name IN (?, ?, ?, ?) ORDER BY name=? DESC",
        (*forms, name),
    ).fetchone()
    return row


# Inside a word, joiners are part of a name: an emoji sequence, a Persian or Indic name.
_JOINERS: Final = frozenset("\u200c\u200d")


def _unseen(char: str) -> bool:
    """A format character (zero-width space, bidi override, BOM) or a line or paragraph
    separator: "Alice\u200b" looks like Alice, "\u202eecilA" shows as Alice."""
    return unicodedata.category(char) in ("Cf", "Zl", "Zp") and char not in _JOINERS


def _composed(name: str) -> str:
    """Unicode's composed form (NFC): "Mu\u0308ller", as a Mac types it, is "Müller"."""
    return unicodedata.normalize("NFC", name)


def check_name(name: str) -> str:
    """A person's name as stored, without surrounding spaces (" Alice" is Alice, not a
    second person) and composed (a decomposed "ü" made a second "Müller" that looked the
    same): not empty, no control characters (a new line would forge a line of a log or a
    table), not of the form the device gives unknown voices, and not "." or ".."."""
    name = _composed(name.strip())
    if not name:
        raise ProfileError("a speaker needs a name")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ProfileError(f"{name!r}: a speaker's name cannot hold control characters")
    if any(_unseen(c) for c in name):
        raise ProfileError(
            f"{name!r}: a speaker's name cannot hold invisible characters (a zero-width space,"
            " a direction override, a line separator): it would look like another name"
        )
    if len(name) > MAX_NAME_CHARS:
        raise ProfileError(
            f"{name[:20]!r}...: a speaker's name is at most {MAX_NAME_CHARS} characters,"
            f" not {len(name)}"
        )
    if is_provisional_name(name):
        raise ProfileError(
            f"{name!r} has the form of a provisional voice (unknown-N): choose another name"
        )
    if name in (".", ".."):  # a browser resolves /persistent-speakers/.. to /api/v1
        raise ProfileError(f"{name!r}: a URL's path cannot name a speaker so: choose another name")
    return name


def consistency(vectors: Float32Array, calibration: Calibration) -> float | None:
    """The lowest confidence of any one embedding against the others (enrolment length)."""
    if len(vectors) < 2:
        return None
    scores = []
    for i in range(len(vectors)):
        others = np.delete(vectors, i, axis=0)
        score = calibration.normalise(others, vectors[i])
        scores.append(calibration.confidence(score, GOOD_ENROL_SPEECH_S))
    return round(min(scores), 3)


def list_profiles(
    conn: sqlite3.Connection, model: str, calibration: Calibration | None = None
) -> list[ProfileInfo]:
    """Every profile, named ones first, with embedding counts and when it was last heard
    (and, with the calibration, how consistent its embeddings are)."""
    vectors = {p.id: p.vectors for p in load_profiles(conn, model)}
    rows = conn.execute(
        "SELECT p.*,"
        " (SELECT COUNT(*) FROM speaker_embeddings e WHERE e.speaker_id=p.id AND e.model=?)"
        "  AS usable,"
        " (SELECT COUNT(*) FROM speaker_embeddings e WHERE e.speaker_id=p.id AND e.model!=?)"
        "  AS stale,"
        " (SELECT COALESCE(SUM(duration_s), 0) FROM speaker_embeddings e"
        "  WHERE e.speaker_id=p.id) AS speech_s,"
        " (SELECT COUNT(DISTINCT m.recording_id) FROM speaker_mappings m"
        "  WHERE m.speaker_id=p.id) AS recordings,"
        " (SELECT MAX(r.started_at) FROM speaker_mappings m JOIN recordings r"
        "  ON r.id=m.recording_id WHERE m.speaker_id=p.id) AS last_heard_at"
        " FROM speakers p ORDER BY p.provisional, p.name",
        (model, model),
    )
    return [
        ProfileInfo(
            id=r["id"],
            name=r["name"],
            provisional=bool(r["provisional"]),
            opt_out=bool(r["opt_out"]),
            embeddings=int(r["usable"]),
            stale=int(r["stale"]),
            speech_s=float(r["speech_s"]),
            recordings=int(r["recordings"]),
            last_heard_at=r["last_heard_at"],
            created_at=float(r["created_at"]),
            consistency=(
                consistency(vectors[r["id"]], calibration)
                if calibration is not None and r["id"] in vectors
                else None
            ),
        )
        for r in rows
    ]


def rename(conn: sqlite3.Connection, old: str, new: str) -> tuple[str, str]:
    """Give a profile a new name; a provisional one becomes a named person. Returns the old
    and the new name as stored (without the spaces typed around them)."""
    new = check_name(new)
    with Transaction(conn):
        speaker = profile_row(conn, old)
        holder = find_profile(conn, new)
        if holder is not None and holder["id"] != speaker["id"]:  # its own name: nothing to do
            raise NameTaken(str(speaker["name"]), new)
        conn.execute(
            "UPDATE speakers SET name=?, provisional=0, updated_at=? WHERE id=?",
            (new, now(), speaker["id"]),
        )
    return str(speaker["name"]), new


def merge(conn: sqlite3.Connection, source: str, target: str) -> int:
    """Fold profile `source` into `target` (embeddings, attributions); returns embeddings moved.

    The merged profile is "do not keep" if either was.
    """
    with Transaction(conn):
        src, dst = profile_row(conn, source), profile_row(conn, target)
        if src["id"] == dst["id"]:
            raise ProfileError("cannot merge a speaker into itself")
        moved = conn.execute(
            "UPDATE speaker_embeddings SET speaker_id=? WHERE speaker_id=?", (dst["id"], src["id"])
        ).rowcount
        conn.execute("UPDATE segments SET speaker_id=? WHERE speaker_id=?", (dst["id"], src["id"]))
        conn.execute(
            "UPDATE speaker_mappings SET speaker_id=? WHERE speaker_id=?", (dst["id"], src["id"])
        )
        conn.execute(
            "UPDATE speakers SET opt_out=MAX(opt_out, ?), updated_at=? WHERE id=?",
            (src["opt_out"], now(), dst["id"]),
        )
        conn.execute("DELETE FROM speakers WHERE id=?", (src["id"],))
    return int(moved)


@dataclass(frozen=True)
class Deleted:
    """What `delete` removed."""

    embeddings: int
    recordings: int


def delete(
    conn: sqlite3.Connection, audio_dir: Path, name: str, with_recordings: bool = False
) -> Deleted:
    """Remove a profile and its embeddings; with_recordings also every recording it spoke in."""
    speaker_id = str(profile_row(conn, name)["id"])
    # Counted first: deleting its recordings deletes the embeddings learnt from them.
    (embeddings,) = conn.execute(
        "SELECT COUNT(*) FROM speaker_embeddings WHERE speaker_id=?", (speaker_id,)
    ).fetchone()
    recordings = 0
    if with_recordings:
        ids = [
            str(r[0])
            for r in conn.execute(
                "SELECT recording_id FROM speaker_mappings WHERE speaker_id=?"
                " UNION SELECT recording_id FROM segments WHERE speaker_id=?",
                (speaker_id, speaker_id),
            )
        ]
        # Called with none left too: a delete killed before the index was merged is finished.
        recordings = delete_recordings(conn, audio_dir, ids).recordings
    with Transaction(conn):
        mark_unforgotten(conn)
        conn.execute("UPDATE segments SET speaker_id=NULL WHERE speaker_id=?", (speaker_id,))
        conn.execute("DELETE FROM speakers WHERE id=?", (speaker_id,))  # embeddings cascade
    # The voiceprints, the name and the clips' paths leave the log too (with the daemon
    # holding the database open, the log kept them until some later delete's checkpoint).
    forget_deleted_text(conn)
    return Deleted(int(embeddings), recordings)


def set_opt_out(conn: sqlite3.Connection, name: str, opt_out: bool) -> None:
    """Mark a profile "do not keep" (recordings matched to it are deleted), or undo that."""
    with Transaction(conn):
        speaker = profile_row(conn, name)
        conn.execute(
            "UPDATE speakers SET opt_out=?, updated_at=? WHERE id=?",
            (int(opt_out), now(), speaker["id"]),
        )


def voice_clips(conn: sqlite3.Connection, name: str, limit: int = 20) -> list[dict[str, Any]]:
    """The latest segments this voice said that still have audio, newest first (times
    relative to the recording): what a reviewer listens to before naming a voice."""
    speaker = profile_row(conn, name)
    rows = conn.execute(
        "SELECT s.recording_id, s.start_s, s.end_s, s.text FROM segments s"
        " JOIN recordings r ON r.id = s.recording_id"
        " WHERE s.speaker_id=? AND r.audio_path IS NOT NULL"
        " ORDER BY s.recording_id DESC, s.idx LIMIT ?",
        (speaker["id"], limit),
    )
    return [dict(zip(row.keys(), tuple(row), strict=True)) for row in rows]
