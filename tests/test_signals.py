"""Signals set the daemon's stop and reload events without ever deadlocking it. Python runs a
signal's handler in the main thread between two bytecodes, possibly while that thread holds the
lock an Event's set() takes (inside Event.wait or clear): a handler that set the event itself
hung the daemon for good under a flood of SIGHUPs (seen in CI: a `run` that never exited)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from typing import IO

# The main loop's own use of its events: clear the reload flag, wait on stop, again and again.
MAIN_LOOP = """
from meraudiod.signals import run_handlers
stop, reload = run_handlers()
print("ready", flush=True)
reloads = 0
while not stop.is_set():
    if reload.is_set():
        reload.clear()
        reloads += 1
        if reloads == 1:
            print("reloaded", flush=True)
    stop.wait(0.0001)
print("stopped after", reloads, "reloads", flush=True)
"""


def _read(stream: IO[str], lines: queue.Queue[str]) -> None:
    """Each line the process prints, as it comes."""
    for line in stream:
        lines.put(line)


def test_a_flood_of_sighups_then_sigterm_never_hangs_the_main_loop() -> None:
    for attempt in range(5):  # each flood hung about one time in two before
        proc = subprocess.Popen(
            [sys.executable, "-c", MAIN_LOOP], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_read, args=(proc.stdout, lines), name="stdout-reader")
        reader.start()
        try:
            assert lines.get(timeout=20) == "ready\n"
            for i in range(2000):
                proc.send_signal(signal.SIGHUP)
                if i % 100 == 0:
                    time.sleep(0.001)  # let some reloads be seen between the signals
            # The SIGHUPs acted on, not ignored, before the SIGTERM: sent a fixed moment
            # later, a signals thread not run meanwhile (a loaded machine) read both at once
            # and the loop stopped first.
            assert lines.get(timeout=20) == "reloaded\n", f"flood {attempt}: no reload seen"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        except (queue.Empty, subprocess.TimeoutExpired):
            said = "the main loop hung on its own events, or saw no SIGHUP"
            raise AssertionError(f"flood {attempt}: {said}") from None
        finally:
            proc.kill()
            proc.wait()
            reader.join(10)
        assert proc.returncode == 0
        assert lines.get(timeout=1).startswith("stopped after"), attempt
