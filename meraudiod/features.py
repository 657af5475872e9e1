"""The speaker-embedding front end in numpy: SpeechBrain's 80-band log fbank + mean norm.

It reproduces, for one 16 kHz mono utterance, what SpeechBrain's `spkrec-ecapa-voxceleb`
`EncoderClassifier.encode_batch` feeds its ECAPA-TDNN (speechbrain 1.1.2), so the ONNX
export needs no torch at run time. `scripts/export-models` checks the whole chain (these
features + the ONNX graph) against speechbrain's own pipeline; tests/test_speakers.py checks
it against embeddings speechbrain computed for the clips in tests/data.

1. `Fbank(n_mels=80)`: STFT with n_fft 400, a 400-sample *periodic* Hamming window, hop 160,
   centred with 200 zeros on each side (frames = 1 + samples // 160); power spectrum
   re^2 + im^2; SpeechBrain's own triangular filters (82 points equally spaced on the HTK mel
   scale from 0 to 8000 Hz, filter i centred on point i+1 with the same half-width on both
   sides, peak 1); 10 * log10(max(x, 1e-10)), clipped at 80 dB below the utterance maximum.
2. `InputNormalization(norm_type="sentence", std_norm=False)`: the mean over time of every
   band is subtracted (no variance scaling).

Both the clip and the mean depend on the whole chunk, so features are computed over exactly
the audio being embedded.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from .audio import SAMPLE_RATE_HZ, Float32Array

N_FFT: Final = 400
WIN_SAMPLES: Final = 400  # 25 ms
HOP_SAMPLES: Final = 160  # 10 ms
N_MELS: Final = 80
F_MAX_HZ: Final = 8000.0
_AMIN: Final = 1e-10
_TOP_DB: Final = 80.0
# The smallest input the ECAPA graph accepts (its dilated convolutions reflect-pad by 4).
MIN_SAMPLES: Final = 5 * HOP_SAMPLES

F64 = npt.NDArray[np.float64]


def _hamming_periodic(n: int) -> F64:
    """`torch.hamming_window(n)` (periodic, alpha 0.54, beta 0.46)."""
    k = np.arange(n, dtype=np.float64)
    return np.asarray(0.54 - 0.46 * np.cos(2.0 * np.pi * k / n), dtype=np.float64)


def _to_mel(hz: F64) -> F64:
    return np.asarray(2595.0 * np.log10(1.0 + hz / 700.0), dtype=np.float64)


def _to_hz(mel: F64) -> F64:
    return np.asarray(700.0 * (10.0 ** (mel / 2595.0) - 1.0), dtype=np.float64)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT) -> F64:
    """SpeechBrain's `Filterbank` matrix, shape [n_fft // 2 + 1, n_mels]."""
    low, high = _to_mel(np.array([0.0, F_MAX_HZ]))
    hz = _to_hz(np.linspace(float(low), float(high), n_mels + 2))
    band = (hz[1:] - hz[:-1])[:-1]  # the left half-width, reused on the right
    centre = hz[1:-1]
    freqs = np.linspace(0.0, SAMPLE_RATE_HZ // 2, n_fft // 2 + 1)
    slope = (freqs[None, :] - centre[:, None]) / band[:, None]
    return np.asarray(np.maximum(0.0, np.minimum(slope + 1.0, 1.0 - slope)).T, dtype=np.float64)


_WINDOW: Final = _hamming_periodic(WIN_SAMPLES)
_MEL: Final = mel_filterbank()


def power_spectrogram(audio: Float32Array) -> F64:
    """Centred, zero-padded STFT power, shape [1 + samples // 160, 201]."""
    pad = N_FFT // 2
    x = np.pad(np.asarray(audio, dtype=np.float64).reshape(-1), (pad, pad))
    n_frames = 1 + (x.size - N_FFT) // HOP_SAMPLES
    frames = np.lib.stride_tricks.as_strided(
        x, shape=(n_frames, N_FFT), strides=(x.strides[0] * HOP_SAMPLES, x.strides[0])
    )
    spec = np.fft.rfft(frames * _WINDOW, n=N_FFT, axis=-1)
    return np.asarray(spec.real**2 + spec.imag**2, dtype=np.float64)


def log_mel(audio: Float32Array) -> Float32Array:
    """SpeechBrain's `Fbank(n_mels=80)` for one utterance, shape [frames, 80]."""
    db = 10.0 * np.log10(np.maximum(power_spectrogram(audio) @ _MEL, _AMIN))
    db = np.maximum(db, db.max() - _TOP_DB)
    return np.asarray(db, dtype=np.float32)


def fbank(audio: Float32Array) -> Float32Array:
    """ECAPA input features: log-mel fbank minus its mean over time, shape [frames, 80]."""
    if audio.size < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} samples, got {audio.size}")
    feats = log_mel(audio).astype(np.float64)
    return np.asarray(feats - feats.mean(axis=0, keepdims=True), dtype=np.float32)
