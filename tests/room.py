"""A sound card for the microphone tests, on a machine that has none: a private PulseAudio
server whose null sink "room" runs at 48 kHz on the real clock. Speech played into the room
(paplay, in real time) is what PortAudio's ALSA `pulse` device records from the sink's
monitor, so `--source mic` runs the real capture path. Unloading the sink is a microphone
unplugged mid-stream; loading it again plugs it back in."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

RATE_HZ = 48000  # a card's native rate, not 16 kHz: the source must resample


class Room:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "native"
        runtime, home = folder / "run", folder / "home"
        runtime.mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        # Every client (pactl, paplay, the daemon's PortAudio) reaches this server only.
        self.env = {
            **os.environ,
            "PULSE_SERVER": f"unix:{self.socket}",
            "XDG_RUNTIME_DIR": str(runtime),
            "HOME": str(home),
        }
        self.sink_module: str | None = None

    def start(self) -> None:
        subprocess.run(
            [
                shutil.which("pulseaudio") or "pulseaudio",
                "--daemonize=yes",
                "--exit-idle-time=-1",
                "--use-pid-file=yes",
                "-n",  # no default modules: nothing moves streams or finds real cards
                "-L",
                f"module-native-protocol-unix auth-anonymous=1 socket={self.socket}",
                f"--log-target=file:{self.folder / 'pulseaudio.log'}",
            ],
            env=self.env,
            check=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while self._pactl("info", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("pulseaudio did not start")
            time.sleep(0.1)
        self.plug_in()

    def plug_in(self) -> None:
        self.sink_module = self._pactl(
            "load-module", "module-null-sink", "sink_name=room", f"rate={RATE_HZ}"
        ).stdout.strip()
        self._pactl("set-default-source", "room.monitor")

    def unplug(self) -> None:
        assert self.sink_module is not None
        self._pactl("unload-module", self.sink_module)
        self.sink_module = None

    def play(self, wav: Path) -> subprocess.Popen[bytes]:
        """Start playing into the room; it takes as long as the recording lasts."""
        return subprocess.Popen(
            ["paplay", "--device=room", str(wav)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        subprocess.run(
            [shutil.which("pulseaudio") or "pulseaudio", "--kill"],
            env=self.env,
            check=False,
            timeout=30,
        )

    def _pactl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pactl", *args], env=self.env, capture_output=True, text=True, check=check, timeout=30
        )
