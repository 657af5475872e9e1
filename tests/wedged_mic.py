"""Sound cards whose driver hangs, in this process or as the microphone of a real
`meraudiod run`: `python -m tests.wedged_mic ARGS` is `meraudiod ARGS` with the `mic` source
a card whose read() hangs or, with the device `hung-stop` (MERAUDIOD_AUDIO__DEVICE), one that
delivers silence but whose stop() hangs (PortAudio stuck in its stream stop)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Final

import numpy as np

from meraudiod import cli, signals
from meraudiod.audio import FRAME_S, FRAME_SAMPLES, Int16Array
from meraudiod.config_sections import AudioSettings
from meraudiod.mic_source import MicSource
from meraudiod.sources import AudioSource, SourceError

IN_READ: Final = "tests.wedged_mic: the listener is in a read() that hangs"


class WedgedMic(MicSource):
    """A sound card whose driver hangs: read() never returns, whatever the timeout."""

    def __init__(self) -> None:
        super().__init__(device=None, rate_hz=None, queue_frames=8)
        self.released = threading.Event()
        self.reading = threading.Event()  # the listener is inside read()

    def start(self) -> None:
        self.name = "mic:wedged"

    def read(self, timeout_s: float) -> None:
        if not self.reading.is_set():  # for a test to stop the daemon only once it hangs
            sys.stderr.write(IN_READ + "\n")  # one write: no log line of another thread inside
            sys.stderr.flush()
        self.reading.set()
        self.released.wait()  # ignores timeout_s, as a hung driver call does

    def stop(self) -> None:
        pass


class HungStopMic(MicSource):
    """A sound card that delivers silence at real time but whose stop() never returns (a
    driver hung in PortAudio's stream stop) until `released` is set."""

    def __init__(self) -> None:
        super().__init__(device=None, rate_hz=None, queue_frames=8)
        self.released = threading.Event()
        self.stopping = threading.Event()  # someone is inside stop()
        self.starts = 0

    def start(self) -> None:
        self.name = "mic:hung-stop"
        self.starts += 1

    def read(self, timeout_s: float) -> Int16Array | None:
        time.sleep(FRAME_S)
        return np.zeros(FRAME_SAMPLES, dtype=np.int16)

    def stop(self) -> None:
        self.stopping.set()
        self.released.wait()


class FailingHungStopMic(HungStopMic):
    """A sound card that cannot be opened (unplugged while opening) and whose stop() then
    hangs in the driver until `released` is set."""

    def start(self) -> None:
        super().start()
        raise SourceError("mic:hung-stop: cannot open the device (unplugged)")


def _open_source(spec: str, settings: AudioSettings) -> AudioSource:
    if spec == "mic":
        return HungStopMic() if settings.device == "hung-stop" else WedgedMic()
    return _real_open_source(spec, settings)


_real_open_source = cli.open_source

if __name__ == "__main__":
    cli.open_source = _open_source  # type: ignore[assignment]
    signals.main()
