"""Builds the stages, starts them (sinks first, the microphone last), runs the main loop,
and stops them in reverse.

The main thread owns signals (they only set the stop event), the listening switch (through
a queue from MQTT), the heartbeat that `meraudiod status` reads, the retained
state, and the systemd watchdog, which is fed only while audio frames arrive and every
thread is alive. What the daemon is reached through (MQTT, HTTP) is in `surfaces.py`, what
is wrong with it in `health.py`, and SIGHUP's reload in `reloader.py`.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from . import jobs
from .checks import check_writable, files_in_use, hold_data_dir, hold_run_dir
from .config import Settings
from .db import (
    DatabaseError,
    DiskFullError,
    LockedDatabaseError,
    get_kv,
    lock_said_at_once,
    open_db,
    set_kv,
)
from .health import Health
from .listener import Listener
from .messages import Event
from .mic_source import MicSource
from .microphone import AudioSupervisor
from .mounts import models_dir, storage_dirs, wait_for_mounts
from .pipeline import Pipeline
from .reloader import Reloader
from .retention import Retention
from .sources import AudioSource, FileSource, StdinSource
from .stage import StageThread
from .status import configured_models, daemon_snapshot, heartbeat_path
from .surfaces import Surfaces
from .systemd import Notifier
from .wording import counted
from .worker import TranscribedRecording

_LOGGER = logging.getLogger(__name__)
_POLL_S: Final = 0.2
_HEARTBEAT_EVERY_S: Final = 5.0
_STATE_EVERY_S: Final = 30.0
_LISTENING_KEY: Final = "listening"
# A database whose disk is full, or whose write lock another process holds, at start is waited
# for this long (within the unit's TimeoutStartSec=180), tried again this often.
_STORE_WAIT_S: Final = 120.0
_STORE_POLL_S: Final = 2.0


class Daemon:
    """The always-on service."""

    def __init__(
        self,
        settings: Settings,
        source: AudioSource,
        stop: threading.Event,
        on_transcribed: Callable[[TranscribedRecording], None] | None = None,
    ) -> None:
        self.settings = settings
        # What this process loads (a reload may load or free the speaker models).
        self.models = configured_models(settings)
        self.source = source
        self.stop_event = stop
        # The worker has its own stop so that, on the way out, it ends after the listener.
        self._worker_stop = threading.Event()
        self.pipeline = Pipeline(settings, self._worker_stop, on_transcribed)
        self.listening = True
        self.config_path: str | None = None  # what SIGHUP reloads
        self.cli_overrides: dict[tuple[str, str], Any] = {}  # command-line options win on reload
        self.reload_requested = threading.Event()
        self.restart_needed: list[str] = []  # changed keys the last reload could not apply
        self.reload_error: str | None = None  # why the last reload was refused
        self._data_lock: int | None = None  # the flock on data_dir/daemon.lock, held for life
        self._run_lock: int | None = None  # and on run_dir/daemon.lock
        self.error: str | None = None
        self.notifier = Notifier()
        self.inbound: queue.Queue[Any] = queue.Queue(maxsize=100)
        self.retention = Retention(settings, self._worker_stop)
        self.conn: sqlite3.Connection | None = None
        self.started_at = time.monotonic()
        self.surfaces = Surfaces(self)  # MQTT, its command runner, HTTP
        self.health = Health(self)
        self.reloader = Reloader(self)
        self.audio = AudioSupervisor(source, self._start_listener, self.health.announce)

    @property
    def finite(self) -> bool:
        """A file or stdin ends; a microphone does not."""
        return isinstance(self.source, FileSource | StdinSource)

    # --- start -----------------------------------------------------------------------------

    def start(self) -> bool:
        """Store and models, then the sinks (MQTT, worker, retention, HTTP), then the
        microphone. False when stopped while waiting for the storage's disk to be mounted
        (or a password or token file's: read before the mount, it would be missing)."""
        settings = self.settings
        needed = storage_dirs(settings) | models_dir(settings) | files_in_use(settings)
        if not wait_for_mounts(needed, self.stop_event, self._waiting):
            return False
        if isinstance(self.source, FileSource):  # a mistyped name: said before any model loads
            self.source.check()
        check_writable(self.settings)  # one line naming the directory, not a traceback
        self._data_lock = hold_data_dir(self.settings)  # not a second daemon beside another
        heartbeat_path(self.settings).parent.mkdir(parents=True, exist_ok=True)
        self._run_lock = hold_run_dir(self.settings)  # nor one of another data directory
        conn = self._open_store()
        if conn is None:
            return False
        self.conn = conn
        self.pipeline.open(recovered=True)
        self.health.note_store()
        # A muted microphone stays muted across restarts; a file or stdin always plays.
        self.listening = self.finite or get_kv(self.conn, _LISTENING_KEY, "ON") == "ON"
        if self.settings.mqtt.enabled:
            self.surfaces.start_mqtt()
        self.pipeline.start_worker()
        self.retention.start()
        if self.settings.http.enabled:
            self.surfaces.start_http()
        self.reloader.note_secrets()  # read by MQTT and HTTP, just now
        if self.listening:  # a file not decodable fails here; a microphone is waited for
            self.audio.open(time.monotonic())
        self.surfaces.publish_listening()
        self.health.heartbeat()
        self.notifier.ready(self.health.status_line())
        _LOGGER.info("ready: %s", self.health.status_line())
        return True

    def _say_what_is_left(self) -> None:
        """Stopped with recordings of its own left to transcribe (a replay stopped half way, a
        backlog, a `reprocess`): said, where a stop said nothing of them."""
        assert self.conn is not None
        try:
            left = jobs.unfinished(self.conn)
        except sqlite3.Error:  # a damaged or vanished database: said where it failed
            return
        if left:
            _LOGGER.warning(
                "stopped with %s left to transcribe: transcribed at the next start",
                counted(left, "recording"),
            )

    def _open_store(self) -> sqlite3.Connection | None:
        """The database, recovered (pipeline.recover). On a disk full to the last byte SQLite
        cannot even open it; another process may hold its write lock (an admin's sqlite3
        shell left in a transaction, a backup, a long purge), which the recovery's writes (or
        a migration) would wait out for the busy timeout, then fail. Either goes away by
        itself: it is waited for, up to _STORE_WAIT_S and said once, rather than a restart
        every 5 s or a failure in silence (then DatabaseError: exit 1, restarted). None when
        stopped while waiting."""
        path = self.settings.storage.db_path
        deadline = time.monotonic() + _STORE_WAIT_S
        waited: str | None = None  # once said: what to say when it is over
        while True:
            try:
                conn = open_db(path)  # one that must be migrated says it is locked at once
                try:
                    # Its first write is the look for the lock: none taken between a look
                    # and the writes waits out the busy timeout.
                    with lock_said_at_once(conn, path):
                        self.pipeline.recover(conn)
                except BaseException:
                    conn.close()
                    raise
            except DiskFullError as exc:
                error: DatabaseError = exc
                waiting = f"waiting up to {_STORE_WAIT_S:.0f} s for room: {exc}"
                over = "the database's disk has room again"
            except LockedDatabaseError as exc:
                error = exc
                waiting = f"{error}; waiting up to {_STORE_WAIT_S:.0f} s"
                over = "the database's write lock is free again"
            else:
                if waited is not None:
                    _LOGGER.info("%s", waited)
                return conn
            if time.monotonic() >= deadline:
                raise type(error)(f"{error}; waited {_STORE_WAIT_S:.0f} s") from error
            if waited != over:
                self._waiting(waiting)
                waited = over
            if self.stop_event.wait(_STORE_POLL_S):
                return None

    def _waiting(self, what: str) -> None:
        """Said before READY: in the log and in `systemctl status`."""
        _LOGGER.warning("%s", what)
        self.notifier.status(what)

    @property
    def listener(self) -> Listener | None:
        """The listener on the source (None until one was started)."""
        return self.audio.listener

    @property
    def mic_problem(self) -> str | None:
        """What is wrong with the audio input (None when all is well)."""
        return self.audio.problem

    @property
    def mqtt(self) -> Any:
        """The MQTT link (None while MQTT is off)."""
        return self.surfaces.mqtt

    @property
    def stage_problem(self) -> str | None:
        """The stage thread that died, and why (None while all run)."""
        return self.health.stage_problem

    @property
    def degraded(self) -> str | None:
        """What is wrong, in a few words (None when all is well)."""
        return self.health.degraded

    def _start_listener(self) -> Listener:
        return self.pipeline.listener(
            self.source,
            error_said_by_caller=self.finite,  # `run` ends with it (a microphone is retried)
            **self.speech_hooks(self.source.name),
        )

    def speech_hooks(self, source: str) -> dict[str, Any]:
        """A listener's speech start and end events, to MQTT and the HTTP stage's sockets."""
        return self.surfaces.speech_hooks(source)

    def published(self, event: Event) -> None:
        """A command (over MQTT or HTTP) queued an event: deliver it now, and to the live
        sockets."""
        self.surfaces.published(event)

    # --- main loop -------------------------------------------------------------------------

    def hold_run_dir_again(self) -> None:
        """storage.run_dir was made again (removed under the daemon, its lock file with it):
        its lock taken again, so a second daemon given it is still refused; MayPassError
        when one took it meanwhile."""
        if self._run_lock is not None:
            os.close(self._run_lock)
        self._run_lock = hold_run_dir(self.settings)

    def run(self) -> int:
        """Main loop until stopped (or, for a file, until it has played and been transcribed)."""
        assert self.conn is not None, "start() first"
        surfaces, health = self.surfaces, self.health
        next_heartbeat = next_state = next_watchdog = 0.0
        while not self.stop_event.is_set():
            try:
                item = self.inbound.get(timeout=_POLL_S)
            except queue.Empty:
                item = None
            if item is not None:
                surfaces.handle_inbound(item)
            t = time.monotonic()
            if health.check_stages() or health.check_store():
                break
            if self.listening:
                self.audio.check(t)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reloader.reload()
            if t >= next_heartbeat:
                if surfaces.mqtt_problem is not None:
                    surfaces.connect_mqtt()
                health.check_disk()
                health.check_storage()
                health.check_asr()
                health.heartbeat()
                next_heartbeat = t + _HEARTBEAT_EVERY_S
            if self.notifier.watchdog_interval_s and t >= next_watchdog:
                if health.healthy():
                    self.notifier.watchdog()
                next_watchdog = t + self.notifier.watchdog_interval_s
            if surfaces.mqtt is not None and (t >= next_state or surfaces.state_changed()):
                surfaces.publish_state()
                next_state = t + _STATE_EVERY_S
            if self._finished():
                break
        health.check_stages()  # a file run that ended because a stage died never exits 0
        return 1 if self.error else 0

    def stages(self) -> list[StageThread]:
        """The stage threads started so far, the listener last."""
        stages = (
            self.pipeline.worker,
            self.retention,
            self.surfaces.mqtt,
            self.surfaces.commands,
            self.surfaces.http,
            self.listener,
        )
        return [stage for stage in stages if stage is not None and stage.started]

    def _finished(self) -> bool:
        """A file or stdin has played, and its recordings are transcribed."""
        listener = self.listener
        if listener is None or not listener.finished.is_set():
            return False
        if listener.error:
            self.error = listener.error
            if isinstance(self.source, MicSource):
                return False  # a microphone is retried
        if not self.finite or self.stop_event.is_set():  # asked to stop: the backlog waits
            return False
        # What was heard before an error is transcribed too; a SIGTERM meanwhile ends the wait.
        self.pipeline.drain(self.stop_event)
        return True

    def snapshot(self) -> dict[str, Any]:
        """What it says about itself now (the heartbeat file may be 5 s old, or not written
        at all when its disk is full): for `status` and the metrics it serves itself."""
        return daemon_snapshot(self)

    def speaker_stage(self) -> Any:
        """The worker's loaded speaker models, for enrolment over MQTT (None when off)."""
        return self.pipeline.worker.speakers if self.pipeline.worker is not None else None

    def set_listening(self, on: bool) -> None:
        """Open or close the microphone; persisted across restarts."""
        assert self.conn is not None
        if on != self.listening:
            self.listening = on
            set_kv(self.conn, _LISTENING_KEY, "ON" if on else "OFF")
            if not isinstance(self.source, MicSource):
                if self.listener is not None:  # a file or a pipe: keep reading, record nothing
                    self.listener.muted = not on
            elif on:
                self.audio.open(time.monotonic())  # a missing microphone is waited for
            else:  # muted means the microphone is closed, and no longer waited for
                self.audio.close()
            _LOGGER.info("listening %s", "ON" if on else "OFF")
            self.health.announce()
            self.health.heartbeat()
        self.surfaces.publish_listening()
        self.surfaces.publish_state()

    # --- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Reverse order: the microphone and listener (saving what was being said), HTTP,
        then the worker after its current job, then retention, then MQTT (which says
        `offline`)."""
        self.notifier.stopping()
        self.stop_event.set()
        self.audio.close()
        self.surfaces.stop_http()  # its live sockets' listeners save what they heard
        self._worker_stop.set()
        self.pipeline.close()
        self.retention.join()
        self.surfaces.stop_mqtt()  # the command runner, the last state, then `offline`
        self.health.check_stopped()  # on the way out: the run still fails
        if self.conn is not None:  # it started, and wrote a heartbeat
            self.health.heartbeat(stopped=True)
            self._say_what_is_left()
            self.conn.close()
