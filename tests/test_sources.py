"""Audio sources: every common format decodes to the 16 kHz samples a reference decoder gives."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from meraudiod.audio import FRAME_SAMPLES, decode_file
from meraudiod.config_sections import AudioSettings
from meraudiod.mic_source import MicSource
from meraudiod.sources import (
    MAX_LEAD_S,
    EndOfStream,
    FileSource,
    SourceError,
    StdinSource,
    open_source,
)

from .conftest import DEMO, TEST_DATA

SPEECH = TEST_DATA / "librivox_0880.wav"


def reference_16k(path: Path) -> np.ndarray:
    """libsndfile decode, channel mean, scipy polyphase resampling: an independent decoder."""
    data, rate = soundfile.read(path, dtype="float64", always_2d=True)
    mono = data.mean(axis=1)
    if rate != 16000:
        g = np.gcd(rate, 16000)
        mono = resample_poly(mono, 16000 // g, rate // g)
    return mono


def snr_db(ours: np.ndarray, ref: np.ndarray) -> float:
    n = min(len(ours), len(ref))
    err = ours[:n] - ref[:n]
    return float(10 * np.log10(np.sum(ref[:n] ** 2) / max(np.sum(err**2), 1e-12)))


def make_variant(
    tmp_path: Path, name: str, rate: int, channels: int, fmt: str, subtype: str
) -> Path:
    """Real speech re-encoded at another rate, channel count, sample format and container."""
    speech, _ = soundfile.read(SPEECH, dtype="float64")
    g = np.gcd(rate, 16000)
    signal = resample_poly(speech, rate // g, 16000 // g) if rate != 16000 else speech
    if channels == 2:  # a slightly different right channel, as a real stereo pair would be
        signal = np.stack([signal, 0.8 * signal], axis=1)
    path = tmp_path / name
    soundfile.write(path, signal, rate, format=fmt, subtype=subtype)
    return path


VARIANTS = [
    ("8k.wav", 8000, 1, "WAV", "PCM_16", 35.0),
    ("44k_stereo_24bit.wav", 44100, 2, "WAV", "PCM_24", 35.0),
    ("float32.wav", 16000, 1, "WAV", "FLOAT", 60.0),
    ("48k.flac", 48000, 1, "FLAC", "PCM_16", 35.0),
    ("22k.ogg", 22050, 1, "OGG", "VORBIS", 15.0),
    ("44k.mp3", 44100, 2, "MP3", "MPEG_LAYER_III", 15.0),
]


@pytest.mark.parametrize(("name", "rate", "channels", "fmt", "subtype", "min_snr_db"), VARIANTS)
def test_formats_decode_like_the_reference(
    tmp_path: Path, name: str, rate: int, channels: int, fmt: str, subtype: str, min_snr_db: float
) -> None:
    path = make_variant(tmp_path, name, rate, channels, fmt, subtype)
    ours = decode_file(path).astype(np.float64) / 32768.0
    ref = reference_16k(path)
    assert abs(len(ours) - len(ref)) <= 0.01 * 16000 + 1152  # at most a codec frame of padding
    assert snr_db(ours, ref) > min_snr_db


def test_file_source_yields_whole_frames_then_ends() -> None:
    source = FileSource(SPEECH)
    source.start()
    frames = []
    deadline = time.monotonic() + 60
    with pytest.raises(EndOfStream):
        while time.monotonic() < deadline:
            frame = source.read(0.5)
            assert frame is not None
            frames.append(frame)
    assert all(f.shape == (FRAME_SAMPLES,) and f.dtype == np.int16 for f in frames)
    expected = decode_file(SPEECH)
    joined = np.concatenate(frames)
    assert np.array_equal(joined[: expected.size], expected)
    assert joined.size - expected.size < FRAME_SAMPLES


@pytest.mark.parametrize("content", [b"", b"this is not audio at all" * 100, b"RIFF\x00\x00"])
def test_unreadable_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    source = FileSource(path)
    with pytest.raises(SourceError, match=r"broken.wav"):
        source.start()


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nowhere.flac"):
        FileSource(tmp_path / "nowhere.flac").start()


def test_missing_microphone_names_the_device() -> None:
    source = MicSource("no-such-device-xyz", None, 16)
    # With or without PortAudio installed, the one line names the device asked for.
    with pytest.raises(SourceError, match=r"^cannot open microphone no-such-device-xyz: \S"):
        source.start()


def test_stdin_source_frames_raw_pcm() -> None:
    pcm = decode_file(SPEECH)
    source = StdinSource(io.BytesIO(pcm.astype("<i2").tobytes()))
    source.start()
    frames = []
    deadline = time.monotonic() + 60
    with pytest.raises(EndOfStream):
        while time.monotonic() < deadline:  # EndOfStream ends it; the deadline is a failure
            frame = source.read(2.0)
            if frame is not None:
                frames.append(frame)
    joined = np.concatenate(frames)
    assert np.array_equal(joined[: pcm.size], pcm)


def test_open_source_rejects_unknown_specs() -> None:
    with pytest.raises(SourceError, match=r"unknown audio source"):
        open_source("camera", AudioSettings())


def _voluntary_switches() -> int:
    """How often this thread has gone to sleep so far (Linux)."""
    status = Path("/proc/thread-self/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


@pytest.mark.parametrize(("block_frames", "sleeps"), [(1, 32), (4, 8)])
def test_realtime_file_source_gives_a_block_per_wakeup(block_frames: int, sleeps: int) -> None:
    """At real time, frames come block_frames at a time, as from a sound card with that
    block size: one sleep per block, not per frame, and never ahead of real time."""
    source = FileSource(SPEECH, realtime=True, block_frames=block_frames)
    source.start()
    source.read(0.5)  # the first block is due at once; its decoding is not counted
    t0, before = time.monotonic(), _voluntary_switches()
    frames = [source.read(0.5) for _ in range(32)]
    slept, took_s = _voluntary_switches() - before, time.monotonic() - t0
    source.stop()
    assert all(f is not None and f.shape == (FRAME_SAMPLES,) for f in frames)
    # The 33rd frame opens block 33 // block_frames, due that many blocks after the start.
    assert took_s >= (32 // block_frames) * block_frames * 0.032 - 0.005
    assert sleeps - 2 <= slept <= sleeps + 3  # a page fault or a decode may add a switch


def test_the_microphone_queue_holds_queue_frames_whatever_the_block() -> None:
    """audio.queue_frames counts 32 ms frames: with 4-frame blocks the capture queue holds
    a quarter as many callbacks, and a full queue counts every frame it drops."""
    from types import SimpleNamespace

    mic = MicSource(None, None, queue_frames=8, block_frames=4)
    block = np.zeros((4 * FRAME_SAMPLES, 1), dtype=np.float32)
    ok = SimpleNamespace(input_overflow=False)
    for _ in range(3):  # room for two blocks of four frames: the third is dropped whole
        mic._callback(block, block.shape[0], None, ok)
    assert mic.dropped_frames == 4
    frames = [mic.read(0.01) for _ in range(9)]
    assert sum(f is not None for f in frames) == 8 and frames[-1] is None


def test_a_fast_replay_leads_by_the_files_length_and_a_lying_header_by_12_h_at_most(
    tmp_path: Path,
) -> None:
    """A file read faster than real time is stamped as if heard live, ending as the replay
    began: `lead_s` is its length. A FLAC header that claims 49 days (its 36-bit sample
    count all ones) would have stamped its recordings 49 days back, where retention deletes
    them at once."""
    demo = FileSource(DEMO)
    demo.start()
    assert demo.lead_s == pytest.approx(decode_file(DEMO).size / 16000, abs=0.01)
    assert FileSource(DEMO, realtime=True).lead_s == 0.0  # heard now: no lead
    data = bytearray(DEMO.read_bytes())
    data[21] |= 0x0F  # STREAMINFO's total samples: the low 4 bits of byte 21, bytes 22-25
    data[22:26] = b"\xff\xff\xff\xff"
    liar = tmp_path / "liar.flac"
    liar.write_bytes(data)
    lying = FileSource(liar)
    lying.start()
    assert lying.lead_s == MAX_LEAD_S == 12 * 3600
