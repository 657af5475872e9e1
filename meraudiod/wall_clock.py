"""Wall-clock time stamps that follow a step of the clock.

A device without a clock battery (a Raspberry Pi) boots with the time it last saved, days or
weeks behind when it was off that long, and NTP steps the clock once the network is up, often
after the daemon started listening. The listener's stamps follow the clock as it is (each is
the stream position on the boot clock, plus the wall clock's offset from it), and the
recordings saved before a step are restamped by it: they would otherwise keep a time in the
past, and `retention.audio_days` would delete a recording made minutes ago.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from typing import Final

from .db import Transaction, is_busy

_LOGGER = logging.getLogger(__name__)

# The offset of the wall clock from the boot clock changes only when the wall clock is stepped
# (NTP's slewing changes both clocks' rate alike); a change of less than this is not one.
_STEP_S: Final = 2.0
# Recordings saved since the last step that a step restamps: days of a busy room.
_MAX_RESTAMPED: Final = 10_000
_BATCH: Final = 500  # ids per UPDATE


def _offset_s() -> float:
    """The wall clock minus the boot clock (which counts time suspended, and never steps)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


# This process's start by the wall clock then, and the wall clock's offset then.
_RUN_STARTED_AT: Final = time.time()
_RUN_OFFSET_S: Final = _offset_s()


def this_run_age_cutoff(cutoff: float) -> tuple[float, float]:
    """For deleting by age what was stamped with `now()` before `cutoff`: (this process's
    start, the cutoff for what it stamped itself). After the wall clock was stepped forward,
    what this run stamped before the step looks older than it is by the step, so its cutoff
    is earlier by that much; what earlier runs stamped keeps `cutoff`."""
    forward_s = _offset_s() - _RUN_OFFSET_S
    return _RUN_STARTED_AT, cutoff - forward_s if forward_s >= _STEP_S else cutoff


class StreamClock:
    """Wall-clock times of one stream's positions, and the recordings stamped with them."""

    def __init__(self) -> None:
        self._offset = _offset_s()
        self._start_boot_s = time.clock_gettime(time.CLOCK_BOOTTIME)
        # Every recording of the stream: a step moves them all, also those an earlier step
        # moved (their stamps are by the clock that was just found wrong too).
        self._stamped: deque[str] = deque(maxlen=_MAX_RESTAMPED)
        self._owed: dict[str, float] = {}  # seconds a recording is still to be moved by

    def at(self, stream_s: float) -> float:
        """The wall-clock time of a stream position (seconds from the stream's start), by the
        clock as it was at the last `check`."""
        return self._offset + self._start_boot_s + stream_s

    def stamped(self, rec_id: str) -> None:
        """A recording was saved with times from `at`."""
        self._stamped.append(rec_id)

    def check(self, conn: sqlite3.Connection) -> float:
        """When the wall clock was stepped since the last check, stamp by the new clock from
        now on and restamp every recording stamped before (in one transaction; while the
        database is busy, at a later check). The step in seconds, 0.0 if none."""
        step_s = _offset_s() - self._offset
        if abs(step_s) < _STEP_S:
            step_s = 0.0
        else:
            self._offset += step_s
            for rec_id in self._stamped:
                self._owed[rec_id] = self._owed.get(rec_id, 0.0) + step_s
            _LOGGER.warning(
                "the wall clock was stepped by %+.1f s (set by NTP?): %d recordings saved"
                " before it restamped",
                step_s,
                len(self._stamped),
            )
        if self._owed:
            self._restamp_owed(conn)
        return step_s

    def _restamp_owed(self, conn: sqlite3.Connection) -> None:
        by_shift: dict[float, list[str]] = {}
        for rec_id, shift_s in self._owed.items():
            by_shift.setdefault(shift_s, []).append(rec_id)
        try:
            with Transaction(conn):
                for shift_s, ids in by_shift.items():
                    _restamp(conn, ids, shift_s)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            _LOGGER.warning("database busy (%s): recordings restamped later", exc)
            return
        self._owed.clear()


def _restamp(conn: sqlite3.Connection, ids: list[str], step_s: float) -> None:
    """Move the recordings' wall-clock times by step_s (inside the caller's transaction)."""
    for first in range(0, len(ids), _BATCH):
        batch = ids[first : first + _BATCH]
        conn.execute(
            "UPDATE recordings SET started_at = started_at + ?, ended_at = ended_at + ?,"
            f" closed_at = closed_at + ? WHERE id IN ({','.join('?' * len(batch))})",
            (step_s, step_s, step_s, *batch),
        )
