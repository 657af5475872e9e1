"""SIGHUP's reload of a running daemon: the configuration file is read again, what can change
live is applied (the log level, the VAD and recorder parameters, speakers and diarization on
or off), and what needs a restart is said. A file that does not load changes nothing."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .checks import reload_file_problems
from .cli_common import setup_logging
from .config import ConfigError, Settings, apply_live, load_settings
from .diarization import DiarizationError
from .segmenter import SegmenterParams
from .status import configured_models
from .voiceprints import SpeakerError

if TYPE_CHECKING:
    from .daemon import Daemon

_LOGGER = logging.getLogger(__name__)
# Read once, at start (the broker's password, the HTTP token): a new secret written into the
# same file changes no key, yet needs a restart to be used.
_SECRET_FILES: Final = (("mqtt", "password_file"), ("http", "token_file"))


def _digest(path: Path | None) -> str | None:
    """What the file holds, as a digest (the secret itself is not kept); None if unreadable."""
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _secret_digests(settings: Settings) -> dict[str, str | None]:
    """The digests of the secret files of the sections that are on, by key."""
    return {
        f"{section}.{key}": _digest(getattr(getattr(settings, section), key))
        for section, key in _SECRET_FILES
        if getattr(settings, section).enabled
    }


class Reloader:
    """Applies a fresh read of the daemon's configuration file to the running daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._secrets_at_start: dict[str, str | None] = {}

    def note_secrets(self) -> None:
        """Digest the secret files as the daemon read them at start (once their disk is
        mounted: read before, they would seem to change at the first reload)."""
        self._secrets_at_start = _secret_digests(self.daemon.settings)

    def reload(self) -> None:
        """Re-read the configuration: apply what can change live, report what cannot."""
        daemon = self.daemon
        try:
            fresh = load_settings(daemon.config_path)
            # A file read at start that is gone now: the daemon runs on what it read, but a
            # restart would fail ("restart needed: its contents" hid that). Fix it first.
            problems = reload_file_problems(fresh)
            if problems:
                raise ConfigError(
                    "; ".join(problems)
                    + " (the running daemon keeps what it read at start; a restart would"
                    " not: fix it first)"
                )
        except ConfigError as exc:
            daemon.reload_error = str(exc)
            daemon.health.heartbeat()  # `status` says so now, not in up to 5 s
            daemon.notifier.status(f"reload failed: {exc}")
            _LOGGER.error("reload refused, keeping the running configuration: %s", exc)
            return
        for (section, key), value in daemon.cli_overrides.items():
            object.__setattr__(getattr(fresh, section), key, value)
        settings = daemon.settings
        applied, needs_restart = apply_live(settings, fresh)
        for name, digest in _secret_digests(settings).items():
            if name not in needs_restart and digest != self._secrets_at_start.get(name):
                needs_restart.append(f"{name} (its contents)")
        kept_off = self._update_speakers()
        if kept_off is not None:  # not applied: `status` says why, as for a refused file
            applied = [n for n in applied if n not in ("speakers.enabled", "diarization.enabled")]
        if any(name.startswith("retention.") for name in applied):
            daemon.retention.sweep_now()
        if any(name.startswith("logging.") for name in applied):
            setup_logging(settings.logging.level, settings.logging.format)
        if applied and daemon.listener is not None:
            daemon.listener.update_params(
                SegmenterParams.from_settings(settings.vad, settings.recorder)
            )
        daemon.reload_error, daemon.restart_needed = kept_off, needs_restart
        daemon.health.heartbeat()
        daemon.notifier.status(
            daemon.health.status_line()
            + (f"; restart needed for {', '.join(needs_restart)}" if needs_restart else "")
        )
        if needs_restart:
            _LOGGER.warning("these settings need a restart: %s", ", ".join(needs_restart))
        # Said last: once it is in the log, `status` shows this reload.
        _LOGGER.info("reloaded configuration: applied %s", ", ".join(applied) or "nothing")

    def _update_speakers(self) -> str | None:
        """Load or free the speaker models as speakers/diarization were turned on or off; a
        model that will not load leaves them off, said in the log; returns why (None: done)."""
        daemon = self.daemon
        kept_off = None
        try:
            changed = daemon.pipeline.update_speakers()
        except (SpeakerError, DiarizationError) as exc:
            kept_off = f"speakers and diarization stay off: {exc}"
            _LOGGER.error("%s", kept_off)
            for section in (daemon.settings.speakers, daemon.settings.diarization):
                object.__setattr__(section, "enabled", False)
            changed = None
        if changed:
            _LOGGER.info("%s", changed)
        daemon.models = configured_models(daemon.settings)
        return kept_off
