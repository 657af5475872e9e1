"""Whether a compressed file is whole, from its own structure.

FFmpeg decodes a cut MP3 or Ogg file up to the cut without an error: `analyze` exited 0
with half the audio. A FLAC or WAV header counts its samples (audio.py compares them); an
MP3 with a Xing, Info or VBRI header (LAME and FFmpeg write one) counts its frames, so
FFmpeg's duration for it is the encoder's count; an Ogg stream (Vorbis, Opus, FLAC) ends
with a page marked end-of-stream. An MP3 without such a header has no length but its size:
cut at a frame, it cannot be told from a whole one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

_ID3_HEADER_BYTES: Final = 10
_MP3_SEARCH_BYTES: Final = 4096  # the first frame is found this far after the ID3 tag
_OGG_PAGE_HEADER_BYTES: Final = 27
_OGG_END_OF_STREAM: Final = 0x04  # header_type flag of a stream's last page


def mp3_counts_frames(path: Path) -> bool:
    """Whether an MP3's first frame is a Xing, Info or VBRI header, which counts the frames
    (FFmpeg's duration is then the encoder's, not a guess from the size)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_ID3_HEADER_BYTES)
            start = 0
            if head[:3] == b"ID3" and len(head) == _ID3_HEADER_BYTES:
                size = 0
                for byte in head[6:10]:  # syncsafe: 7 bits a byte
                    size = size << 7 | (byte & 0x7F)
                footer = _ID3_HEADER_BYTES if head[5] & 0x10 else 0
                start = _ID3_HEADER_BYTES + size + footer
            handle.seek(start)
            data = handle.read(_MP3_SEARCH_BYTES)
    except OSError:
        return False
    for i in range(len(data) - 1):
        if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0:  # the first frame's sync
            # Xing/Info after the side information (9, 17 or 32 bytes by version and
            # channels), VBRI at a fixed 32 bytes.
            tags = {data[i + 4 + side : i + 8 + side] for side in (9, 17, 32)}
            return bool(tags & {b"Xing", b"Info"}) or data[i + 36 : i + 40] == b"VBRI"
    return False


def ogg_unfinished(path: Path) -> str | None:
    """Why an Ogg file is not whole (its last page cut short, or no end-of-stream page),
    None when it is: its pages are walked by their headers, not read."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            pos, flags = 0, _OGG_END_OF_STREAM
            while pos < size:
                handle.seek(pos)
                head = handle.read(_OGG_PAGE_HEADER_BYTES)
                if pos and flags & _OGG_END_OF_STREAM and head[:4] != b"OggS":
                    return None  # something after the stream's end: not its audio
                if len(head) < _OGG_PAGE_HEADER_BYTES or head[:4] != b"OggS":
                    return f"its Ogg page at byte {pos} is cut short or damaged"
                table = handle.read(head[26])
                end = pos + _OGG_PAGE_HEADER_BYTES + len(table) + sum(table)
                if len(table) < head[26] or end > size:
                    return f"its last Ogg page (at byte {pos}) is cut short"
                pos, flags = end, head[5]
    except OSError as exc:
        return f"cannot be read to its end ({exc.strerror})"
    return None if flags & _OGG_END_OF_STREAM else "its Ogg stream has no end-of-stream page"
