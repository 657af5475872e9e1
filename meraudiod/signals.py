"""Signals only set a flag. For `run`, the handlers are installed first thing, before the
slow imports and the model loading: SIGHUP's default action kills, so a `systemctl reload`
while the daemon starts would otherwise end it (exit 129) and systemd would restart it."""

from __future__ import annotations

import os
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


def open_closed_streams() -> None:
    """A standard stream the command was started without (`2>&-`) is opened on /dev/null:
    Python leaves sys.stderr None then, and the next file opened (a recording's audio)
    would take the number 2 and get whatever a library prints to stderr. sys.stdin stays
    None, so `run --source stdin` still says its input is closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed: the lowest free number is this one
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd:
                setattr(sys, ("stdout", "stderr")[fd - 1], open(fd, "w", closefd=False))  # noqa: SIM115


def main() -> None:
    """The `meraudiod` command: `run` gets its handlers before anything slow is imported."""
    open_closed_streams()
    if sys.argv[1:2] == ["run"]:
        run_handlers()
    if sys.argv[1:2] in (["run"], ["analyze"]):
        from .memory import tune_malloc

        tune_malloc()  # before any model allocates
    from .cli import main as cli_main

    cli_main()
