"""Wall-clock time stamps that follow a step of the clock.

A device without a clock battery (a Raspberry Pi) boots with the time it last saved, days or
weeks behind when it was off that long, and NTP steps the clock once the network is up, often
after the daemon started listening. The listener's stamps follow the clock as it is (each is
the stream position on the boot clock, plus the wall clock's offset from it), and the
recordings the process saved before a step are restamped by it: they would otherwise keep a
time in the past, and `retention.audio_days` would delete a recording made minutes ago. The
listener checks at every frame, and the retention sweep before it deletes anything.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections import OrderedDict
from typing import Final

from .db import Transaction, is_busy, waiting_at_most
from .wording import counted

_LOGGER = logging.getLogger(__name__)

# The offset of the wall clock from the boot clock changes only when the wall clock is stepped
# (NTP's slewing changes both clocks' rate alike); a change of less than this is not one.
_STEP_S: Final = 2.0
# Recordings saved since the last step that a step restamps: days of a busy room.
_MAX_RESTAMPED: Final = 10_000
_BATCH: Final = 500  # ids per UPDATE
# How long a restamp waits for another connection's write lock before it is tried again at a
# later check: the listener checks every frame, and must not stop listening for it.
_RESTAMP_WAIT_MS: Final = 200
_RESTAMP_RETRY_S: Final = 1.0
# A live stream that gave no frames, then frames later than its samples say by more than
# this, paused (a microphone's blocks arrive well within it).
_PAUSE_S: Final = 2.0


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


class _StepFollower:
    """The process's wall-clock offset as its stamps know it, and the recordings it stamped
    (whichever listener saved them: one stops with an unplugged microphone, and the clock may
    be stepped before the next starts), each with the offset it was stamped by."""

    def __init__(self) -> None:
        self.offset = _RUN_OFFSET_S
        self._lock = threading.Lock()
        self._stamped: OrderedDict[str, float] = OrderedDict()  # id -> offset stamped by
        self._behind = False  # some recording is stamped by an offset that is not the clock's
        self._retry_at = 0.0  # (time.monotonic()) after a busy database
        self._busy_said = False

    def stamped(self, rec_id: str, offset: float) -> None:
        with self._lock:
            self._stamped[rec_id] = offset
            self._behind = self._behind or offset != self.offset
            if len(self._stamped) > _MAX_RESTAMPED:
                self._stamped.popitem(last=False)

    def check(self, conn: sqlite3.Connection) -> bool:
        """Follow a step of the wall clock since the last check, and move every recording
        stamped by an offset that is not the clock's any more; True when none is left."""
        with self._lock:
            step_s = _offset_s() - self.offset
            if abs(step_s) >= _STEP_S:
                self.offset += step_s
                self._behind = bool(self._stamped)
                _LOGGER.warning(
                    "the wall clock was stepped by %+.1f s (set by NTP?): %s saved"
                    " before it restamped",
                    step_s,
                    counted(len(self._stamped), "recording"),
                )
            if not self._behind:
                return True
            if time.monotonic() < self._retry_at:
                return False
            owed = {i: self.offset - at for i, at in self._stamped.items() if at != self.offset}
            try:
                _restamp(conn, owed)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                if not self._busy_said:
                    _LOGGER.warning("database busy (%s): recordings restamped later", exc)
                self._busy_said, self._retry_at = True, time.monotonic() + _RESTAMP_RETRY_S
                return False
            self._busy_said = self._behind = False
            for rec_id in owed:
                self._stamped[rec_id] = self.offset
            return True


_FOLLOWER: Final = _StepFollower()


def follow_step(conn: sqlite3.Connection) -> bool:
    """Move the recordings this process stamped when the wall clock was stepped (see
    StreamClock); True when all are by the clock as it is (False: the database was busy)."""
    return _FOLLOWER.check(conn)


class StreamClock:
    """Wall-clock times of one stream's positions, by the process's clock (_StepFollower)."""

    def __init__(self, lead_s: float = 0.0) -> None:
        # The stream's start: lead_s before now for a file read faster than real time.
        self._start_boot_s = time.clock_gettime(time.CLOCK_BOOTTIME) - lead_s
        self._live = lead_s == 0.0  # a microphone, a pipe, a socket: heard as it comes
        self._offset = _FOLLOWER.offset  # the one of the last `at`
        # Of the last start, in boot time (a step does not move it); a replay's lead may
        # reach back before the boot.
        self._last_start_boot_s = -math.inf

    def at(self, stream_s: float) -> float:
        """The wall-clock time of a stream position (seconds from the stream's start), by the
        clock as it was at the last `follow_step`."""
        self._offset = _FOLLOWER.offset
        return self._offset + self._start_boot_s + stream_s

    def resumed(self, stream_s: float) -> None:
        """A live stream gave frames again, at `stream_s`, after a while it gave none. Its
        samples count its time only while they come: after a pause longer than _PAUSE_S (a
        sender that sends nothing in silence) it starts again from now, so what follows is
        stamped when it is heard, not as far behind as the pause lasted. (Frames that wait in
        a source's queue while the listener is slow are no pause: they keep their time.)"""
        if not self._live:
            return
        late_s = time.clock_gettime(time.CLOCK_BOOTTIME) - (self._start_boot_s + stream_s)
        if late_s > _PAUSE_S:
            self._start_boot_s += late_s

    def started_at(self, stream_s: float, length_s: float) -> float:
        """When a recording at that stream position, that long, began. A stream read faster
        than real time whose length was not known beforehand (a pipe) runs ahead of the
        clock: never a time to come, and never before the recording stamped before it (a long
        one saved after a short one would be)."""
        at = min(self.at(stream_s), time.time() - length_s)
        self._last_start_boot_s = max(at - self._offset, self._last_start_boot_s)
        return self._offset + self._last_start_boot_s

    def stamped(self, rec_id: str) -> None:
        """A recording was saved with times from the last `at`."""
        _FOLLOWER.stamped(rec_id, self._offset)


def _restamp(conn: sqlite3.Connection, owed: dict[str, float]) -> None:
    """Move each recording's wall-clock times by the seconds it is owed, in one transaction
    that waits only briefly for the write lock."""
    by_shift: dict[float, list[str]] = {}
    for rec_id, shift_s in owed.items():
        by_shift.setdefault(shift_s, []).append(rec_id)
    with waiting_at_most(conn, _RESTAMP_WAIT_MS / 1000), Transaction(conn):
        for shift_s, ids in by_shift.items():
            for first in range(0, len(ids), _BATCH):
                batch = ids[first : first + _BATCH]
                conn.execute(
                    "UPDATE recordings SET started_at = started_at + ?,"
                    " ended_at = ended_at + ?, closed_at = closed_at + ?"
                    f" WHERE id IN ({','.join('?' * len(batch))})",
                    (shift_s, shift_s, shift_s, *batch),
                )
