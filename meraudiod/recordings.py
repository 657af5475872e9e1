"""Finished utterances: audio written atomically, then the recording row and its job in one
transaction.

A recording's audio path is stored relative to the audio directory, so the data directory can
be moved, restored elsewhere or reached through a symlink. Start-up recovery deletes only the
`.part` file of a write whose process died, and never one of a recording the database knows:
a whole audio file that no row names (a crash between the write and the insert, or a restored
older database) is kept."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import soundfile
from ulid import ULID

from . import jobs
from .audio import SAMPLE_RATE_HZ, Int16Array, Loudness, rms_dbfs
from .db import Transaction, now, put_kv

_LOGGER = logging.getLogger(__name__)
TMP_SUFFIX: Final = ".part"  # a temp file: written whole, then renamed
# A half-written file older than this, from a version that did not put its pid in the name,
# was left by a crash: no write takes that long.
_LEGACY_PART_AGE_S: Final = 600.0
_FLAC_LEVEL: Final = 1.0  # soundfile's scale: 0.0 is FLAC level 0, 1.0 is level 8
# kv mark of a recording whose audio is held in memory, committed with its row (value: the
# pid that holds it). Deleting the recording, or only its audio (purge --audio-only), deletes
# the mark: the audio is then never written (held_audio.py).
HELD_MARK: Final = "held_audio:"
# kv key of held audio kept in the runtime directory over a stop, to be taken back at the next
# start (held_audio.py); value "<pid> <absolute path of the file>". Announced before the file
# appears, ended only once the file is gone (or taken back).
SPILLED: Final = "held_audio_spilled:"


def forget_held(conn: sqlite3.Connection, rec_id: str) -> None:
    """A recording's held audio is never to be written (the recording, or its audio, deleted;
    or not kept), inside the caller's transaction: its mark goes, and the copy kept in the
    runtime directory over a stop with it (delete means delete). The announcement of that
    copy stays while the process writing it is alive: it removes a file renamed into place
    after this (held_audio.spill_held), or the next start does."""
    conn.execute("DELETE FROM kv WHERE key=?", (HELD_MARK + rec_id,))
    row = conn.execute("SELECT value FROM kv WHERE key=?", (SPILLED + rec_id,)).fetchone()
    if row is None:
        return
    pid_text, _, spilled = str(row[0]).partition(" ")
    path, pid = Path(spilled), int(pid_text)
    path.unlink(missing_ok=True)
    if not jobs.pid_alive(pid):  # nobody writes it: its temp file goes, and the announcement
        part_file(path, pid).unlink(missing_ok=True)
        conn.execute("DELETE FROM kv WHERE key=?", (SPILLED + rec_id,))


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
    audio_path: Path | None  # None: kept in memory, the audio directory cannot be written
    rms_dbfs: float
    closed_at: float

    @classmethod
    def new(
        cls,
        rec_id: str,
        source: str,
        started_at: float,
        start_s: float,
        duration_s: float,
        audio_path: Path | None,
        loudness_dbfs: float,
    ) -> Recording:
        """A recording closed now."""
        return cls(
            id=rec_id,
            source=source,
            started_at=started_at,
            ended_at=started_at + duration_s,
            start_s=start_s,
            end_s=start_s + duration_s,
            duration_s=duration_s,
            audio_path=audio_path,
            rms_dbfs=loudness_dbfs,
            closed_at=now(),
        )


def audio_file(audio_dir: Path, stored: str) -> Path:
    """The file a stored audio path names (relative to the audio directory; a path stored
    absolute by an older version stays as it is)."""
    return audio_dir / stored


def why_no_audio(audio_dir: Path, stored: str | None) -> str | None:
    """Why a recording has no audio to transcribe (None: its file is there), for the commands
    that queue recordings again: queued without it, a job fails at once."""
    if not stored:
        return "its audio was not kept"
    path = audio_file(audio_dir, stored)
    return None if path.is_file() else f"its audio file {path} is missing"


def write_audio_atomically(path: Path, samples: Int16Array, audio_format: str) -> None:
    """Temp file (named with our pid) in the same directory, fsync, rename, fsync the directory."""
    with atomic_audio_file(path, audio_format) as out:
        out.write(samples)


@contextmanager
def atomic_audio_file(path: Path, audio_format: str) -> Iterator[soundfile.SoundFile]:
    """A 16 kHz mono file to write a block at a time, whole or not at all (atomic_file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # FLAC at its highest level: 2 % smaller than the default for 2.4x the encoding time,
    # which is 0.7 ms per second of speech here (bytes on the card are what wears it).
    level = {"compression_level": _FLAC_LEVEL} if audio_format.lower() == "flac" else {}
    with atomic_file(path) as handle:
        sink = _KeptError(handle)
        with soundfile.SoundFile(
            sink, "w", SAMPLE_RATE_HZ, 1, "PCM_16", format=audio_format.upper(), **level
        ) as out:
            yield out
        if sink.error is not None:
            raise sink.error


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file to write whole or not at all: a temp file (named with our pid) in the same
    directory, fsynced and renamed to `path` when the block ends (the directory fsynced
    too), removed if it fails."""
    tmp = part_file(path, os.getpid())
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        # On a read-only file system this fails too: the error to tell is the write's (a
        # .part left there is removed at the next start, its process gone).
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def part_file(path: Path, pid: int) -> Path:
    """The temp file process `pid` writes `path` through."""
    return path.with_name(f"{path.name}.{pid}{TMP_SUFFIX}")


class _KeptError:
    """The file libsndfile writes through. An OSError raised in its callback (a full disk)
    would be printed as a traceback by cffi and the write go on; it is kept instead, the
    write reported as failed, and raised once libsndfile is done."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        return self._kept(self.handle.write, data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._kept(self.handle.seek, offset, whence)  # flushes what is buffered

    def tell(self) -> int:
        return self.handle.tell()

    def read(self, size: int = -1) -> bytes:
        return b""  # written, never read back

    def _kept(self, call: Callable[..., int], *args: int | bytes) -> int:
        if self.error is None:
            try:
                return call(*args)
            except OSError as exc:
                self.error = exc
        return 0


class MemoryAudio:
    """Recordings' audio held in RAM while the audio directory cannot be written (too full,
    or read-only), bounded, until it is written to its file (held_audio.py). Audio whose
    recording is transcribed is only waiting to be kept: it is the first to go when a new
    recording needs the room (its transcript stays), as is audio of a recording never to be
    transcribed (asr.enabled = false: it is finished when saved)."""

    def __init__(self, max_recordings: int = 32) -> None:
        self.max_recordings = max_recordings
        self._items: dict[str, Int16Array] = {}  # oldest first
        self._transcribed: set[str] = set()  # finished: the audio only waits to be written
        self._lock = threading.Lock()
        # One write of held audio at a time (listeners share this memory): two threads of one
        # process would write the same temp file.
        self.write_lock = threading.Lock()
        self.dropped = 0

    def room(self) -> tuple[bool, str | None]:
        """Whether one more recording's audio can be held, and whose held audio it would
        then take the room of (None: there is room). Nothing changes until `put`: a save
        whose transaction fails has taken nobody's room."""
        with self._lock:
            if len(self._items) < self.max_recordings:
                return True, None
            oldest = next((i for i in self._items if i in self._transcribed), None)
            return oldest is not None, oldest

    def put(self, rec_id: str, samples: Int16Array, finished: bool = False) -> None:
        """Keep a recording's audio, in the room `room()` found (`finished`: nothing but
        writing it is left to do, as for a recording not to be transcribed)."""
        with self._lock:
            self._items[rec_id] = samples
            if finished:
                self._transcribed.add(rec_id)

    def evict(self, rec_id: str) -> None:
        """Drop the audio whose room `room()` gave away, once the new recording is stored."""
        if self.pop(rec_id) is not None:
            _LOGGER.warning(
                "recording %s: its audio, held in memory, dropped to make room (its"
                " transcript is kept)",
                rec_id,
            )

    def get(self, rec_id: str) -> Int16Array | None:
        """A recording's audio, left in place (a failed transcription is retried from it)."""
        with self._lock:
            return self._items.get(rec_id)

    def pop(self, rec_id: str) -> Int16Array | None:
        """Take a recording's audio out (written to its file, or not to be kept)."""
        with self._lock:
            self._transcribed.discard(rec_id)
            return self._items.pop(rec_id, None)

    def transcribed(self, rec_id: str) -> None:
        """The recording's transcript is stored: its audio only waits to be written."""
        with self._lock:
            if rec_id in self._items:
                self._transcribed.add(rec_id)

    def ids(self) -> list[str]:
        """The recordings whose audio is held, oldest first."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


class RecordingStore:
    """Writes recordings under `audio_dir` and registers them with a pending job."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        audio_dir: Path,
        audio_format: str,
        job_origin: str | None = None,
    ) -> None:
        self.conn = conn
        self.audio_dir = audio_dir
        self.audio_format = audio_format
        self.job_origin = job_origin  # whose jobs these are (None: the daemon's)

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

        `in_transaction` runs inside the transaction that inserts the rows, so what it
        writes is stored with them or not at all. With `memory`
        (the disk is too full) the audio is kept in RAM for the worker instead of written;
        None is returned when that memory is full too.
        """
        rec_id = str(ULID())
        duration_s = samples.size / SAMPLE_RATE_HZ
        loudness_dbfs = rms_dbfs(samples)
        if memory is None:
            path = self._path(rec_id, started_at)
            write_audio_atomically(path, samples, self.audio_format)
            recording = Recording.new(
                rec_id, source, started_at, start_s, duration_s, path, loudness_dbfs
            )
            return self._register(recording, transcribe, in_transaction)
        # Held and registered under the lock that writing held audio takes: another
        # listener never finds it held without its row (and takes it for deleted), and the
        # room found stays free. Another's audio goes only once the rows are committed.
        with memory.write_lock:
            fits, replacing = memory.room()
            if not fits:
                memory.dropped += 1
                _LOGGER.error(
                    "audio cannot be written and memory is full: recording of %.1f s dropped",
                    duration_s,
                )
                return None
            recording = Recording.new(
                rec_id, source, started_at, start_s, duration_s, None, loudness_dbfs
            )

            def held(conn: sqlite3.Connection, recording: Recording) -> None:
                put_kv(conn, HELD_MARK + rec_id, str(os.getpid()))
                if replacing is not None:  # its audio will never be written
                    forget_held(conn, replacing)
                if in_transaction is not None:
                    in_transaction(conn, recording)

            # In memory before the job is committed: the worker finds it there.
            memory.put(rec_id, samples, finished=not transcribe)
            try:
                saved = self._register(recording, transcribe, held)
            except BaseException:
                memory.pop(rec_id)
                raise
            if replacing is not None:
                memory.evict(replacing)
            return saved

    def save_blocks(
        self,
        blocks: Iterable[Int16Array],
        source: str,
        started_at: float,
        transcribe: bool,
        in_transaction: Callable[[sqlite3.Connection, Recording], None] | None = None,
    ) -> Recording:
        """Store a recording that comes a block at a time (an upload), each block written as
        it comes: never held whole. If the blocks (or `in_transaction`) raise, nothing is
        stored."""
        rec_id = str(ULID())
        path = self._path(rec_id, started_at)
        loudness = Loudness()
        with atomic_audio_file(path, self.audio_format) as out:
            for block in blocks:
                out.write(block)
                loudness.add(block)
        duration_s = loudness.samples / SAMPLE_RATE_HZ
        # Stamped as a file is, ending as it was read: never a time to come.
        started_at = min(started_at, now() - duration_s)
        recording = Recording.new(rec_id, source, started_at, 0.0, duration_s, path, loudness.dbfs)
        return self._register(recording, transcribe, in_transaction)

    def _path(self, rec_id: str, started_at: float) -> Path:
        return self.audio_dir / audio_name(rec_id, started_at, self.audio_format)

    def _register(
        self,
        recording: Recording,
        transcribe: bool,
        in_transaction: Callable[[sqlite3.Connection, Recording], None] | None,
    ) -> Recording:
        """The recording's row and job, in one transaction; its audio file is removed if
        that fails."""
        path = recording.audio_path
        try:
            with Transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO recordings (id, source, started_at, ended_at, start_s, end_s,"
                    " duration_s, audio_path, rms_dbfs, closed_at, status)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        recording.id,
                        recording.source,
                        recording.started_at,
                        recording.ended_at,
                        recording.start_s,
                        recording.end_s,
                        recording.duration_s,
                        path.relative_to(self.audio_dir).as_posix() if path else None,
                        recording.rms_dbfs,
                        recording.closed_at,
                        "pending" if transcribe else "done",
                    ),
                )
                if transcribe:
                    jobs.enqueue(self.conn, recording.id, origin=self.job_origin)
                if in_transaction is not None:
                    in_transaction(self.conn, recording)
        except BaseException:
            if path is not None:  # not on a read-only file system: then the file stays
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            raise
        _LOGGER.info(
            "recording %s: %.2f s from %s at %.2f s, %.1f dBFS",
            recording.id,
            recording.duration_s,
            recording.source,
            recording.start_s,
            recording.rms_dbfs,
        )
        return recording


def audio_name(rec_id: str, started_at: float, audio_format: str) -> str:
    """Where a recording's audio goes, relative to the audio directory, as stored in its row:
    YYYY/MM/DD/<id>.<format>, the day it started on."""
    return "/".join((*_day_parts(started_at), f"{rec_id}.{audio_format}"))


def _day_parts(wall_s: float) -> tuple[str, str, str]:
    t = time.localtime(wall_s)
    return f"{t.tm_year:04d}", f"{t.tm_mon:02d}", f"{t.tm_mday:02d}"


# Only what this module writes: <audio_dir>/YYYY/MM/DD/<ULID>.<flac|wav>[.<pid>].part. Nothing
# else under audio_dir is ever touched, whatever directory it is configured to be.
_PART_FILE: Final = re.compile(
    r"\d{4}/\d{2}/\d{2}/(?P<id>[0-9A-HJKMNP-TV-Z]{26})\.(flac|wav)(\.(?P<pid>\d+))?\.part"
)


def remove_crashed_writes(conn: sqlite3.Connection, audio_dir: Path) -> int:
    """Delete the half-written audio files of writes whose process died.

    Only our own `.part` files, only when the process that wrote one is gone, and only when
    the database has no recording of that id: whatever else is under audio_dir is kept.
    """
    if not audio_dir.is_dir():
        return 0
    removed = 0
    for path in audio_dir.glob("[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]/*" + TMP_SUFFIX):
        match = _PART_FILE.fullmatch(path.relative_to(audio_dir).as_posix())
        if match is None or not path.is_file():
            continue
        pid = match.group("pid")
        if pid is not None and int(pid) != os.getpid() and jobs.pid_alive(int(pid)):
            continue  # still being written
        if pid is None and time.time() - path.stat().st_mtime < _LEGACY_PART_AGE_S:
            continue
        known = conn.execute("SELECT 1 FROM recordings WHERE id=?", (match.group("id"),))
        if known.fetchone() is not None:
            continue
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        _LOGGER.warning("removed %d half-written audio files from %s", removed, audio_dir)
    return removed


# A recording's id as stored: a ULID, in Crockford's base 32, upper case.
ULID_RE: Final = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def normalise_id(rec_id: str) -> str:
    """A recording id as stored: ULIDs are case-insensitive, and stored in upper case."""
    return rec_id.strip().upper()
