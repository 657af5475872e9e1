"""Memory: the speaker models are loaded only while speakers or diarization are on, and a
reload that turns both off gives their memory back; the library pages that loading touched are
unmapped, and no written page with them; the C heap is tuned in the daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import soundfile

from meraudiod.bench_listening import proc_value
from meraudiod.bench_memory import rss_kb

from .conftest import DEMO, status_json, wait_for

_ECAPA_MB = 60  # the speaker models hold about 90 MB; any sign of them is far above noise
# Library pages mapped once the models (Whisper and the VAD) are loaded: 49-56 MB when
# loading's stayed mapped; without them about 26 MB on a fresh install (onnxruntime's 17 of
# them, mapped again by the VAD's first frames).
_LIBRARY_PAGES_AFTER_LOAD_MB = 38


def _rss_mb(pid: int) -> float:
    return rss_kb(pid)[0] / 1024


def test_speaker_models_load_only_when_on_and_are_freed_when_a_reload_turns_them_off(
    env: dict[str, str], speaker_models: Path
) -> None:
    config = Path(env["MERAUDIOD_CONFIG"])
    config.write_text("[speakers]\nenabled = false\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env={**env, "MERAUDIOD_LOGGING__LEVEL": "INFO"},
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stderr is not None

    def speakers_model() -> object:
        return status_json(env)["models"].get("speakers")

    try:
        wait_for(lambda: status_json(env)["running"], 90, "the daemon to come up")
        off_mb = _rss_mb(proc.pid)
        library_mb = proc_value(proc.pid, "status", "RssFile") / 1024
        assert library_mb < _LIBRARY_PAGES_AFTER_LOAD_MB, library_mb
        assert speakers_model() is None

        config.write_text("[speakers]\nenabled = true\n[diarization]\nenabled = true\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: speakers_model() == "ecapa-voxceleb", 60, "the speaker models to load")
        on_mb = _rss_mb(proc.pid)
        assert on_mb > off_mb + _ECAPA_MB, (off_mb, on_mb)  # they were not loaded before

        config.write_text("[speakers]\nenabled = false\n[diarization]\nenabled = false\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: speakers_model() is None, 60, "the speaker models to be freed")
        wait_for(lambda: _rss_mb(proc.pid) < on_mb - _ECAPA_MB, 30, "their memory to be given back")
        assert proc.poll() is None
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    log = proc.stderr.read()
    assert "speaker models loaded" in log and "speaker models freed" in log, log
    assert proc.returncode == 0, log


def _child(script: str, *args: Path) -> list[str]:
    """The lines a fresh Python process running `script` prints (it must succeed)."""
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


_NO_PYAV_CHILD = """
import sys
from pathlib import Path

import numpy as np
import soundfile

from meraudiod.asr import Transcriber
from meraudiod.audio import decode_file, to_float32
from meraudiod.config import load_settings
from meraudiod.sources import FileSource

def ffmpeg_loaded() -> bool:
    return "libavcodec" in Path("/proc/self/maps").read_text()

clip, other = Path(sys.argv[1]), Path(sys.argv[2])
asr = load_settings().asr
model = Transcriber(Path(sys.argv[3]), asr, asr.model)
source = FileSource(clip)
source.start()
frames = []
while (frame := source.read(1.0)) is not None and len(frames) < 150:
    frames.append(frame)
text = model.transcribe(to_float32(np.concatenate(frames))).text
print(ffmpeg_loaded(), text)
resampled = decode_file(other)  # not 16 kHz: PyAV loads at its first use
print(ffmpeg_loaded(), resampled.size)
"""


def test_whisper_and_a_16k_flac_file_do_not_load_ffmpeg_and_other_files_still_decode(
    models_dir: Path, tmp_path: Path
) -> None:
    """PyAV's FFmpeg libraries (16 MB) load only when a file or microphone needs them."""
    demo, rate_hz = soundfile.read(DEMO, dtype="int16")
    clip, other = tmp_path / "clip.flac", tmp_path / "other.flac"
    soundfile.write(clip, demo[: 5 * rate_hz], rate_hz)
    soundfile.write(other, demo[: 2 * rate_hz], 22050)  # played back at another rate
    first, second = _child(_NO_PYAV_CHILD, clip, other, models_dir / "tiny.en")
    assert first.startswith("False ") and "dashwood" in first.lower(), first
    loaded, samples = second.split()
    assert loaded == "True" and abs(int(samples) - 2 * rate_hz * 16000 / 22050) < 800, second


_UNMAP_CHILD = """
import ctypes, mmap, sys
import numpy as np
from meraudiod.memory import unmap_loaded_library_pages

def library_kb() -> int:
    status = open("/proc/self/status").read().split("RssFile:")[1]
    return int(status.split()[0])

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
with open(sys.argv[1], "r+b") as f:
    written = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)  # this process's copy
    read = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
written[:5] = b"WROTE"  # copied on write: the file still says AAAAA
address = ctypes.addressof(ctypes.c_char.from_buffer(written))
assert libc.mprotect(address, len(written), mmap.PROT_READ) == 0  # read-only, as RELRO is
assert read[:] == b"A" * len(read)
before_kb = library_kb()
unmapped_kb = unmap_loaded_library_pages()
print(before_kb, unmapped_kb, library_kb())
print(written[:6], read[:6], read[:] == b"A" * len(read), float(np.linalg.norm([3.0, 4.0])))
"""


def test_unmapping_library_pages_keeps_every_page_this_process_wrote(tmp_path: Path) -> None:
    """The pages of libraries and read-only files go (and come back when touched); a private
    page this process wrote and then made read-only, as the loader does with relocated data,
    keeps what was written."""
    mapped = tmp_path / "mapped.bin"
    mapped.write_bytes(b"A" * 65536)
    counts, pages = _child(_UNMAP_CHILD, mapped)
    before_kb, unmapped_kb, after_kb = map(int, counts.split())
    assert unmapped_kb > 1024 and after_kb < before_kb - 1024, counts  # numpy's and libpython's
    assert pages == "b'WROTEA' b'AAAAAA' True 5.0", pages
