"""`meraudiod status`: is the daemon running, listening, keeping up?"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli_common import config_option, echo_json, fmt_time, json_option, run_command, settings_from
from .config import Settings, load_storage_settings
from .machine import summary_line
from .status import heartbeat_path
from .wording import counted


@click.command("status")
@config_option
@json_option
def status_cmd(config_path: Path | None, as_json: bool) -> None:
    """Is the daemon running, listening, keeping up? Reads the database and its heartbeat.

    \b
    Examples:
      meraudiod status
      meraudiod status --json | jq .backlog
    """
    try:
        settings, broken = settings_from(config_path), None
    except click.ClickException as exc:  # the file is broken: the daemon may run on its own
        fallback = load_storage_settings(config_path)
        if fallback is None:
            raise
        settings, broken = fallback, exc
    try:
        data = run_command(settings, "status", {})
    except click.ClickException:
        if broken is not None:  # no daemon's store found by the storage section alone
            raise broken from None
        raise
    if as_json:
        echo_json(data)
    else:
        _show(data, settings)
    if broken is not None:
        raise broken  # after the status: what is wrong in the file, and exit 1


def _show(data: dict[str, Any], settings: Settings) -> None:
    """The status as the README shows it, one line per topic."""
    colour = sys.stdout.isatty()

    def mark(ok: bool | None, text: str) -> str:
        if not colour or ok is None:
            return text
        return click.style(text, fg="green" if ok else "red")

    last = data["last_transcript"] or {}
    unsaved = _unsaved_line(data["unsaved"])
    free_ok = data["disk_free_mb"] > settings.retention.min_free_disk_mb
    disk_free = mark(free_ok, f"{data['disk_free_mb']:.0f} MB free")
    rows = [
        (
            "daemon",
            _daemon_line(data, settings, mark),
        ),
        (
            "listening",
            "-"
            if data["listening"] is None
            else mark(
                data["listening"], "yes" if data["listening"] else "muted (microphone closed)"
            ),
        ),
        ("degraded", mark(False, data["degraded"]) if data["degraded"] else "no"),
        *(
            [("restart needed", mark(False, ", ".join(data["restart_needed"])))]
            if data["restart_needed"]
            else []
        ),
        *([("reload refused", mark(False, data["reload_error"]))] if data["reload_error"] else []),
        ("microphone", _microphone_line(data)),
        (
            "backlog",
            mark(data["backlog"] < 10, str(data["backlog"]))
            + (
                f" (oldest from {fmt_time(data['oldest_pending_at'])})"
                if data["oldest_pending_at"]
                else ""
            )
            + (f", {data['jobs']['failed']} failed" if data["jobs"]["failed"] else ""),
        ),
        *([("unsaved", mark(False, unsaved))] if unsaved else []),
        (
            "last transcript",
            f"{fmt_time(last.get('started_at'))}  {(last.get('text') or '')[:60]}",
        ),
        ("last speaker", data["last_speaker"] or "-"),
        (
            "today",
            f"{counted(data['recordings_today'], 'recording')},"
            f" {data['transcripts_today']} transcribed",
        ),
        ("models", ", ".join(f"{k} {v}" for k, v in data["models"].items() if v)),
        *(("asr server", _server_line(srv, mark)) for srv in data["asr_servers"] or ()),
        ("mqtt", _mqtt_line(data, settings.mqtt.enabled, mark)),
        (
            "disk",
            f"{data['disk_used_mb']:.0f} MB used in {data['data_dir']}, {disk_free}",
        ),
        ("version", data["version"]),
        ("platform", summary_line(data["platform"])),
    ]
    for label, value in rows:
        click.echo(f"{label:<16} {value}")


def _daemon_line(data: dict[str, Any], settings: Settings, mark: Callable[..., str]) -> str:
    """Running (pid, uptime), not running (why it stopped), or a process that holds the data
    directory while its heartbeat does not say it runs: starting, stopping, not answering."""
    if data["running"]:
        up_s = data["uptime_s"]  # None in a heartbeat an older version wrote
        up = f", up {up_s:.0f} s" if up_s is not None else ""
        return mark(True, "running") + f" (pid {data['pid']}{up})"
    holder = data.get("data_dir_held_by")
    if holder is not None:
        state, heartbeat = data["data_dir_holder_state"], heartbeat_path(settings)
        said = f"pid {holder} holds {settings.storage.data_dir}"
        if state == "starting":
            said += f", no heartbeat ({heartbeat}) yet; if this lasts, see its log"
        elif state == "not answering":
            age_s = data["heartbeat_age_s"]
            said += f", but its heartbeat ({heartbeat}) was last written {age_s:.0f} s ago"
            said += "; see its log"
        return mark(False, f"{state}: {said}")
    stopped = data.get("stopped_because")
    return mark(False, "not running") + (f" ({stopped})" if stopped else "")


def _unsaved_line(unsaved: dict[str, Any]) -> str:
    """What waits for a writable disk (or the database's lock), and where; "" for nothing."""
    parts = [counted(unsaved["recordings"], "recording")] if unsaved["recordings"] else []
    parts += [f"audio of {counted(unsaved['audio'], 'recording')}"] if unsaved["audio"] else []
    if not parts:
        return ""
    where = (
        f"kept in {unsaved['kept_in']} until the next start"
        if unsaved["kept_in"]
        else "waiting in memory to be saved"
    )
    return f"{' and '.join(parts)} {where}"


def _server_line(srv: dict[str, Any], mark: Callable[[bool | None, str], str]) -> str:
    """A Wyoming server: up or down, its model, and what went wrong (while up: the last
    request's error, until a request succeeds)."""
    line = mark(bool(srv["up"]), f"{srv['uri']}  {'up' if srv['up'] else 'down'}")
    line += f"  {srv['model'] or ''}"
    if srv["error"]:
        line += f"  ({'last request: ' if srv['up'] else ''}{srv['error']})"
    return line


def _mqtt_line(data: dict[str, Any], enabled: bool, mark: Callable[[bool | None, str], str]) -> str:
    """The running daemon's MQTT link: a reload does not start or stop it, so the file's
    `mqtt.enabled` speaks only for a daemon that is not running."""
    mqtt = data["mqtt"] or {}
    if data["running"] and not data["mqtt"]:
        return "disabled" + (" (enabled in the configuration: restart needed)" if enabled else "")
    if not data["running"] and not enabled:
        return "disabled"
    connected = mqtt.get("connected")
    error = mqtt.get("error") or "daemon not running"
    return (
        mark(connected, "connected" if connected else f"not connected ({error})")
        + f", outbox {data['outbox_pending']}, dropped {data['outbox_dropped']}"
    )


def _microphone_line(data: dict[str, Any]) -> str:
    if not data["running"]:
        return "-"
    level_dbfs = data["audio_level_dbfs"]
    if level_dbfs is not None:
        level = f"level {level_dbfs} dBFS"
    else:  # no level while muted (the microphone is closed) or before the first frame
        level = "muted, no level" if data["muted"] else "no level yet"
    return f"{data['microphone']}  {level}, dropped frames {data['dropped_frames']}"
