"""Audio supervision: the source and its listener opened, watched, and reopened.

A microphone that is not there (at start, after an unplug, on `listening/set ON`) is waited
for with backoff and shown as degraded, never a failed start: waiting is healthy, so the
watchdog stays fed. One that opens but delivers nothing is a stall: reopened, and unhealthy.
stdin that stops delivering is said once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final

from .listener import Listener
from .mic_source import MicSource
from .sources import AudioSource, SourceError

_LOGGER = logging.getLogger(__name__)
AUDIO_STALL_S: Final = 5.0  # no frame for this long while listening: the audio is gone
_RETRY_MAX_S: Final = 60.0
# While a microphone stays missing (or its listener stuck) its retries are DEBUG: one ERROR
# when it begins, then a WARNING reminder after 1 min, 2, 4 ... at most hourly (an ERROR a
# minute buried the journal).
_REMIND_FIRST_S: Final = 60.0
_REMIND_MAX_S: Final = 3600.0
_FIRST_STOP_S: Final = 5.0  # a listener is given this long to stop, once
# On the way out a listener is given this long to save what it was hearing: one hung in the
# driver held the daemon's stop for ever, until systemd's SIGKILL (TimeoutStopSec=30) lost
# what the other stages had in memory too.
_CLOSE_WAIT_S: Final = 5.0


class _Lasting:
    """A fault that lasts while it is retried: which level each retry is said at (ERROR when
    it begins, DEBUG after, WARNING now and then as a reminder)."""

    def __init__(self) -> None:
        self.since: float | None = None  # when it began; None: not now
        self._remind_gap_s = _REMIND_FIRST_S
        self._remind_at = 0.0

    def level(self, t: float) -> int:
        """The level to say this retry at (it begins with the first call after `over`)."""
        if self.since is None:
            self.since = t
            self._remind_gap_s = _REMIND_FIRST_S
            self._remind_at = t + self._remind_gap_s
            return logging.ERROR
        if t >= self._remind_at:
            self._remind_gap_s = min(_REMIND_MAX_S, self._remind_gap_s * 2)
            self._remind_at = t + self._remind_gap_s
            return logging.WARNING
        return logging.DEBUG

    def minutes(self, t: float) -> float:
        """How long it has lasted."""
        return 0.0 if self.since is None else (t - self.since) / 60

    def over(self) -> None:
        """It ended: the next one is said at ERROR again."""
        self.since = None


class AudioSupervisor:
    """Opens the source and its listener, watches that frames arrive, reopens a microphone
    that stops delivering (1 s doubling to 60 s), and says what is wrong in `problem`."""

    def __init__(
        self,
        source: AudioSource,
        start_listener: Callable[[], Listener],
        on_change: Callable[[], None],
    ) -> None:
        self.source = source
        self.listener: Listener | None = None
        self.problem: str | None = None
        self._start_listener = start_listener
        self._on_change = on_change  # `problem` changed: the daemon updates STATUS=
        # The microphone is not there at all (opening it fails): waiting for it, degraded,
        # is healthy. One that opens but delivers nothing is a stall, for systemd to restart.
        self._gone = False
        self._ever_opened = False
        self._retry_s = 1.0
        self._next_retry = 0.0
        self._opened_at = 0.0
        self._missing = _Lasting()  # opening the microphone fails
        self._stuck = _Lasting()  # its listener does not stop (hung in the driver)
        self._closing: threading.Thread | None = None  # the source's stop(), maybe hung

    @property
    def is_mic(self) -> bool:
        """A microphone is waited for and reopened; a file or a pipe is not."""
        return isinstance(self.source, MicSource)

    def open(self, t: float) -> None:
        """Start listening. A file or pipe that cannot be opened raises SourceError; a
        microphone that is not there is waited for."""
        if not self.is_mic:
            self.source.start()
            self.listener = self._start_listener()
            self._opened_at = t
            return
        self._retry_s = 1.0
        listener = self.listener
        if listener is not None and listener.is_alive():  # close() left it stuck (a mute)
            # A second listener beside it would save the same audio twice: check() retries.
            self._set_problem(f"the listener of {self.source.name} does not stop")
            self._say_stuck(t)
            self._next_retry = t + self._retry_s
            return
        if self._still_closing():  # close() left its stop() hung (a mute)
            # Opening the device while its stop() runs would race with it: check() retries.
            self._set_problem(f"{self.source.name} does not close")
            self._next_retry = t + self._retry_s
            return
        self._open_mic(t)

    def close(self) -> None:
        """Stop listening (the listener saves what was being said) and close the device; a
        missing microphone is no longer waited for. A listener that does not stop in
        _CLOSE_WAIT_S is said and left behind: the rest still closes."""
        listener = self.listener
        if listener is not None:
            listener.stop(timeout_s=_CLOSE_WAIT_S)
            if listener.is_alive():
                _LOGGER.error(
                    "the listener of %s did not stop within %.0f s (stuck in %s); closing the"
                    " rest without it: what it was hearing is lost",
                    self.source.name,
                    _CLOSE_WAIT_S,
                    listener.stuck_in(),
                )
        self._stop_source(_CLOSE_WAIT_S, "closing the rest without it")
        self._gone = False
        self._missing.over()
        self._stuck.over()
        self.problem = None  # the caller says muted or stopping

    def healthy(self, t: float) -> bool:
        """Audio arriving, or the microphone gone and waited for."""
        listener = self.listener
        return self._gone or (
            listener is not None
            and listener.is_alive()
            and t - listener.last_frame_at < AUDIO_STALL_S
        )

    def check(self, t: float) -> None:
        """Called from the main loop while listening: reopen a microphone that stopped
        delivering, when its backoff is due; say when stdin stopped."""
        if not self.is_mic:
            self._check_stream(t)
            return
        listener = self.listener
        stalled = (
            listener is None
            or not listener.is_alive()
            or (listener.frames_read > 0 and t - listener.last_frame_at > AUDIO_STALL_S)
            or (listener.frames_read == 0 and t - self._opened_at > AUDIO_STALL_S)
        )
        if not stalled:
            if self.problem:
                _LOGGER.info("microphone %s is back", self.source.name)
                self._set_problem(None)
            self._retry_s = 1.0
            return
        if t < self._next_retry or self._still_closing():
            return
        stuck = self._stuck.since is not None
        if not self._gone and not stuck:  # it delivered, then stopped (one that never opened
            # is no news; one whose listener is stuck was said)
            self._set_problem("microphone lost: retrying")
            _LOGGER.warning("no audio from %s; reopening it", self.source.name)
        if listener is not None:
            # Waited for once: each later retry holding the main loop 5 s would gain nothing.
            listener.stop(timeout_s=0.0 if stuck else _FIRST_STOP_S)
        # Opening the device while its stop() runs would race with it: the next check after
        # that stop() returns reopens it.
        if not self._stop_source(_FIRST_STOP_S, "not reopening it until it does"):
            self._set_problem(f"{self.source.name} does not close")
            return
        if listener is not None and listener.is_alive():
            # Stuck in the driver: a second listener beside it would save the same audio
            # twice; the next try comes after the backoff.
            self._say_stuck(t)
            self._next_retry = t + self._retry_s
            self._retry_s = min(_RETRY_MAX_S, self._retry_s * 2)
            return
        if stuck:
            _LOGGER.info(
                "the listener of %s stopped after %.0f min; reopening it",
                self.source.name,
                self._stuck.minutes(t),
            )
            self._stuck.over()
        self._open_mic(t)

    def _stop_source(self, wait_s: float, meanwhile: str) -> bool:
        """The source's stop() on a thread of its own, waited for `wait_s`: a driver hung in
        it (PortAudio's stream stop) held the daemon's stop until systemd's SIGKILL. False:
        it is still running, left behind, said in one ERROR line ending with `meanwhile`."""
        if self._still_closing():  # one before hangs: a second stop() would wait behind it
            _LOGGER.error(
                "%s still does not close (its stop() hangs in the driver); %s",
                self.source.name,
                meanwhile,
            )
            return False
        closing = self._closing = threading.Thread(
            target=self.source.stop, name="source-stop", daemon=True
        )
        closing.start()
        closing.join(wait_s)
        if closing.is_alive():
            _LOGGER.error(
                "%s did not close within %.0f s (its stop() hangs in the driver); %s",
                self.source.name,
                wait_s,
                meanwhile,
            )
        return not closing.is_alive()

    def _still_closing(self) -> bool:
        """A stop() left behind by close() has not returned yet."""
        return self._closing is not None and self._closing.is_alive()

    def _open_mic(self, t: float) -> None:
        try:
            self.source.start()
            self.listener = self._start_listener()
        except SourceError as exc:
            self._stop_source(_FIRST_STOP_S, "opening it again once it does")
            lost = "microphone lost" if self._ever_opened else "waiting for the microphone"
            self._say_missing(t, exc)
            self._gone = True
            self._set_problem(f"{lost}: {exc}")
        else:
            self._opened_at = t
            self._gone = False
            self._missing.over()
            self._ever_opened = True
        self._next_retry = t + self._retry_s
        self._retry_s = min(_RETRY_MAX_S, self._retry_s * 2)

    def _say_missing(self, t: float, exc: SourceError) -> None:
        """Once at ERROR when it goes (the error names the device), each retry after that at
        DEBUG, with a WARNING reminder now and then: status shows it missing all along."""
        level = self._missing.level(t)
        if level == logging.ERROR:
            _LOGGER.error("%s; waiting for it (retries at DEBUG, reminders spaced out)", exc)
        elif level == logging.WARNING:
            missing_min = self._missing.minutes(t)
            _LOGGER.warning("still no microphone after %.0f min: %s; retrying", missing_min, exc)
        else:
            _LOGGER.debug("%s; retrying in %.0f s", exc, self._retry_s)

    def _say_stuck(self, t: float) -> None:
        """As a missing microphone: once at ERROR, retries at DEBUG, reminders spaced out."""
        name = self.source.name
        level = self._stuck.level(t)
        if level == logging.ERROR:
            _LOGGER.error(
                "the listener of %s does not stop; not reopening yet (retries at DEBUG,"
                " reminders spaced out)",
                name,
            )
        elif level == logging.WARNING:
            _LOGGER.warning(
                "the listener of %s still does not stop after %.0f min; not reopening yet",
                name,
                self._stuck.minutes(t),
            )
        else:
            _LOGGER.debug(
                "the listener of %s does not stop; retrying in %.0f s", name, self._retry_s
            )

    def _check_stream(self, t: float) -> None:
        """stdin (or a file paced at real time) that stops delivering is said once; the
        watchdog is no longer fed, so systemd restarts the service."""
        listener = self.listener
        if listener is None or listener.finished.is_set():
            return
        stalled = t - (listener.last_frame_at or self._opened_at) > AUDIO_STALL_S
        if stalled and self.problem is None:
            _LOGGER.warning("no audio from %s for %.0f s", self.source.name, AUDIO_STALL_S)
            self._set_problem(f"no audio from {self.source.name} for {AUDIO_STALL_S:.0f} s")
        elif not stalled and self.problem is not None:
            _LOGGER.info("audio from %s is back", self.source.name)
            self._set_problem(None)

    def _set_problem(self, problem: str | None) -> None:
        if problem != self.problem:
            self.problem = problem
            self._on_change()
