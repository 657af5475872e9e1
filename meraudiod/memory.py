"""The C heap: how glibc's malloc is tuned for the daemon, and giving freed memory back.

With glibc's defaults the daemon's peak RSS was far above what its models and libraries
hold (`meraudiod bench`: 476-492 MB with speakers on, of which the loaded models and
libraries are about 280): glibc raises its mmap threshold (up to 32 MiB) each time a large
block is freed, after which the large, short-lived buffers of model loading and of every
inference (onnxruntime activations, CTranslate2 tensors) come from heaps that fragment and
are not given back. A fixed threshold keeps them mmapped, returned to the system the moment
they are freed. A limit on malloc arenas (MALLOC_ARENA_MAX) was measured too and changed
nothing beyond noise. Other C libraries (musl) are left alone. Also here: PyAV's FFmpeg
libraries, which faster-whisper imports and we seldom need, loaded only when first used; and
the library pages that loading the models touched, unmapped once they are loaded.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import logging
import re
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Final

_LOGGER = logging.getLogger(__name__)

_M_MMAP_THRESHOLD: Final = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES: Final = 128 * 1024  # glibc's own starting value, kept fixed
# While CTranslate2 transcribes, its mid-sized buffers come from the heap, where they are
# reused from one decoding step to the next (mmapped each time, they cost it about 25 % more
# CPU); its large ones (the encoder's 54 MB attention scores) are still mmapped. Measured on
# the bench clip: peak RSS 262 / 266 / 278 MB and CPU 0.167 / 0.157 / 0.131 s per second of
# speech at 128 KiB / 4 MiB / 32 MiB (speakers off). Not for its encoder, which runs once
# per recording (`encoder_heap`): from the heap, its 2.3 MB hidden states (1500 x 384 floats)
# left it fragmented, a second transcription in one process peaking at 248-252 MB against
# 235 with them mmapped, at the same CPU within noise; a 2 MiB threshold throughout did as
# much for memory but cost 30 % more CPU (24 LJSpeech clips, fresh processes, twice each).
_TRANSCRIPTION_THRESHOLD_BYTES: Final = 4 * 1024 * 1024
_tuned = False  # tune_malloc() was applied in this process
_MADV_DONTNEED: Final = 4  # madvise's advice number (Linux, asm-generic/mman-common.h)
# A read-only private mapping of a file (a library's code or constants, a model file), then
# its smaps fields, one "Name: value kB" line each.
_READ_ONLY_FILE_MAPPING: Final = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) r-[-x]p \S+ \S+ [1-9]\d* +(/.*)\n((?:\w+: .*\n)*)", re.MULTILINE
)


@cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, when this process runs on it."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold (see the module docstring); call first thing, before the
    models load. True when it was applied."""
    libc = _glibc()
    if libc is None:
        return False
    global _tuned
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not _tuned:
        _LOGGER.debug("mallopt(M_MMAP_THRESHOLD) was refused")
    return _tuned


@contextmanager
def transcription_heap() -> Iterator[None]:
    """Around a CTranslate2 transcription in a tuned process: large buffers from the heap,
    then what the heap holds free given back and the fixed threshold restored."""
    with _mmap_threshold(_TRANSCRIPTION_THRESHOLD_BYTES, MMAP_THRESHOLD_BYTES, trim=True):
        yield


@contextmanager
def encoder_heap() -> Iterator[None]:
    """Inside transcription_heap(), around Whisper's encoder: every buffer over 128 KiB
    mmapped again (see _TRANSCRIPTION_THRESHOLD_BYTES)."""
    with _mmap_threshold(MMAP_THRESHOLD_BYTES, _TRANSCRIPTION_THRESHOLD_BYTES, trim=False):
        yield


@contextmanager
def _mmap_threshold(inside_bytes: int, after_bytes: int, trim: bool) -> Iterator[None]:
    """glibc's mmap threshold at `inside_bytes` for the block, then `after_bytes` (the heap
    trimmed first with `trim`); nothing in a process that was not tuned."""
    libc = _glibc() if _tuned else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, inside_bytes)
    try:
        yield
    finally:
        if trim:
            libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, after_bytes)


def release_memory() -> None:
    """Give the memory of freed objects (such as unloaded models) back to the system."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def unmap_loaded_library_pages() -> int:
    """Unmap the pages of libraries (and of read-only mapped files) that this process has
    mapped and never written; returns how many kB that was. Call once the models are loaded:
    loading runs code and reads constants it will not use again (CTranslate2's and
    onnxruntime's among them, 50-56 MB), which stay mapped, counted in the RSS, until the
    kernel reclaims them. What the daemon uses again comes back from the page cache at its
    first touch. Only mappings without a private (copied-on-write) page are touched, so no
    written byte is lost: a library's relocated data is never one of them. Linux only; 0
    elsewhere. Not thread-safe against a library loading at the same moment: call it before
    the stages start."""
    try:
        smaps = Path("/proc/self/smaps").read_text(encoding="utf-8", errors="replace")
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    unmapped_kb = 0
    for start, end, path, fields in _READ_ONLY_FILE_MAPPING.findall(smaps):
        kb = {name: value.split()[0] for name, value in re.findall(r"(\w+): +(.*)", fields)}
        clean = kb.get("Anonymous") == "0" and kb.get("Swap", "0") == "0"
        if path.endswith(" (deleted)") or not clean or kb.get("Rss", "0") == "0":
            continue
        address = int(start, 16)
        if libc.madvise(address, int(end, 16) - address, _MADV_DONTNEED) == 0:
            unmapped_kb += int(kb["Rss"])
    return unmapped_kb


class _DeferredPyAv(types.ModuleType):
    """Stands in for PyAV in sys.modules until an attribute of it is first used; then the
    real module is imported, takes its place, and answers."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get("av") is self:
            del sys.modules["av"]
        return getattr(importlib.import_module("av"), name)


def defer_pyav() -> None:
    """Call before importing faster-whisper: it imports PyAV (16 MB of FFmpeg libraries) for
    its decode_audio only, which we never call. PyAV then loads at its first use (audio.py:
    a microphone or file not at 16 kHz, a file not FLAC), so a daemon on a 16 kHz microphone
    or FLAC file never loads it."""
    if "av" not in sys.modules and importlib.util.find_spec("av") is not None:
        sys.modules["av"] = _DeferredPyAv("av")
