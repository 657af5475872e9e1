"""Import stub for torchaudio inside the export venv only.

No torchaudio build matches the CPU torch the export uses, and speechbrain 1.1.2 imports
torchaudio at module level (nnet/CNN.py, utils/torch_audio_backend.py,
inference/classifiers.py) although Fbank, InputNormalization and ECAPA_TDNN never call it:
the only use on our path is `check_torchaudio_backend()`, which reads `__version__`. Any other
attribute fails loudly, so a real use could not pass silently.
"""

__version__ = "2.11.0"


def __getattr__(name: str) -> object:
    raise AttributeError(f"torchaudio stub (meraudiod export): {name!r} is not available")
