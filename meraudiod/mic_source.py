"""The microphone source: a sound card through PortAudio (sounddevice).

sounddevice is imported when a microphone is opened or listed, never before: a file or stdin
source does not load PortAudio.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import numpy as np

from .audio import FRAME_S, SAMPLE_RATE_HZ, Float32Array, Int16Array, Resampler
from .sources import Framer, SourceError

_LOGGER = logging.getLogger(__name__)


class MicSource:
    """A sound card through PortAudio. The callback only copies and enqueues."""

    def __init__(
        self,
        device: str | int | None,
        rate_hz: int | None,
        queue_frames: int,
        block_frames: int = 1,
    ) -> None:
        self.device = device
        self.block_frames = block_frames  # frames per callback: fewer wakeups
        self.name = f"mic:{device if device is not None else 'default'}"
        self.dropped_frames = 0
        self.lead_s = 0.0
        self.overflows = 0
        self._rate_hz = rate_hz
        # A callback delivers a block of frames: the queue holds `queue_frames` frames' worth.
        self._queue: queue.Queue[Float32Array] = queue.Queue(max(1, queue_frames // block_frames))
        self._stream: Any = None
        self._resampler: Resampler | None = None
        self._framer = Framer()
        self.last_frame_at = 0.0

    def start(self) -> None:
        """Open the device; SourceError with the device name when it cannot."""
        try:
            sd = _import_sounddevice()
        except SourceError as exc:  # no PortAudio: still say which device was wanted
            raise SourceError(f"cannot open microphone {self.device or 'default'}: {exc}") from exc
        try:
            try:
                info = sd.query_devices(self.device, "input")
            except ValueError:
                # PortAudio lists the devices once, when it starts: a USB microphone plugged
                # in (or enumerated) later is only seen after it starts again. No stream is
                # open here, so restarting it is safe.
                sd._terminate()
                sd._initialize()
                info = sd.query_devices(self.device, "input")
            rate = int(self._rate_hz or info["default_samplerate"])
            channels = 1
            self._stream = sd.InputStream(
                device=self.device,
                samplerate=rate,
                channels=channels,
                dtype="float32",
                blocksize=int(rate * FRAME_S * self.block_frames),
                callback=self._callback,
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise SourceError(f"cannot open microphone {self.device or 'default'}: {exc}") from exc
        self.name = f"mic:{info['name']}"
        if rate != SAMPLE_RATE_HZ:
            self._resampler = Resampler(rate, channels)
        _LOGGER.info("microphone %s open at %d Hz", info["name"], rate)

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
        try:
            self._queue.put_nowait(indata.copy())  # PortAudio reuses its buffer
        except queue.Full:
            self.dropped_frames += self.block_frames

    def read(self, timeout_s: float) -> Int16Array | None:
        """The next 16 kHz frame."""
        while True:
            frame = self._framer.take()
            if frame is not None:
                return frame
            try:
                block = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                return None
            if self._resampler is not None:
                pcm = self._resampler.process(block)
            else:
                pcm = np.clip(block[:, 0] * 32768.0, -32768, 32767).astype(np.int16)
            self._framer.add(pcm)

    def stop(self) -> None:
        """Close the device."""
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None


def _import_sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as exc:  # PortAudio itself is missing
        raise SourceError(f"no microphone support: {exc} (install libportaudio2)") from exc
    return sounddevice


def input_devices() -> list[dict[str, Any]]:
    """The input devices PortAudio sees (empty when there is no PortAudio or none)."""
    try:
        sd = _import_sounddevice()
        return [
            {"index": i, "name": d["name"], "default_rate_hz": int(d["default_samplerate"])}
            for i, d in enumerate(sd.query_devices())
            if d["max_input_channels"] > 0
        ]
    except (SourceError, Exception):
        return []
