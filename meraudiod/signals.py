"""Signals only set a flag. For `run`, the handlers are installed first thing, before the
slow imports and the model loading: SIGHUP's default action kills, so a `systemctl reload`
while the daemon starts would otherwise end it (exit 129) and systemd would restart it."""

from __future__ import annotations

import signal
import sys
import threading

_flags: tuple[threading.Event, threading.Event] | None = None


def run_handlers() -> tuple[threading.Event, threading.Event]:
    """(stop, reload): set by SIGTERM/SIGINT and by SIGHUP. Installed once per process; a
    signal that arrived during start-up is kept and acted on when the main loop runs."""
    global _flags
    if _flags is None:
        stop, reload = threading.Event(), threading.Event()
        install(stop, reload)
        _flags = (stop, reload)
    return _flags


def install(stop: threading.Event, reload: threading.Event | None = None) -> None:
    """SIGTERM and SIGINT set `stop`; SIGHUP sets `reload` (when given)."""

    def on_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())


def main() -> None:
    """The `meraudiod` command: `run` gets its handlers before anything slow is imported."""
    if sys.argv[1:2] == ["run"]:
        run_handlers()
    if sys.argv[1:2] in (["run"], ["analyze"]):
        from .memory import tune_malloc

        tune_malloc()  # before any model allocates
    from .cli import main as cli_main

    cli_main()
