"""A sound card whose driver hangs (read() never returns), in this process or as the
microphone of a real `meraudiod run`: `python -m tests.wedged_mic ARGS` is `meraudiod ARGS`
with every `mic` source this card."""

from __future__ import annotations

import threading

from meraudiod import cli, signals
from meraudiod.config_sections import AudioSettings
from meraudiod.mic_source import MicSource
from meraudiod.sources import AudioSource


class WedgedMic(MicSource):
    """A sound card whose driver hangs: read() never returns, whatever the timeout."""

    def __init__(self) -> None:
        super().__init__(device=None, rate_hz=None, queue_frames=8)
        self.released = threading.Event()
        self.reading = threading.Event()  # the listener is inside read()

    def start(self) -> None:
        self.name = "mic:wedged"

    def read(self, timeout_s: float) -> None:
        self.reading.set()
        self.released.wait()  # ignores timeout_s, as a hung driver call does

    def stop(self) -> None:
        pass


def _open_source(spec: str, settings: AudioSettings) -> AudioSource:
    return WedgedMic() if spec == "mic" else _real_open_source(spec, settings)


_real_open_source = cli.open_source

if __name__ == "__main__":
    cli.open_source = _open_source  # type: ignore[assignment]
    signals.main()
