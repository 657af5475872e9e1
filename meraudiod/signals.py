"""Signals only set a flag. For `run`, the handlers are installed first thing, before the
slow imports and the model loading: SIGHUP's default action kills, so a `systemctl reload`
while the daemon starts would otherwise end it (exit 129) and systemd would restart it.

The flag is never set by the handler itself. Python runs a handler in the main thread between
two bytecodes, possibly while that thread holds the lock an Event's set() takes (inside its
own Event.wait or clear): setting the event there deadlocks the main loop for good (a flood
of SIGHUPs did). The handlers do nothing; the interpreter's C handler writes each signal's
number to a pipe (signal.set_wakeup_fd), and a thread named `signals` sets the events."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # imported when a child is started: this module is the first of `run`'s
    import subprocess

_flags: tuple[threading.Event, threading.Event] | None = None
_command_stop: threading.Event | None = None
_CHILD_STOP_S: Final = 30.0  # a child told to stop that has not: killed


def run_handlers() -> tuple[threading.Event, threading.Event]:
    """(stop, reload): set by SIGTERM/SIGINT and by SIGHUP. Installed once per process; a
    signal that arrived during start-up is kept and acted on when the main loop runs."""
    global _flags
    if _flags is None:
        stop, reload = threading.Event(), threading.Event()
        install(stop, reload)
        _flags = (stop, reload)
    return _flags


def command_handlers() -> threading.Event:
    """The stop event of a one-off command (`analyze`), set by SIGTERM and SIGINT (SIGHUP
    keeps its default: a terminal that hangs up ends it). Installed once per process, first
    thing: before, a SIGTERM in the second of imports before them killed it without a word."""
    global _command_stop
    if _command_stop is None:
        _command_stop = threading.Event()
        install(_command_stop)
    return _command_stop


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT in a command that has no stop event for its loops to check (`bench`,
    whose measurements wait in sleeps and child processes): raised in the main thread like
    Ctrl-C's KeyboardInterrupt, so every `with` and `finally` on the way out stops the
    processes it started and removes the directories it made."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


def unwinding_handlers() -> None:
    """SIGTERM and SIGINT raise Stopped (once: the cleanup it sets off is not cut short by a
    second one). For a one-off command's main thread, installed first thing."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _unwind)


# While a child starts (child_process): the signal that came meanwhile, raised once it is started.
_held: list[int] | None = None


def _unwind(signum: int, frame: object) -> None:
    """Raises Stopped where the main thread is; from now on both signals are ignored."""
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    if _held is not None:
        _held.append(signum)
        return
    raise Stopped(signum)


@contextlib.contextmanager
def child_process(args: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """`subprocess.Popen(args, **popen)`, stopped on the way out if it still runs (SIGTERM,
    then SIGKILL after _CHILD_STOP_S), its pipes closed: a measurement that raised, or the
    Stopped of a signal, leaves no process behind. Stopped is held back while the child
    starts: raised inside Popen, after the fork, it left a child nobody held (a bench's
    daemon ran on)."""
    import subprocess

    global _held
    child: subprocess.Popen[bytes] | None = None
    try:
        _held = []
        try:
            child = subprocess.Popen(args, **popen)
        finally:
            came, _held = _held, None
            if came:
                raise Stopped(came[0])
        yield child
    finally:
        if child is not None:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(_CHILD_STOP_S)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            for stream in (child.stdin, child.stdout, child.stderr):
                if stream is not None:
                    stream.close()


# Which event each signal sets: SIGTERM and SIGINT stop, SIGHUP reloads.
_events: dict[int, threading.Event] = {}
_watcher: threading.Thread | None = None


def install(stop: threading.Event, reload: threading.Event | None = None) -> None:
    """SIGTERM and SIGINT set `stop`; SIGHUP sets `reload` (when given). From the main thread."""
    global _watcher
    _events.clear()
    _events.update({signal.SIGTERM: stop, signal.SIGINT: stop})
    if reload is not None:
        _events[signal.SIGHUP] = reload
    if _watcher is None:
        atexit.register(_ignore_on_exit)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write_fd, False)  # set_wakeup_fd's demand: a signal never blocks
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        _watcher = threading.Thread(target=_set_events, args=(read_fd,), name="signals")
        _watcher.daemon = True  # blocked in read() for the life of the process
        _watcher.start()
    for signum in _events:
        signal.signal(signum, _only_woken)


def _only_woken(signum: int, frame: object) -> None:
    """A Python handler must be there for the C one to write the pipe; the work is
    _set_events'."""


def _ignore_on_exit() -> None:
    """Stopped and exiting: the interpreter is about to put back the default actions (which
    kill) and then free the models, a fraction of a second in which a second SIGTERM, a
    Ctrl-C or a SIGHUP ended a clean stop as killed (exit -15). Ignored ones it leaves be."""
    for signum in _events:
        signal.signal(signum, signal.SIG_IGN)


def _set_events(read_fd: int) -> None:
    """The `signals` thread: each signal's number read from the pipe sets its event."""
    while True:
        for signum in os.read(read_fd, 512):
            event = _events.get(signum)
            if event is not None:
                event.set()


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
    """The `meraudiod` command: `run`, `analyze` and `bench` get their handlers before
    anything slow is imported; any other command's Ctrl-C then is click's `Aborted!`, not a
    traceback."""
    open_closed_streams()
    if sys.argv[1:2] == ["run"]:
        run_handlers()
    elif sys.argv[1:2] == ["analyze"]:
        command_handlers()
    elif sys.argv[1:2] == ["bench"]:
        unwinding_handlers()
    if sys.argv[1:2] in (["run"], ["analyze"]):
        from .memory import tune_malloc

        tune_malloc()  # before any model allocates
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while the modules load, before click can say it
        sys.stderr.write("\nAborted!\n")
        sys.exit(1)

    cli_main()
