"""meraudiod: an always-on, private audio daemon for room devices."""

import os

# Nothing leaves the device unless the owner configures it. onnxruntime (1.29 and later)
# otherwise creates a device id under ~/.cache/Microsoft and queues usage events to upload;
# its switch is read once, when the runtime starts, so it is set before anything imports it.
# The Hugging Face client, used only for an allowed model download, is told the same.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
