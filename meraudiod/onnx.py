"""One way to open an ONNX model on the CPU: explicit threads, no spinning."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class OnnxLoadError(Exception):
    """The model file could not be loaded."""


def cpu_session(model_path: Path, threads: int = 1, what: str = "model") -> Any:
    """An onnxruntime session with `threads` intra-op threads and thread spinning off (with
    spinning on, a real-time loop burns most of a core between frames)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise OnnxLoadError(f"cannot load {what} {model_path}: {exc}") from exc
