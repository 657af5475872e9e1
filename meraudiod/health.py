"""The daemon's health: what is wrong with it, in a few words, and who hears of it.

A stage thread that died stops the daemon (systemd restarts it); a full disk, an unusable
MQTT file, a missing microphone or every Wyoming server down only make it degraded, said
in `systemctl status` (STATUS=), in the heartbeat `meraudiod status` reads, and in the
retained state. The watchdog is fed only while every thread is alive and audio arrives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .checks import MayPassError
from .messages import ErrorEvent
from .retention import disk_free_mb, disk_low, read_only_dirs
from .status import write_heartbeat

if TYPE_CHECKING:
    from .daemon import Daemon

_LOGGER = logging.getLogger(__name__)


class Health:
    """The problems of one daemon, its status line and heartbeat, and its watchdog check."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.disk_problem: str | None = None
        # A directory or the database that cannot be written (its disk full, or read-only),
        # as the stages met it or the mount says.
        self.storage_problem: str | None = None
        self._storage_said: set[str] = set()  # its parts, each sent as an event when it began
        self.stage_problem: str | None = None  # a stage thread died: the daemon stops
        self.asr_problem: str | None = None  # every Wyoming server down, or failing
        self._store: tuple[tuple[int, int] | None, ...] = ()  # see note_store()
        self._heartbeat_failing = False

    @property
    def degraded(self) -> str | None:
        """What is wrong, in a few words (None when all is well)."""
        problems = (
            self.stage_problem,
            self.daemon.mic_problem,
            self.disk_problem,
            self.storage_problem,
            self.daemon.surfaces.mqtt_problem,
            self.asr_problem,
        )
        return "; ".join(p for p in problems if p) or None

    # --- stage threads ---------------------------------------------------------------------

    def check_stages(self) -> bool:
        """A stage thread that died is reported (log, STATUS=, status, event/error) and the
        daemon stops with a non-zero exit, for systemd to restart it: never a dead stage
        behind a fed watchdog. True once one has died."""
        if self.stage_problem is not None:
            return True
        daemon = self.daemon
        listener = daemon.listener
        for stage in daemon.stages():
            # A listener ends with its stream or its microphone; the others only on stop()
            # (the command runner follows the daemon's own stop event: ended then is no death).
            stopping = daemon.stop_event.is_set()
            ended = stage is not listener and not stage.is_alive() and not stopping
            if stage.died or ended:
                self._stage_died(stage.thread_name, stage.died or "its thread ended")
                return True
        return False

    def _stage_died(self, name: str, why: str) -> None:
        self._stop_for(name, f"the {name} stage died: {why}")

    def _stop_for(self, component: str, error: str) -> None:
        """Said everywhere (log, STATUS=, status, event/error); the daemon then stops with a
        non-zero exit."""
        daemon = self.daemon
        self.stage_problem = daemon.error = error
        _LOGGER.error("%s; stopping (systemd restarts the service)", error)
        daemon.notifier.status(error)
        self.heartbeat()
        m = self.settings.mqtt
        event = ErrorEvent(node_id=m.node_id, area=m.area, component=component, error=error)
        try:
            daemon.surfaces.publish_event(event)  # delivered by MQTT on its way out
        except sqlite3.Error as exc:  # the store may be what failed
            _LOGGER.error("cannot queue the error event: %s", exc)

    # --- the data directory ----------------------------------------------------------------

    def note_store(self) -> None:
        """Which data directory and database file the daemon opened (at start)."""
        self._store = self._store_identity()

    def _store_identity(self) -> tuple[tuple[int, int] | None, ...]:
        storage = self.settings.storage
        return tuple(_identity(path) for path in (storage.data_dir, storage.db_path))

    def check_store(self) -> bool:
        """The data directory or its database moved, removed or replaced while the daemon
        runs: its open database is wherever the file went, but the audio would go to a
        directory made anew at the old path, and the recordings from then on would be rows
        without audio. The daemon stops instead (systemd starts it again on what is at the
        configured path). True once seen."""
        if self.stage_problem is not None:
            return True
        if not self._store or self._store_identity() == self._store:
            return False
        data_dir = self.settings.storage.data_dir
        self.daemon.pipeline.store_moved()  # before the stop saves what is being said
        self._stop_for(
            "storage",
            f"the data directory {data_dir} or its database was moved, removed or replaced"
            " while running; set storage.data_dir to where it is now",
        )
        return True

    def check_stopped(self) -> None:
        """A stage that died on the way out still fails the run."""
        died = [stage for stage in self.daemon.stages() if stage.died]
        if died and self.stage_problem is None:
            self.stage_problem = self.daemon.error = (
                f"the {died[0].thread_name} stage died: {died[0].died}"
            )

    def healthy(self) -> bool:
        """Every thread alive, and audio arriving (or muted, or the microphone gone and
        waited for): the watchdog may be fed."""
        daemon = self.daemon
        listener = daemon.listener  # its health is the audio's, below
        threads_ok = all(stage.is_alive() for stage in daemon.stages() if stage is not listener)
        if not daemon.listening:
            return threads_ok
        return threads_ok and daemon.audio.healthy(time.monotonic())

    # --- degraded, but running -------------------------------------------------------------

    def check_disk(self) -> None:
        """Below the free-space threshold, audio stays in memory; say so everywhere."""
        low = disk_low(self.settings)
        if low == (self.disk_problem is not None):
            return
        free_mb = disk_free_mb(self.settings.storage.audio_dir)  # where audio is written
        if low:
            self.disk_problem = f"disk almost full ({free_mb:.0f} MB free): audio not written"
            _LOGGER.error("%s", self.disk_problem)
            m = self.settings.mqtt
            self.daemon.surfaces.publish_event(
                ErrorEvent(
                    node_id=m.node_id,
                    area=m.area,
                    component="storage",
                    error=self.disk_problem,
                    context={"free_mb": round(free_mb)},
                )
            )
        else:
            _LOGGER.info("disk space is back (%.0f MB free)", free_mb)
            self.disk_problem = None
        self.announce()
        self.daemon.surfaces.publish_state()

    def check_storage(self) -> None:
        """What the listener or the worker could not write (the audio directory, the
        database), or a directory whose file system is mounted read-only: recordings wait in
        memory meanwhile. Shown as degraded and sent as an event/error; the log has it from
        the stage that met it (once), and the line that says it is written again."""
        daemon = self.daemon
        said = [
            stage.storage_problem
            for stage in (daemon.listener, daemon.pipeline.worker)
            if stage is not None and stage.storage_problem is not None
        ]
        for path in read_only_dirs(self.settings):
            if not any(f"{path} (" in problem for problem in said):
                said.append(f"read-only file system: {path}")
        # The listener and the worker meeting one full database say it in the same words:
        # said once. An event/error is sent for each problem when it begins; one clearing
        # (of several) is no error (the whole joined text was sent again as news).
        problems = list(dict.fromkeys(said))
        problem = "; ".join(problems) or None
        if problem == self.storage_problem:
            return
        self.storage_problem = problem
        new = [p for p in problems if p not in self._storage_said]
        self._storage_said = set(problems)
        if new:
            m = self.settings.mqtt
            error = "; ".join(new)
            event = ErrorEvent(node_id=m.node_id, area=m.area, component="storage", error=error)
            self.daemon.surfaces.publish_event(event)
        self.announce()
        self.daemon.surfaces.publish_state()

    def check_asr(self) -> None:
        """Degraded while the ASR backend says so (every Wyoming server down), or its servers
        fail every request (server_faults.py)."""
        worker = self.daemon.pipeline.worker
        problem = (
            worker.server_faults.problem or worker.transcriber.problem()
            if worker is not None
            else None
        )
        if problem != self.asr_problem:
            self.asr_problem = problem
            _LOGGER.log(logging.WARNING if problem else logging.INFO, "%s", problem or "ASR ok")
            self.announce()
            self.daemon.surfaces.publish_state()

    # --- what is said ----------------------------------------------------------------------

    def status_line(self) -> str:
        """What is wrong, or what the daemon listens to (`systemctl status`)."""
        if self.degraded:
            return self.degraded
        daemon = self.daemon
        return f"listening on {daemon.source.name}" if daemon.listening else "muted"

    def announce(self) -> None:
        """The state changed (the audio's, a problem's): say so in `systemctl status`."""
        self.daemon.notifier.status(self.status_line())

    def heartbeat(self, stopped: bool = False) -> None:
        """The file `meraudiod status` reads (`at` 0 once stopped)."""
        folder = self.settings.storage.runtime_dir
        if not folder.exists() and self.settings.storage.run_dir is not None:
            # `rm -rf` of run_dir (a tmpfs) under the daemon: the heartbeat and the notes
            # of the job in hand go there. (The data directory's removal stops the daemon.)
            with contextlib.suppress(OSError):  # if not, said below, once
                folder.mkdir(parents=True, exist_ok=True)
                _LOGGER.warning(
                    "storage.run_dir %s was removed under the daemon: made again", folder
                )
                try:
                    self.daemon.hold_run_dir_again()
                except MayPassError as exc:  # another daemon took it meanwhile
                    self._stop_for("storage", str(exc))
                    return
        try:
            write_heartbeat(
                self.settings,
                {**self.daemon.snapshot(), **({"at": 0.0} if stopped else {})},
            )
        except OSError as exc:  # `status` goes stale; the daemon itself carries on
            if not self._heartbeat_failing:  # said once, not every 5 s (a full disk)
                _LOGGER.error("cannot write the heartbeat for `status`: %s", exc)
            self._heartbeat_failing = True
            return
        if self._heartbeat_failing:
            _LOGGER.info("heartbeat written again")
            self._heartbeat_failing = False


def _identity(path: Path) -> tuple[int, int] | None:
    """The file or directory at `path` (device and inode; None when there is none)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
