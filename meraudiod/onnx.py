"""One way to open an ONNX model on the CPU: explicit threads, no spinning."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

# What to do about a model file that will not load: the manifest knows its checksum.
REPAIR_HINT: Final = (
    "check it with `meraudiod models verify` and reinstall it with"
    " `meraudiod models install --default` (or the model's name)"
)


def load_reason(model_path: Path, exc: BaseException) -> str:
    """The runtime's reason a model will not load, in one line."""
    reason = " ".join(str(exc).split())  # the runtimes' messages span lines
    reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", reason)
    return reason.replace(f"Load model from {model_path} failed:", "")[:200]


def load_error(what: str, model_path: Path, exc: BaseException) -> str:
    """One line for a model that will not load: which file, the runtime's reason, the fix."""
    reason = load_reason(model_path, exc)
    return f"cannot load {what} {model_path} (damaged or incomplete?): {reason}; {REPAIR_HINT}"


class OnnxLoadError(Exception):
    """The model file could not be loaded (its cause is the runtime's error)."""


def cpu_session(
    model_path: Path, threads: int = 1, what: str = "model", memory_pattern: bool = True
) -> Any:
    """An onnxruntime session with `threads` intra-op threads and thread spinning off (with
    spinning on, a real-time loop burns most of a core between frames), and no memory arena
    (it would keep the largest input's activations for good). memory_pattern=False: each
    activation is allocated when needed and freed when done, rather than all in one block
    planned for the input's size (less memory for long inputs, a little slower)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = memory_pattern
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise OnnxLoadError(load_error(what, model_path, exc)) from exc
