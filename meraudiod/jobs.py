"""Durable SQLite job queue: enqueue, claim with a lease, complete, fail with retry, requeue.

Functions that change a job take the connection and run inside the caller's transaction, so
a job is completed in the same transaction that stores its results.

A job's `origin` is the process that queued it: NULL for the daemon's own (kept across its
restarts), `host:pid` for a one-off process such as `analyze`, which claims and waits for
only its own jobs. `attempts` counts failed attempts; `crashes` counts the times the process
died while it worked on the job, so a recording that kills the transcriber is given up on, and
crashes never use up the attempts of a genuine failure. What the process is working on is
noted in a file outside the database (note_working), removed when it is done with the job
(done_working), whether or not the database could take the outcome (a full or read-only disk,
another process's write lock on a stop): a job left `running` is then given back by the next
start with no crash counted; only one whose note is still there died with its process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .db import Transaction, now

REPROCESS_KIND: Final = "retranscribe"  # a recording transcribed again on request
_WORKING_SUFFIX: Final = ".working"  # notes_dir/job-ID.working holds its owner
# Updated further ahead of the clock than this: before the clock was set back.
_FROM_THE_FUTURE_S: Final = 60.0


@dataclass(frozen=True)
class Job:
    """A claimed job."""

    id: int
    recording_id: str
    kind: str
    attempts: int  # this is the job's n-th try (failed ones before it + 1)


def owner_id() -> str:
    """host:pid of this process, stored with a claim so a restart can tell it is dead."""
    return f"{socket.gethostname()}:{os.getpid()}"


def enqueue(
    conn: sqlite3.Connection,
    recording_id: str,
    kind: str = "transcribe",
    origin: str | None = None,
) -> int:
    """Add a pending job (call inside the transaction that inserts the recording); `origin`
    None makes it the daemon's."""
    t = now()
    cur = conn.execute(
        "INSERT INTO jobs (recording_id, kind, state, origin, created_at, updated_at)"
        " VALUES (?, ?, 'pending', ?, ?, ?)",
        (recording_id, kind, origin, t, t),
    )
    return int(cur.lastrowid or 0)


def exists(conn: sqlite3.Connection, job_id: int) -> bool:
    """The job is still there (not deleted with its recording, nor replaced by a reprocess)."""
    return conn.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is not None


def _mine(origin: str | None) -> tuple[str, tuple[str, ...]]:
    """SQL condition (and its parameters) for the jobs a process works on: its own when it
    has an origin, else the daemon's."""
    return ("origin = ?", (origin,)) if origin is not None else ("origin IS NULL", ())


# Sorts a job false (0) for the device's own audio, true (1) for an upload's (http/uploads.py).
_UPLOADED: Final = ("upload:", "client:")
_UPLOADED_LAST: Final = (
    "(SELECT "
    + " OR ".join(f"source LIKE '{prefix}%'" for prefix in _UPLOADED)
    + " FROM recordings WHERE recordings.id = jobs.recording_id)"
)
# A pending job that may be taken now (parameters: now, now + _FROM_THE_FUTURE_S; see claim).
_DUE: Final = "(not_before IS NULL OR not_before <= ? OR updated_at > ?)"


def claim(
    conn: sqlite3.Connection,
    lease_s: float,
    owner: str | None = None,
    origin: str | None = None,
    before_commit: Callable[[int], None] | None = None,
) -> Job | None:
    """Take the oldest pending job that is due, leased to this process for `lease_s` seconds;
    the device's own audio (microphone, live streams) before files uploaded over HTTP, so a
    flood of uploads never holds up the room's transcripts.

    Only jobs of `origin` (None: the daemon's) are taken. A job last updated "in the
    future" was failed before the clock was set back (a bad RTC, then NTP): its retry time
    is as far off as the step, so it is due now. `before_commit` gets the job's id before the
    claim is committed (note_working: a death right after the claim is one during the job).
    The lease is there to tell, after the process died, that it died on this job; a power
    cut is no such death, so the claim needs no fsync of its own (a power cut may undo it:
    the job is then simply pending).
    """
    t = now()
    mine, args = _mine(origin)
    with Transaction(conn, durable=False):
        row = conn.execute(
            "UPDATE jobs SET state='running', lease_until=?, owner=?,"
            " updated_at=? WHERE id = (SELECT id FROM jobs WHERE state='pending'"
            f" AND {mine} AND {_DUE}"
            f" ORDER BY {_UPLOADED_LAST}, id LIMIT 1) RETURNING id, recording_id, kind, attempts",
            (t + lease_s, owner or owner_id(), t, *args, t, t + _FROM_THE_FUTURE_S),
        ).fetchone()
        if row is not None and before_commit is not None:
            before_commit(int(row["id"]))
    if row is None:
        return None
    return Job(int(row["id"]), str(row["recording_id"]), str(row["kind"]), int(row["attempts"]) + 1)


def uploaded(source: str) -> bool:
    """A recording of a file uploaded over HTTP, not of the device's own audio."""
    return source.startswith(_UPLOADED)


def room_waiting(conn: sqlite3.Connection, origin: str | None = None) -> bool:
    """A job of the device's own audio is pending and due: an upload being transcribed
    yields to it (worker.py)."""
    mine, args = _mine(origin)
    t = now()
    return (
        conn.execute(
            f"SELECT 1 FROM jobs WHERE state='pending' AND {mine} AND {_DUE}"
            f" AND {_UPLOADED_LAST} = 0 LIMIT 1",
            (*args, t, t + _FROM_THE_FUTURE_S),
        ).fetchone()
        is not None
    )


def complete(conn: sqlite3.Connection, job_id: int) -> None:
    """Mark done (inside the caller's transaction)."""
    conn.execute(
        "UPDATE jobs SET state='done', lease_until=NULL, error=NULL, updated_at=? WHERE id=?",
        (now(), job_id),
    )


def fail(
    conn: sqlite3.Connection, job_id: int, error: str, max_attempts: int, retry_delay_s: float
) -> bool:
    """Record the error; the job goes back to pending until it has used max_attempts.

    The next attempt waits retry_delay_s, doubling with each attempt, so a recording that
    fails for a passing reason (memory, a busy disk) is not retried in a tight loop while the
    jobs behind it go on. Returns True when the job is now failed for good.
    """
    row = conn.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
    attempts = int(row["attempts"]) + 1 if row is not None else max_attempts
    final = attempts >= max_attempts
    t = now()
    conn.execute(
        "UPDATE jobs SET state=?, attempts=?, lease_until=NULL, error=?, not_before=?,"
        " updated_at=? WHERE id=?",
        (
            "failed" if final else "pending",
            attempts,
            error[:2000],
            None if final else t + retry_delay_s * 2 ** (attempts - 1),
            t,
            job_id,
        ),
    )
    return final


def release(conn: sqlite3.Connection, job_id: int) -> None:
    """Give a claimed job back as it was, no attempt counted (its transcript found no room
    in the database: not the recording's fault)."""
    with Transaction(conn, durable=False):
        conn.execute(
            "UPDATE jobs SET state='pending', lease_until=NULL, owner=NULL, updated_at=?"
            " WHERE id=? AND state='running'",
            (now(), job_id),
        )


def defer(conn: sqlite3.Connection, job_id: int, error: str, wait_s: float) -> None:
    """Back to pending, due in wait_s, no attempt counted: the transcription servers failed
    it, not the recording (server_faults.py); inside the caller's transaction."""
    t = now()
    conn.execute(
        "UPDATE jobs SET state='pending', lease_until=NULL, owner=NULL, error=?, not_before=?,"
        " updated_at=? WHERE id=? AND state='running'",
        (error[:2000], t + wait_s, t, job_id),
    )


def note_working(notes_dir: Path, job_id: int, owner: str | None = None) -> None:
    """Say, outside the database, that this process (or `owner`) works on a job: if it dies
    meanwhile, the next start finds this file naming the job's owner and counts a crash. In
    the runtime directory (storage.run_dir: a tmpfs under systemd), which a full or read-only
    data disk leaves writable; no fsync: a power cut is no crash. OSError when it cannot be
    written."""
    path = notes_dir / f"job-{job_id}{_WORKING_SUFFIX}"
    path.write_text(owner or owner_id(), encoding="utf-8")


def done_working(notes_dir: Path, job_id: int) -> None:
    """The process is done with a job, its outcome stored or not (a stop, a disk that refused
    it): a job it leaves `running` is given back by the next start, no crash counted.
    Removing a file works on a full disk too. OSError when it cannot be removed."""
    (notes_dir / f"job-{job_id}{_WORKING_SUFFIX}").unlink(missing_ok=True)


def _working(notes_dir: Path) -> dict[Path, tuple[int, str]]:
    """The notes of note_working: each file's job id and owner (empty when cut short)."""
    notes: dict[Path, tuple[int, str]] = {}
    for path in notes_dir.glob(f"job-*{_WORKING_SUFFIX}"):
        number = path.name.removeprefix("job-").removesuffix(_WORKING_SUFFIX)
        try:
            owner = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            owner = ""
        notes[path] = (int(number) if number.isdigit() else 0, owner)
    return notes


def error_of(conn: sqlite3.Connection, recording_id: str) -> str:
    """What the recording's last job failed with ('' when it did not)."""
    row = conn.execute(
        "SELECT error FROM jobs WHERE recording_id=? ORDER BY id DESC LIMIT 1", (recording_id,)
    ).fetchone()
    return str(row[0] or "") if row else ""


def fail_for_good(conn: sqlite3.Connection, job_id: int, error: str) -> None:
    """No retry can help (the audio is gone): failed at once (inside the caller's transaction)."""
    conn.execute(
        "UPDATE jobs SET state='failed', attempts=attempts+1, lease_until=NULL, error=?,"
        " not_before=NULL, updated_at=? WHERE id=?",
        (error[:2000], now(), job_id),
    )


def requeue_stale(
    conn: sqlite3.Connection,
    notes_dir: Path,
    max_crashes: int = 3,
    expired_leases: bool = True,
) -> int:
    """Recover what dead processes left; returns how many running jobs went back to pending.

    A running job whose owner on this host is dead (or, with expired_leases, at start,
    whose lease expired, or which was claimed before this machine booted: after a power cut
    its pid may be another process's, or this one's, its lease still running) goes back to
    pending; with one more crash counted when its owner's note (note_working) is still in
    `notes_dir`: it died working on it. At `max_crashes` it is failed for good with the
    reason stored, so a recording that kills the process cannot make a crash loop. Jobs
    queued by a dead one-off process (an interrupted `analyze`) become the daemon's.
    """
    t = now()
    booted_at = boot_time()
    notes = _working(notes_dir)
    working = {job_id: owner for job_id, owner in notes.values()}
    released: list[int] = []
    requeued: list[int] = []
    given_up: list[int] = []
    for row in conn.execute(
        "SELECT id, owner, lease_until, crashes, updated_at FROM jobs WHERE state='running'"
    ):
        # Claimed on this host before it booted: after a power cut its pid may be alive again.
        before_boot = _of_this_host(row["owner"]) and row["updated_at"] < booted_at
        lapsed = (row["lease_until"] or 0) < t or before_boot
        if (expired_leases and lapsed) or _dead(row["owner"]):
            if working.get(int(row["id"])) != row["owner"]:  # done with it: a stop
                released.append(int(row["id"]))
                continue
            crashed = int(row["crashes"]) + 1
            (given_up if crashed >= max_crashes else requeued).append(int(row["id"]))
    orphaned = [
        int(row["id"])
        for row in conn.execute(
            "SELECT id, origin FROM jobs"
            " WHERE origin IS NOT NULL AND state IN ('pending', 'running')"
        )
        if _dead(row["origin"])
    ]
    with Transaction(conn):
        for job_id in released:
            conn.execute(
                "UPDATE jobs SET state='pending', lease_until=NULL, owner=NULL, updated_at=?"
                " WHERE id=? AND state='running'",
                (t, job_id),
            )
        for job_id in requeued:
            conn.execute(
                "UPDATE jobs SET state='pending', crashes=crashes+1, lease_until=NULL,"
                " owner=NULL, updated_at=? WHERE id=? AND state='running'",
                (t, job_id),
            )
        for job_id in given_up:
            conn.execute(
                "UPDATE jobs SET state='failed', crashes=crashes+1, lease_until=NULL,"
                " error='the process died ' || (crashes+1) || ' times while working on this"
                " recording: given up (meraudiod jobs --retry-failed tries again)',"
                " updated_at=? WHERE id=? AND state='running'",
                (t, job_id),
            )
            conn.execute(
                "UPDATE recordings SET status='failed' WHERE id ="
                " (SELECT recording_id FROM jobs WHERE id=?)",
                (job_id,),
            )
        for job_id in orphaned:
            conn.execute("UPDATE jobs SET origin=NULL WHERE id=?", (job_id,))
    for path, (_, owner) in notes.items():  # used, or left by a process that is gone
        if not _of_this_host(owner) or _dead(owner):
            with contextlib.suppress(OSError):  # kept, it is harmless: its job is not running
                path.unlink(missing_ok=True)
    return len(requeued) + len(released)


def _of_this_host(process: str | None) -> bool:
    """Is this host:pid (an owner_id) a process of this host?"""
    return str(process or "").rpartition(":")[0] == socket.gethostname()


def _dead(process: str | None) -> bool:
    """Is this host:pid a process of this host that is no longer running?"""
    pid = str(process or "").rpartition(":")[2]
    return _of_this_host(process) and not (pid.isdigit() and pid_alive(int(pid)))


def boot_time() -> float:
    """When this machine booted, on the wall clock (/proc/stat's btime); 0.0 when unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


def pid_alive(pid: int) -> bool:
    """Is a process with this id running (on this host)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass(frozen=True)
class Retried:
    """What `retry_failed` did: jobs queued again, and recordings left failed with why."""

    requeued: int
    skipped: dict[str, str]  # recording id -> why it was not queued again


def retry_failed(
    conn: sqlite3.Connection, why_not: Callable[[str | None], str | None] | None = None
) -> Retried:
    """Give every failed job a fresh set of attempts, except those whose recording's stored
    audio path `why_not` gives a reason for (its audio gone: queued, the job would only fail
    again at once)."""
    skipped: dict[str, str] = {}
    requeued = 0
    with Transaction(conn):
        rows = conn.execute(
            "SELECT j.id, j.recording_id, r.audio_path FROM jobs j"
            " LEFT JOIN recordings r ON r.id = j.recording_id WHERE j.state='failed'"
            " ORDER BY j.id"
        ).fetchall()
        for job_id, rec_id, audio_path in rows:
            reason = why_not(audio_path) if why_not is not None else None
            if reason is not None:
                skipped[str(rec_id)] = reason
                continue
            conn.execute(
                "UPDATE jobs SET state='pending', attempts=0, crashes=0, not_before=NULL,"
                " updated_at=? WHERE id=?",
                (now(), job_id),
            )
            requeued += 1
    return Retried(requeued, skipped)


def retry_now(conn: sqlite3.Connection, origin: str | None = None) -> int:
    """Pending jobs (of `origin`) waiting for their retry time become due now."""
    mine, args = _mine(origin)
    with Transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET not_before=NULL WHERE state='pending' AND not_before IS NOT NULL"
            f" AND {mine}",
            args,
        )
    return cur.rowcount


def unfinished(conn: sqlite3.Connection, origin: str | None = None) -> int:
    """Recordings with pending or running jobs of `origin` (None: the daemon's)."""
    mine, args = _mine(origin)
    row = conn.execute(
        "SELECT COUNT(DISTINCT recording_id) FROM jobs"
        f" WHERE state IN ('pending', 'running') AND {mine}",
        args,
    ).fetchone()
    return int(row[0])


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Jobs per state (every state present, zero when none)."""
    result = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
        result[str(row["state"])] = int(row["n"])
    return result


def backlog(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Pending, running and failed jobs, oldest first, with their errors."""
    rows = conn.execute(
        "SELECT j.id, j.recording_id, j.kind, j.state, j.attempts, j.error, j.not_before,"
        " j.created_at, j.updated_at, r.duration_s"
        " FROM jobs j JOIN recordings r ON r.id = j.recording_id"
        " WHERE j.state != 'done' ORDER BY j.id"
    )
    return [dict(zip(row.keys(), tuple(row), strict=True)) for row in rows]
