"""A real wyoming-faster-whisper server on a free loopback port, with the tests' tiny.en
CTranslate2 directory and no model hub, which the Wyoming tests start, kill, stop and
restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

from .broker import free_port


class WyomingServer:
    """`python -m wyoming_faster_whisper` as the Home Assistant add-on runs it."""

    def __init__(self, model_dir: Path, folder: Path, port: int | None = None) -> None:
        self.model_dir = model_dir
        self.folder = folder
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"server-{self.port}.log"

    @property
    def uri(self) -> str:
        """Where the daemon finds it."""
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> WyomingServer:
        """Start it and wait until it answers Describe."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # never the hub, whatever the flags do
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "wyoming_faster_whisper",
                    *("--uri", self.uri, "--model", str(self.model_dir)),
                    *("--data-dir", str(self.folder), "--local-files-only"),
                    *("--stt-library", "faster-whisper", "--compute-type", "int8"),
                    *("--beam-size", "1", "--language", "en", "--cpu-threads", "1"),
                    "--debug",  # logs "Audio stopped" when a request's audio is in
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if self.describe() is not None:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"wyoming-faster-whisper did not start: {self.log.read_text()}")

    def describe(self) -> Info | None:
        """Its Info, or None when it does not answer within a second."""

        async def ask() -> Info:
            async with AsyncTcpClient("127.0.0.1", self.port, connect_timeout=1.0) as client:
                await client.write_event(Describe().event())
                while True:
                    event = await asyncio.wait_for(client.read_event(), 1.0)
                    assert event is not None
                    if Info.is_type(event.type):
                        return Info.from_event(event)

        try:
            return asyncio.run(ask())
        except (OSError, TimeoutError, AssertionError):
            return None

    def requests_in(self) -> int:
        """How many requests' audio it has received (from its debug log)."""
        return self.log.read_text(errors="replace").count("Audio stopped")

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
