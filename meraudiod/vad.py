"""Streaming Silero VAD v6 on onnxruntime: one 512-sample frame in, one speech probability out."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Final

import numpy as np

from .audio import FRAME_SAMPLES, Float32Array, Int16Array
from .onnx import OnnxLoadError, cpu_session

_CONTEXT_SAMPLES: Final = 64  # the v6 model sees the tail of the previous frame
_STATE_SHAPE: Final = (1, 1, 128)
_INT16_SCALE: Final = np.float32(1.0 / 32768.0)  # exact (a power of two): as to_float32


class VadError(Exception):
    """The VAD model could not be loaded."""


class SileroVad:
    """Silero VAD with its LSTM state and audio context carried from frame to frame."""

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        try:
            self._session = cpu_session(model_path, threads, "VAD model")
        except OnnxLoadError as exc:
            raise VadError(str(exc)) from exc
        self.reset()

    def reset(self) -> None:
        """Forget everything heard so far (a new stream)."""
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        # The model's input, reused frame after frame (no allocation per frame): the tail of
        # the previous frame, then the frame itself.
        self._window = np.zeros((1, _CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)

    def __call__(self, frame: Float32Array | Int16Array) -> float:
        """Speech probability of one frame of 512 samples at 16 kHz: float32 in [-1, 1), or
        int16 PCM as a source delivers it (scaled straight into the model's input)."""
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"VAD frames must be {FRAME_SAMPLES} samples, got {frame.shape}")
        window = self._window
        window[0, :_CONTEXT_SAMPLES] = window[0, -_CONTEXT_SAMPLES:]
        samples = window[0, _CONTEXT_SAMPLES:]
        samples[...] = frame
        if frame.dtype == np.int16:
            # Two simple loops: np.multiply(frame, scale, out=...) mixes types and goes
            # through numpy's buffered casting, about 6x slower per frame.
            samples *= _INT16_SCALE
        prob, self._h, self._c = self._session.run(
            None, {"input": window, "h": self._h, "c": self._c}
        )
        return float(prob.reshape(-1)[0])


class VadTraces:
    """The listener's speech probability for every frame of its latest recordings, kept so
    that the Wyoming client cuts them at pauses without running the VAD over them again.

    Bounded (the oldest goes first) and only a saving: a recording without one (a backlog
    from before a restart, a reprocess) has the VAD run over it as before."""

    def __init__(self, max_recordings: int = 64) -> None:
        self.max_recordings = max_recordings
        self._items: dict[str, Float32Array] = {}
        self._lock = threading.Lock()  # the listener puts, the worker gets

    def put(self, rec_id: str, probs: Float32Array) -> None:
        """Keep one recording's trace, forgetting the oldest when full."""
        with self._lock:
            while len(self._items) >= self.max_recordings:
                del self._items[next(iter(self._items))]
            self._items[rec_id] = probs

    def get(self, rec_id: str) -> Float32Array | None:
        """A recording's trace, left in place (a failed request is retried with it)."""
        with self._lock:
            return self._items.get(rec_id)
