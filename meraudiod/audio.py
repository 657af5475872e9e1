"""Audio constants and helpers: PCM conversion, loudness, streaming resampling, file decoding."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .file_ends import mp3_counts_frames, ogg_unfinished

SAMPLE_RATE_HZ: Final = 16000
FRAME_SAMPLES: Final = 512  # what Silero VAD takes at 16 kHz: 32 ms
FRAME_S: Final = FRAME_SAMPLES / SAMPLE_RATE_HZ

Int16Array = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]


# A header outside this range lies (a 32 KB file "at 1 Hz" would be 16,000 s of audio).
_MIN_FILE_RATE_HZ: Final = 1000
_MAX_FILE_RATE_HZ: Final = 768000
# Decoded this much less than the header announces: the file is cut or damaged.
_SHORTFALL_S: Final = 1.0
_EXACT_LENGTH_FORMATS: Final = frozenset({"flac"})
_MAX_FLAC_FRAMES: Final = 2**36  # FLAC counts samples in 36 bits
WAV_HEADER_MAX_BYTES: Final = 65536  # a RIFF header's chunks before `data` fit in this
_WAV_UNKNOWN_SIZES: Final = frozenset({0, 0xFFFFFFFF})  # written to a pipe: length unknown


class AudioDecodeError(Exception):
    """A file could not be opened or decoded; the message names the file."""


class AudioTruncatedError(AudioDecodeError):
    """A file ends early or is damaged part of the way in; what came before was decoded and
    used. The message names the file, where it was cut and why; `where` says the last two
    without the file's path (for a caller that names the file otherwise)."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


@dataclass(frozen=True)
class WavHeader:
    """What a RIFF/WAVE header says about the audio after it."""

    codec: int  # 1 PCM, 3 float, 0xFFFE extensible; 0 when there is no fmt chunk
    channels: int
    rate_hz: int
    bits: int
    data_offset: int  # where the samples start
    data_bytes: int  # as announced

    @property
    def announced_s(self) -> float | None:
        """The length the header announces (None when it does not know)."""
        frame_bytes = self.channels * self.bits // 8
        if self.data_bytes in _WAV_UNKNOWN_SIZES or not frame_bytes or not self.rate_hz:
            return None
        return self.data_bytes / frame_bytes / self.rate_hz


def is_wav(head: bytes) -> bool:
    """Do these first bytes start a WAV file (a RIFF/WAVE header)?"""
    return head[:4] == b"RIFF" and head[8:12] == b"WAVE"


def parse_wav_header(head: bytes) -> WavHeader | None:
    """The header at the start of `head` (is_wav), or None while more bytes are needed."""
    fmt = (0, 0, 0, 0)
    pos = 12
    while len(head) >= pos + 8:
        kind, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if kind == b"data":
            return WavHeader(*fmt, data_offset=pos + 8, data_bytes=size)
        if kind == b"fmt ":
            if len(head) < pos + 24:
                return None
            fmt = (
                int.from_bytes(head[pos + 8 : pos + 10], "little"),
                int.from_bytes(head[pos + 10 : pos + 12], "little"),
                int.from_bytes(head[pos + 12 : pos + 16], "little"),
                int.from_bytes(head[pos + 22 : pos + 24], "little"),
            )
        pos += 8 + size + size % 2
    return None


def to_float32(samples: Int16Array) -> Float32Array:
    """int16 PCM to float32 in [-1, 1)."""
    return (samples.astype(np.float32) / 32768.0).astype(np.float32)


def rms_dbfs(samples: Int16Array) -> float:
    """Loudness of int16 PCM in dB relative to full scale (-120 for digital silence)."""
    return Loudness().add(samples).dbfs


class Loudness:
    """rms_dbfs of audio that comes a block at a time (never held whole)."""

    def __init__(self) -> None:
        self.samples = 0
        self._square_sum = 0.0

    def add(self, block: Int16Array) -> Loudness:
        """Count one more block."""
        self.samples += block.size
        self._square_sum += float(np.sum(np.square(block.astype(np.float64) / 32768.0)))
        return self

    @property
    def dbfs(self) -> float:
        """dB relative to full scale of everything added (-120 for digital silence)."""
        mean_square = self._square_sum / self.samples if self.samples else 0.0
        return max(-120.0, 10.0 * np.log10(mean_square)) if mean_square > 0 else -120.0


class Resampler:
    """Streaming conversion of interleaved float32 blocks at any rate to 16 kHz mono int16."""

    def __init__(self, rate_hz: int, channels: int) -> None:
        import av

        self._rate_hz = rate_hz
        self._layout = "mono" if channels == 1 else "stereo" if channels == 2 else f"{channels}c"
        self._channels = channels
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE_HZ)
        self._pts = 0

    def process(self, block: Float32Array) -> Int16Array:
        """Resample one block of shape (samples, channels); returns what is ready so far."""
        import av

        interleaved = np.ascontiguousarray(block, dtype=np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout=self._layout)
        frame.sample_rate = self._rate_hz
        frame.pts = self._pts
        self._pts += block.shape[0]
        return _frames_to_int16(self._resampler.resample(frame))

    def flush(self) -> Int16Array:
        """Whatever the resampler still holds at the end of the stream."""
        return _frames_to_int16(self._resampler.resample(None))


def _frames_to_int16(frames: Sequence[Any]) -> Int16Array:
    arrays = [f.to_ndarray().reshape(-1) for f in frames]
    if not arrays:
        return np.zeros(0, dtype=np.int16)
    return np.concatenate(arrays).astype(np.int16, copy=False)


def iter_file_pcm(path: Path, block_s: float = 1.0) -> Iterator[Int16Array]:
    """Decode any file PyAV/FFmpeg reads to 16 kHz mono int16, a block at a time.

    What can be decoded is yielded; a file that is cut or damaged part of the way in then
    raises AudioTruncatedError saying where and why. A file with nothing decodable in it, or
    a header that lies about its sample rate, raises AudioDecodeError before any audio.
    A 16 kHz mono FLAC file (what the daemon records) is read with libsndfile instead:
    PyAV's FFmpeg libraries cost the daemon 16 MB once loaded.
    """
    frames = _flac_16k_mono_frames(path)
    if frames is not None:
        return _iter_flac_pcm(path, frames, block_s)
    return _iter_av_pcm(path, block_s)


def _starts_with(path: Path, magic: tuple[bytes, ...]) -> bool:
    """Does the file begin with one of these 4-byte signatures? libsndfile is asked only
    about FLAC and WAV: given an MP3 (or a file only named so), its libmpg123 writes its
    own "Warning: Xing stream size off ..." and "Note: Illegal Audio-MPEG-Header ..." lines
    to stderr, beside a command's output."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in magic
    except OSError:
        return False


def _flac_16k_mono_frames(path: Path) -> int | None:
    """The samples a 16 kHz mono FLAC file's header counts, None for any other file."""
    import soundfile

    if not _starts_with(path, (b"fLaC",)):
        return None
    try:
        info = soundfile.info(os.fsencode(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError):  # a format it cannot read
        return None
    native = info.format == "FLAC" and info.samplerate == SAMPLE_RATE_HZ and info.channels == 1
    return int(info.frames) if native and 0 < info.frames < _MAX_FLAC_FRAMES else None


def _iter_flac_pcm(path: Path, frames: int, block_s: float) -> Iterator[Int16Array]:
    """A 16 kHz mono FLAC file with libsndfile. At the first sign of damage (an error, or
    fewer samples than its header counts) PyAV takes over where libsndfile stopped (both
    decode FLAC losslessly, to the same samples): a damaged file gives what FFmpeg recovers
    of it, and FFmpeg's account of where and why."""
    import soundfile

    decoded_samples = 0
    try:
        with soundfile.SoundFile(os.fsencode(path)) as handle:
            for block in handle.blocks(blocksize=int(block_s * SAMPLE_RATE_HZ), dtype="int16"):
                decoded_samples += block.size
                yield block
    except (soundfile.LibsndfileError, RuntimeError):
        pass
    if decoded_samples >= frames:
        return
    skip = decoded_samples
    for block in _iter_av_pcm(path, block_s):
        if skip < block.size:
            yield block[skip:]
        skip = max(0, skip - block.size)


def _iter_av_pcm(path: Path, block_s: float) -> Iterator[Int16Array]:
    """iter_file_pcm with PyAV: any format FFmpeg reads, at any rate."""
    import av

    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError) as exc:
        raise AudioDecodeError(f"cannot open audio file {path}: {_reason(exc)}") from exc
    with container:
        if not container.streams.audio:
            raise AudioDecodeError(f"no audio stream in {path}")
        stream = container.streams.audio[0]
        # No codec context: FFmpeg has no decoder for what the header says (0 bits a sample).
        rate_hz = int(getattr(stream.codec_context, "sample_rate", 0) or 0)
        if rate_hz == 0:
            raise AudioDecodeError(f"no audio could be decoded from {path} (empty, or not audio)")
        if not _MIN_FILE_RATE_HZ <= rate_hz <= _MAX_FILE_RATE_HZ:
            raise AudioDecodeError(
                f"audio file {path} says its sample rate is {rate_hz} Hz: not a real recording"
                " (a damaged header, or not audio)"
            )
        announced_s = _announced_s(path, container.format.name, container.duration)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE_HZ)
        pending: list[Int16Array] = []
        pending_samples = decoded_samples = 0
        block_samples = int(block_s * SAMPLE_RATE_HZ)
        cut: str | None = None
        try:
            for frame in container.decode(stream):
                # Some containers reuse the frame layout guess; dropping pts avoids resampler
                # complaints about non-monotonic timestamps in broken files.
                frame.pts = None
                out = _frames_to_int16(resampler.resample(frame))
                pending.append(out)
                pending_samples += out.size
                decoded_samples += out.size
                if pending_samples >= block_samples:
                    yield np.concatenate(pending)
                    pending, pending_samples = [], 0
        except av.error.FFmpegError as exc:
            cut = _reason(exc)
        try:  # the flush can fail too (a 64-channel layout the resampler refuses)
            pending.append(_frames_to_int16(resampler.resample(None)))
            decoded_samples += pending[-1].size
        except av.error.FFmpegError as exc:
            cut = cut or _reason(exc)
        if decoded_samples == 0:
            raise AudioDecodeError(
                f"no audio could be decoded from {path}"
                + (f": {cut}" if cut else " (empty, or not audio)")
            )
        if pending:
            yield np.concatenate(pending)
        decoded_s = decoded_samples / SAMPLE_RATE_HZ
        if cut is None and container.format.name == "ogg":  # FFmpeg says nothing of a cut
            cut = ogg_unfinished(path)
        if cut is not None:
            where = f"cut at {decoded_s:.1f} s: {cut}"
            raise AudioTruncatedError(
                f"audio file {path} is {where} (the audio before it was used)", where
            )
        if announced_s is not None and decoded_s < announced_s - _SHORTFALL_S:
            where = f"{decoded_s:.1f} s of the {announced_s:.1f} s its header announces"
            raise AudioTruncatedError(
                f"audio file {path} gave {where}: cut or damaged (what could be decoded was used)",
                where,
            )


def _announced_s(path: Path, format_name: str, duration_us: int | None) -> float | None:
    """The length a file's header announces, where it counts its samples (FLAC's does, a
    WAV's data size does, an MP3's Xing header does; other formats' durations are estimates
    from size and bit rate)."""
    if format_name in _EXACT_LENGTH_FORMATS and duration_us:
        return duration_us / 1e6
    if format_name == "mp3" and duration_us and mp3_counts_frames(path):
        return duration_us / 1e6
    if format_name == "wav":
        with open(path, "rb") as handle:
            head = handle.read(WAV_HEADER_MAX_BYTES)
        header = parse_wav_header(head) if is_wav(head) else None
        return header.announced_s if header is not None else None
    return None


def file_length_s(path: Path) -> float | None:
    """How long a file plays by its header (libsndfile's count for FLAC and WAV, else
    FFmpeg's estimate), None when neither says. For stamping a replay only: a wrong header
    changes no audio."""
    import soundfile

    if _starts_with(path, (b"fLaC", b"RIFF")):
        try:
            info = soundfile.info(os.fsencode(path))
            return float(info.frames) / info.samplerate if info.samplerate > 0 else None
        except (soundfile.LibsndfileError, RuntimeError, OSError):  # a format it cannot read
            pass
    import av

    try:
        with av.open(str(path), mode="r") as container:
            return container.duration / 1e6 if container.duration else None
    except (av.error.FFmpegError, OSError):
        return None


def decode_file(path: Path) -> Int16Array:
    """The whole file as 16 kHz mono int16."""
    blocks = list(iter_file_pcm(path))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int16)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[-1].strip() or type(exc).__name__
