"""Whisper's log-Mel features of a long recording, computed 10 s at a time.

faster-whisper computes them over the whole audio at once: the padded copies of the audio,
the framed signal (400 float32 a frame), its spectrum (twice) and its magnitudes all exist
together, about 64 bytes of working memory per sample (numpy's buffers traced: 308 MB for 5
minutes), sixteen times the audio itself. A 24-minute upload
took the daemon's peak RSS from 228 MB to 1.5 GB, on a device whose whole memory may be
512 MB. Here each block of frames is framed, transformed and reduced to its 80 Mel bands
before the next: the same features (the STFT frames do not depend on the blocks), and only
the features themselves (80 float32 every 160 samples: half the size of the float32 audio)
are held whole.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from .audio import Float32Array

# Frames (10 ms each) transformed at once: 10 s. A block's working memory is then some 12 MB
# whatever the recording's length (numpy's STFT of 30 s alone peaked at 29 MB).
BLOCK_FRAMES: Final = 1000
_CLAMP_DB: Final = 8.0  # Whisper's dynamic range: features below the loudest minus 8 (log10)


def chunked_feature_extractor(lead_in_samples: int = 0, **kwargs: Any) -> Any:
    """faster-whisper's FeatureExtractor (its arguments), computing long audio block by
    block, of `lead_in_samples` of silence followed by the audio it is given: the lead-in is
    not a copy of the whole recording made only to put 0.25 s of zeros in front of it."""
    from faster_whisper.feature_extractor import FeatureExtractor

    class _ChunkedFeatureExtractor(FeatureExtractor):  # type: ignore[misc]
        def __call__(
            self, waveform: Any, padding: int = 160, chunk_length: int | None = None
        ) -> Any:
            if chunk_length is not None:  # as the parent does
                self.n_samples = chunk_length * self.sampling_rate
                self.nb_max_frames = self.n_samples // self.hop_length
            wave = np.asarray(waveform, dtype=np.float32)
            total = lead_in_samples + wave.size + padding
            if wave.ndim != 1 or total <= BLOCK_FRAMES * self.hop_length:
                lead_in = np.zeros(lead_in_samples, dtype=np.float32)
                return super().__call__(np.concatenate([lead_in, wave]), padding=padding)
            return log_mel(self, wave, lead_in_samples, padding)

    return _ChunkedFeatureExtractor(**kwargs)


def log_mel(extractor: Any, wave: Float32Array, lead_in: int, padding: int) -> Float32Array:
    """What `FeatureExtractor.__call__(signal, padding)` returns for `signal`, `lead_in`
    zeros followed by `wave`, BLOCK_FRAMES at a time: the signal followed by `padding` zeros,
    reflected by n_fft/2 at both ends, framed every hop, Hann-windowed, |rfft|^2,
    Mel-filtered, log10, clamped and scaled; the last frame dropped (as faster-whisper
    drops it)."""
    n_fft, hop = int(extractor.n_fft), int(extractor.hop_length)
    total = lead_in + wave.size + padding  # the padded signal's length
    kept = total // hop  # 1 + total // hop frames, less the last
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    filters = extractor.mel_filters
    features = np.empty((filters.shape[0], kept), dtype=np.float32)
    for first in range(0, kept, BLOCK_FRAMES):
        frames = min(BLOCK_FRAMES, kept - first)
        # The block's samples in the padded signal's coordinates (its reflected half-window
        # before sample 0 counted negative).
        start = first * hop - n_fft // 2
        stop = start + (frames - 1) * hop + n_fft
        signal = _padded_slice(wave, lead_in, total, start, stop)
        spectrum = extractor.stft(
            signal, n_fft, hop, window=window, center=False, return_complex=True
        ).astype(np.complex64)
        magnitudes = np.abs(spectrum) ** 2
        mel = filters @ magnitudes
        features[:, first : first + frames] = np.log10(np.clip(mel, 1e-10, None))
    np.maximum(features, features.max() - _CLAMP_DB, out=features)
    features += 4.0
    features /= 4.0
    return features


def _padded_slice(
    wave: Float32Array, lead_in: int, total: int, start: int, stop: int
) -> Float32Array:
    """Samples [start, stop) of `lead_in` zeros, `wave` and zeros up to `total` samples,
    reflected (numpy's "reflect": the edge sample not repeated) beyond both ends."""
    if start >= lead_in and stop <= lead_in + wave.size:
        return wave[start - lead_in : stop - lead_in]
    index = np.arange(start, stop)
    index = np.abs(index)  # reflected before the start
    index = np.where(index >= total, 2 * (total - 1) - index, index) - lead_in  # past the end
    out = np.zeros(stop - start, dtype=np.float32)
    inside = (index >= 0) & (index < wave.size)
    out[inside] = wave[index[inside]]
    return out
