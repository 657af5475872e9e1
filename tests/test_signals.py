"""Signals set the daemon's stop and reload events without ever deadlocking it. Python runs a
signal's handler in the main thread between two bytecodes, possibly while that thread holds the
lock an Event's set() takes (inside Event.wait or clear): a handler that set the event itself
hung the daemon for good under a flood of SIGHUPs (seen in CI: a `run` that never exited)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

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
    stop.wait(0.0001)
print("stopped after", reloads, "reloads", flush=True)
"""


def test_a_flood_of_sighups_then_sigterm_never_hangs_the_main_loop() -> None:
    for attempt in range(5):  # each flood hung about one time in two before
        proc = subprocess.Popen(
            [sys.executable, "-c", MAIN_LOOP], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for i in range(2000):
            proc.send_signal(signal.SIGHUP)
            if i % 100 == 0:
                time.sleep(0.001)  # let some reloads be seen between the signals
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"flood {attempt}: the main loop hung on its own events") from None
        assert proc.returncode == 0
        reloads = int(out.split()[2])
        assert reloads >= 1, out  # the SIGHUPs were acted on, not ignored
