"""Parity check: does a speaker-model file compute the reference embeddings?

An ONNX export's bytes depend on the torch build that wrote it (an aarch64 torch is not the
x86 one), so where the sha256 differs from the manifest's, the file is accepted only if it
gives speechbrain's own embeddings of real speech (saved by `scripts/export-models
--reference`, torch-free to read) to a cosine of MIN_COSINE. The package carries three of
those clips and their embeddings (assets/parity, a subset of tests/data/ecapa_reference.npz),
so the check works wherever meraudiod is installed, not only in a checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np

REFERENCE_DIR: Final = Path(__file__).resolve().parent / "assets" / "parity"
MIN_COSINE: Final = 0.9999  # what tests/test_speakers.py asks of the manifest's own export


def parity_problem(onnx_path: Path, reference: str, reference_dir: Path = REFERENCE_DIR) -> str:
    """Why the file fails the parity check against `reference` (empty when it passes)."""
    from .audio import AudioDecodeError, decode_file, to_float32
    from .features import fbank
    from .onnx import OnnxLoadError, cpu_session, load_reason

    path = reference_dir / reference
    if not path.is_file():
        return f"the parity reference {path} is missing (reinstall meraudiod)"
    try:
        session = cpu_session(onnx_path, 1, "speaker model")
        saved = np.load(path)
        for name, expected in zip(saved["files"], saved["embeddings"], strict=True):
            feats = fbank(to_float32(decode_file(reference_dir / str(name))))[None]
            ours = np.asarray(session.run(["embedding"], {"feats": feats})[0]).reshape(-1)
            cosine = float(ours @ expected / (np.linalg.norm(ours) * np.linalg.norm(expected)))
            if not cosine >= MIN_COSINE:
                return f"{name}: cosine {cosine:.6f} with speechbrain's embedding < {MIN_COSINE}"
    except OnnxLoadError as exc:  # no model at all: the runtime's reason, not a repair hint
        return f"it does not load as an ONNX model: {load_reason(onnx_path, exc.__cause__ or exc)}"
    except (AudioDecodeError, OSError, ValueError, KeyError) as exc:
        return f"parity check failed: {exc}"
    except Exception as exc:  # onnxruntime raises its own untyped errors from run()
        return f"parity check failed: {type(exc).__name__}: {str(exc)[:300]}"
    return ""
