"""What `bench` needs to split a daemon's disk writes: the bytes a running process has written
so far, and how many pages it appended to the SQLite write-ahead log, read from outside.

The WAL count comes from the wal-index (`<db>-shm`), which SQLite keeps in a shared file that
any process may read: its header holds the number of frames in the log (`mxFrame`) and the
salt that changes each time the log starts over after a checkpoint. Polled a few times a
second, the sum over the log's generations is the number of pages written to the log; what
the database wrote beyond that is the checkpoint (pages copied into the database file) and
the file system's rounding to whole blocks.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Final

from .bench_listening import proc_value

_WAL_HEADER_BYTES: Final = 32
_FRAME_HEADER_BYTES: Final = 24
# The wal-index header (native byte order): szPage at 14, mxFrame at 16, the salts at 32.
# SQLite writes it twice in a row; a read that finds the copies differ caught a write.
_INDEX_HEADER: Final = struct.Struct("=14xHI12x8s8x")


def written_bytes(pid: int) -> int:
    """Bytes a running process has caused to be written to storage so far (Linux
    /proc/<pid>/io write_bytes), 0 when it cannot be read."""
    return proc_value(pid, "io", "write_bytes")


class WalMeter:
    """Counts the bytes appended to a database's write-ahead log while it is polled."""

    def __init__(self, db_path: Path) -> None:
        self.shm_path = db_path.with_name(db_path.name + "-shm")
        self._salt: bytes | None = None
        self._frames_this_log = 0
        self._bytes_done = 0  # logs that have started over since
        self._page_bytes = 0

    def poll(self) -> None:
        """Read the wal-index header once (call a few times a second)."""
        try:
            with open(self.shm_path, "rb") as handle:
                both = handle.read(2 * _INDEX_HEADER.size)
        except OSError:
            return  # no log open right now
        header = both[: _INDEX_HEADER.size]
        if len(both) < 2 * _INDEX_HEADER.size or both[_INDEX_HEADER.size :] != header:
            return
        page_field, frames, salt = _INDEX_HEADER.unpack(header)
        if page_field == 0:
            return  # not initialised yet
        if salt != self._salt:  # the log started over: the previous one is complete
            self._bytes_done += self._log_bytes()
            self._salt, self._frames_this_log = salt, 0
        self._page_bytes = 65536 if page_field == 1 else page_field
        self._frames_this_log = max(self._frames_this_log, frames)

    def _log_bytes(self) -> int:
        if not self._frames_this_log:
            return 0
        frame_bytes = self._page_bytes + _FRAME_HEADER_BYTES
        return _WAL_HEADER_BYTES + self._frames_this_log * frame_bytes

    @property
    def bytes_written(self) -> int:
        """Bytes appended to the log so far (all its generations)."""
        return self._bytes_done + self._log_bytes()
