"""meraudiod: an always-on, private audio daemon for room devices."""

import os

# Nothing leaves the device unless the owner configures it. onnxruntime (1.29 and later)
# otherwise creates a device id under ~/.cache/Microsoft and queues usage events to upload;
# its switch is read once, when the runtime starts, so it is set before anything imports it.
# The Hugging Face client, used only for an allowed model download, is told the same.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# numpy's OpenBLAS starts a thread per core and spins them at every matrix product: the
# speaker models' filter banks took 1.75 times the CPU of one thread for the same wall time
# (diarization 288 against 164 ms per second of audio on two cores; more cores, more). Each
# stage has threads of its own; read once, when numpy loads, so it is set before.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
