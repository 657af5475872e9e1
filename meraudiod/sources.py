"""Audio sources: microphone (in mic_source.py), file replay, stdin PCM. All yield 16 kHz frames.

A source is opened with `start()` (which fails with SourceError naming the device or file),
read with `read(timeout_s)` one 512-sample int16 frame at a time, and closed with `stop()`.
`read` returns None when no frame arrived in time and raises EndOfStream when a file or
stdin ends.
"""

from __future__ import annotations

import errno
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from .audio import (
    FRAME_S,
    FRAME_SAMPLES,
    SAMPLE_RATE_HZ,
    WAV_HEADER_MAX_BYTES,
    AudioDecodeError,
    Int16Array,
    WavHeader,
    file_length_s,
    is_wav,
    iter_file_pcm,
    parse_wav_header,
)
from .config_sections import AudioSettings
from .paths import NoHomeError, expand_home, link_loop
from .wording import counted

_STDIN_READ_BYTES: Final = FRAME_SAMPLES * 2


# A replay's lead at most (see AudioSource.lead_s): a header that claims weeks would stamp
# the recordings weeks back, where retention deletes them at once.
MAX_LEAD_S: Final = 12 * 3600.0


class SourceError(Exception):
    """A source could not be opened or read; the message names the device or file."""


class EndOfStream(Exception):
    """A finite source (file, stdin) has no more audio."""


class AudioSource(Protocol):
    """What the listener reads frames from."""

    name: str
    dropped_frames: int
    # How long before it was opened the stream is stamped as beginning: a file read faster
    # than real time runs ahead of the clock, so it is stamped as if heard live, ending as
    # the replay began (its length); 0 for audio heard now.
    lead_s: float

    def start(self) -> None:
        """Open the device or file."""

    def read(self, timeout_s: float) -> Int16Array | None:
        """The next 512-sample frame, None on timeout; EndOfStream at the end."""

    def stop(self) -> None:
        """Close the device or file."""


class Framer:
    """Cuts a stream of int16 blocks into 512-sample frames."""

    def __init__(self) -> None:
        self._buffer = np.zeros(0, dtype=np.int16)

    def add(self, block: Int16Array) -> None:
        """Append a block of any length."""
        self._buffer = np.concatenate([self._buffer, block]) if self._buffer.size else block

    def take(self) -> Int16Array | None:
        """The next whole frame, None until there is one."""
        if self._buffer.size < FRAME_SAMPLES:
            return None
        frame, self._buffer = self._buffer[:FRAME_SAMPLES], self._buffer[FRAME_SAMPLES:]
        return frame

    def take_last(self) -> Int16Array | None:
        """The final partial frame, padded with silence."""
        if self._buffer.size == 0:
            return None
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        frame[: self._buffer.size] = self._buffer
        self._buffer = self._buffer[:0]
        return frame


def demo_path() -> Path:
    """The bundled recording of real speech that `--source demo` replays."""
    return Path(str(resources.files("meraudiod") / "assets" / "demo.flac"))


def printable(text: str) -> str:
    """Text as shown and stored: a file name's bytes that are not UTF-8 (a file named in
    Latin-1, decoded by Python as lone surrogates) as \\xfc escapes, never raw bytes (which
    make a JSON line or a log line not UTF-8) nor Python's \\udcfc; and what is not printable
    as its escape (\\n, \\u202e, \\u2028): a line feed or line separator in a name wrote a
    line of its own, a bidi override showed the rest of the line backwards."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def not_a_file(path: Path) -> str:
    """Why a path given as an audio file cannot be read as one."""
    if path.is_dir():
        return "is a directory, not an audio file"
    if path.exists():  # a FIFO, a device: reading it could block or never end
        return "is not a regular file (a pipe or a device); give an audio file"
    return link_loop(path) or "audio file not found"


class FileSource:
    """Replays a file of any common format, as fast as possible or at real time."""

    def __init__(self, path: Path, realtime: bool = False, block_frames: int = 1) -> None:
        self.path = path
        # As stored and published: a name's bytes that are not UTF-8 (a file named in
        # Latin-1) shown as \\xfc escapes; the file itself is read by its real name.
        self.name = f"file:{printable(str(path))}"
        self.realtime = realtime
        # With realtime, frames come a block at a time, as from a sound card.
        self.block_frames = block_frames
        self.dropped_frames = 0
        self.lead_s = 0.0
        self._blocks: Iterator[Int16Array] | None = None
        self._framer = Framer()
        self._ended = False
        self._frames_read = 0
        self._t0 = 0.0

    def check(self) -> None:
        """Raise SourceError when the path is not a regular file (nothing is read)."""
        try:
            regular = self.path.is_file()
        except OSError as exc:  # a name too long: was "Error: OSError: [Errno 36] ..."
            why = (exc.strerror or str(exc)).lower()
            raise SourceError(f"{printable(str(self.path))}: {why}") from exc
        if not regular:
            raise SourceError(f"{printable(str(self.path))}: {not_a_file(self.path)}")

    def start(self) -> None:
        """Open the file and decode its first block, so a bad file fails here."""
        self.check()
        self._blocks = iter_file_pcm(self.path)
        self._fill()
        if not self.realtime:
            self.lead_s = min(file_length_s(self.path) or 0.0, MAX_LEAD_S)
        self._t0 = time.monotonic()

    def _fill(self) -> None:
        assert self._blocks is not None
        try:
            self._framer.add(next(self._blocks))
        except StopIteration:
            self._ended = True
        except AudioDecodeError as exc:
            raise SourceError(printable(str(exc))) from exc

    def read(self, timeout_s: float) -> Int16Array | None:
        """The next frame; with realtime, not before its time."""
        frame = self._framer.take()
        while frame is None and not self._ended:
            self._fill()
            frame = self._framer.take()
        if frame is None:
            frame = self._framer.take_last()
            if frame is None:
                raise EndOfStream(self.name)
        if self.realtime:  # a block is due every block_frames * 32 ms: this wait is short
            block_start = self._frames_read - self._frames_read % self.block_frames
            wait = self._t0 + block_start * FRAME_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self._frames_read += 1
        return frame

    def stop(self) -> None:
        """Release the decoder."""
        if self._blocks is not None:
            close = getattr(self._blocks, "close", None)
            if close is not None:
                close()
        self._blocks = None


def _stdin_reader() -> Callable[[int], bytes]:
    """os.read on standard input's descriptor. With stdin closed at start (`<&-`), Python's
    sys.stdin is None and descriptor 0 may be any file opened since: never read that."""
    if sys.stdin is None:

        def closed(_: int) -> bytes:
            raise OSError(errno.EBADF, "standard input is closed")

        return closed
    fd = sys.stdin.fileno()
    return lambda n: os.read(fd, n)


class StdinSource:
    """Raw 16 kHz mono s16le on standard input (arecord, ffmpeg, a pipe from anywhere)."""

    def __init__(self, stream: Any = None, queue_frames: int = 256) -> None:
        self.name = "stdin"
        self.dropped_frames = 0
        self.lead_s = 0.0  # a pipe's length is not known: see StreamClock.started_at
        # The raw descriptor, not sys.stdin's buffered reader: a thread blocked in a buffered
        # read at interpreter exit aborts the process.
        self._read = stream.read if stream is not None else _stdin_reader()
        self._queue: queue.Queue[Int16Array | None] = queue.Queue(maxsize=queue_frames)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._ended = False
        self._framer = Framer()
        self._error: str | None = None  # why the stream cannot be used, told by read()

    def start(self) -> None:
        """Start the reader thread."""
        self._thread = threading.Thread(target=self._run, name="stdin-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            leftover = self._skip_wav_header()
            while not self._stopped.is_set() and self._error is None:
                chunk = self._read(_STDIN_READ_BYTES)
                if not chunk:
                    break
                data = leftover + chunk
                usable = len(data) - len(data) % 2
                leftover = data[usable:]
                self._put(np.frombuffer(data[:usable], dtype="<i2").astype(np.int16))
        except OSError as exc:  # e.g. started with stdin closed (`<&-`): said, not a dead thread
            self._error = f"cannot read stdin: {exc.strerror or exc}"
        self._put(None)

    def _skip_wav_header(self) -> bytes:
        """A WAV file piped in (not raw PCM): its header is skipped when the audio is 16 kHz
        mono 16-bit, and otherwise the stream is refused saying why. Returns the bytes read
        past the header."""
        head = b""
        while len(head) < 12:
            chunk = self._read(_STDIN_READ_BYTES)
            if not chunk:
                return head
            head += chunk
        if not is_wav(head):
            return head  # raw PCM, as documented
        while len(head) < WAV_HEADER_MAX_BYTES:
            header = parse_wav_header(head)
            if header is not None:
                pcm = header.codec in (1, 0xFFFE) and header.bits == 16
                if not (pcm and header.channels == 1 and header.rate_hz == SAMPLE_RATE_HZ):
                    self._error = _wav_refusal(header)
                return head[header.data_offset :]
            chunk = self._read(_STDIN_READ_BYTES)
            if not chunk:
                break
            head += chunk
        self._error = "stdin is a WAV file whose header could not be read: " + _RAW_HINT
        return b""

    def _put(self, block: Int16Array | None) -> None:
        while not self._stopped.is_set():
            try:
                self._queue.put(block, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, timeout_s: float) -> Int16Array | None:
        """The next frame of 512 samples."""
        framer = self._framer
        while True:
            frame = framer.take()
            if frame is not None:
                return frame
            if self._ended:
                last = framer.take_last()
                if last is None:
                    raise EndOfStream(self.name)
                return last
            try:
                block = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                return None
            if block is None:
                self._ended = True
                if self._error is not None:
                    raise SourceError(self._error)
            else:
                framer.add(block)

    def stop(self) -> None:
        """Stop reading (the reader thread ends at the next read or EOF)."""
        self._stopped.set()


_RAW_HINT: Final = (
    "--source stdin takes raw 16 kHz mono s16le (ffmpeg -i IN -f s16le -ac 1 -ar 16000 -),"
    " or use --source file:PATH"
)


def _wav_refusal(header: WavHeader) -> str:
    """Why a WAV file on stdin cannot be used as it is."""
    if header.codec == 0:
        return "stdin is a WAV file without a format chunk: " + _RAW_HINT
    return (
        f"stdin is a WAV file of {header.rate_hz} Hz, {counted(header.channels, 'channel')},"
        f" {header.bits}-bit (format {header.codec}), not 16 kHz mono 16-bit: " + _RAW_HINT
    )


def file_path(given: str) -> Path:
    """file:PATH's (and analyze's) path, a relative one taken from the current directory and
    kept whole: the stored source, `status`, the output and an error then say which file it
    was."""
    try:
        return expand_home(given).absolute()
    except NoHomeError as exc:
        raise SourceError(f"{printable(given)}: {printable(str(exc))}") from exc
    except OSError as exc:  # the current directory is gone
        raise SourceError(f"{printable(given)}: {exc}") from exc


def open_source(spec: str, settings: AudioSettings) -> AudioSource:
    """Build (not yet start) the source named by `mic`, `file:PATH`, `stdin` or `demo`."""
    block_frames = settings.block_ms * SAMPLE_RATE_HZ // 1000 // FRAME_SAMPLES
    if spec == "mic":
        from .mic_source import MicSource  # here, not at the top: mic_source imports this module

        return MicSource(
            settings.device, settings.device_rate_hz, settings.queue_frames, block_frames
        )
    if spec == "stdin":
        if sys.stdin is None:  # started with `<&-`: said once here, before anything starts
            raise SourceError("cannot read stdin: standard input is closed")
        return StdinSource(queue_frames=settings.queue_frames)
    if spec == "demo":
        return FileSource(demo_path(), settings.realtime, block_frames)
    if spec.startswith("file:"):
        return FileSource(file_path(spec[5:]), settings.realtime, block_frames)
    raise SourceError(f"unknown audio source {spec!r}: use mic, file:PATH, stdin or demo")
