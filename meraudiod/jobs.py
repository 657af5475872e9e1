"""Durable SQLite job queue: enqueue, claim with a lease, complete, fail with retry, requeue.

Functions that change a job take the connection and run inside the caller's transaction, so
a job is completed in the same transaction that stores its results.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from dataclasses import dataclass
from typing import Any, Final

from .db import Transaction, now

REPROCESS_KIND: Final = "retranscribe"  # a recording transcribed again on request


@dataclass(frozen=True)
class Job:
    """A claimed job."""

    id: int
    recording_id: str
    kind: str
    attempts: int


def owner_id() -> str:
    """host:pid of this process, stored with a claim so a restart can tell it is dead."""
    return f"{socket.gethostname()}:{os.getpid()}"


def enqueue(conn: sqlite3.Connection, recording_id: str, kind: str = "transcribe") -> int:
    """Add a pending job (call inside the transaction that inserts the recording)."""
    t = now()
    cur = conn.execute(
        "INSERT INTO jobs (recording_id, kind, state, created_at, updated_at)"
        " VALUES (?, ?, 'pending', ?, ?)",
        (recording_id, kind, t, t),
    )
    return int(cur.lastrowid or 0)


def claim(conn: sqlite3.Connection, lease_s: float, owner: str | None = None) -> Job | None:
    """Take the oldest pending job that is due, leased to this process for `lease_s` seconds."""
    t = now()
    with Transaction(conn):
        row = conn.execute(
            "UPDATE jobs SET state='running', attempts=attempts+1, lease_until=?, owner=?,"
            " updated_at=? WHERE id = (SELECT id FROM jobs WHERE state='pending'"
            " AND (not_before IS NULL OR not_before <= ?) ORDER BY id LIMIT 1)"
            " RETURNING id, recording_id, kind, attempts",
            (t + lease_s, owner or owner_id(), t, t),
        ).fetchone()
    if row is None:
        return None
    return Job(int(row["id"]), str(row["recording_id"]), str(row["kind"]), int(row["attempts"]))


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
    attempts = int(row["attempts"]) if row is not None else max_attempts
    final = attempts >= max_attempts
    t = now()
    conn.execute(
        "UPDATE jobs SET state=?, lease_until=NULL, error=?, not_before=?, updated_at=? WHERE id=?",
        (
            "failed" if final else "pending",
            error[:2000],
            None if final else t + retry_delay_s * 2 ** (attempts - 1),
            t,
            job_id,
        ),
    )
    return final


def requeue_stale(conn: sqlite3.Connection) -> int:
    """Running jobs whose lease expired, or whose owner on this host is dead, go back to pending."""
    t = now()
    host = socket.gethostname()
    stale = []
    for row in conn.execute("SELECT id, owner, lease_until FROM jobs WHERE state='running'"):
        owner_host, _, pid = str(row["owner"] or "").rpartition(":")
        owner_dead = owner_host == host and not (pid.isdigit() and pid_alive(int(pid)))
        if (row["lease_until"] or 0) < t or owner_dead:
            stale.append(int(row["id"]))
    with Transaction(conn):
        for job_id in stale:
            conn.execute(
                "UPDATE jobs SET state='pending', lease_until=NULL, owner=NULL, updated_at=?"
                " WHERE id=? AND state='running'",
                (t, job_id),
            )
    return len(stale)


def pid_alive(pid: int) -> bool:
    """Is a process with this id running (on this host)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def retry_failed(conn: sqlite3.Connection) -> int:
    """Give every failed job a fresh set of attempts."""
    with Transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET state='pending', attempts=0, not_before=NULL, updated_at=?"
            " WHERE state='failed'",
            (now(),),
        )
    return cur.rowcount


def retry_now(conn: sqlite3.Connection) -> int:
    """Pending jobs waiting for their retry time become due now."""
    with Transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET not_before=NULL WHERE state='pending' AND not_before IS NOT NULL"
        )
    return cur.rowcount


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
