"""What every `meraudiod` subcommand shares: --config and --json, settings, logging, the
store, output formats, and the command table run with the admin's rights."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from .commands import CommandContext, CommandError, execute
from .config import ConfigError, Settings, load_settings
from .db import DatabaseError, database_file, no_room, open_db
from .mounts import store_dirs, unmounted_paths

F = TypeVar("F", bound=Callable[..., Any])


class _Utf8Text(click.ParamType[str]):
    """A name or an id typed on the command line. A terminal whose locale is not UTF-8 sends
    "Jos\\xe9"; Python hands the byte over as a lone surrogate, which SQLite cannot store."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            self.fail(
                f"{value!r} is not valid UTF-8 text (is the terminal's locale UTF-8?)", param, ctx
            )
        return str(value)


TEXT = _Utf8Text()


def config_option(func: F) -> F:
    """Every command takes --config."""
    return click.option(
        "--config",
        "config_path",
        # Checked by load_settings, not click: a usage error (exit 2) would be restarted by
        # the unit for ever, and its wording names no user.
        type=click.Path(path_type=Path, readable=False),
        default=None,
        help="Config file (default: $MERAUDIOD_CONFIG, then /etc/meraudiod/config.toml).",
    )(func)


def json_option(func: F) -> F:
    """Every listing takes --json."""
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)


def verbose_option(func: F) -> F:
    """-v: log more on stderr (the interactive commands log only warnings by default)."""
    return click.option(
        "-v",
        "--verbose",
        "verbosity",
        count=True,
        help="Log more on stderr: -v progress (INFO), -vv everything (DEBUG).",
    )(func)


def settings_from(config_path: Path | None, verbosity: int = 0, daemon: bool = False) -> Settings:
    """The configuration, or a clear error; logging set up for this command.

    The daemon logs at `logging.level`; a command a person types logs only warnings unless
    given -v, so that its own output is not buried in progress lines."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    level = settings.logging.level if daemon else "WARNING"
    if verbosity >= 2:
        level = "DEBUG"
    elif verbosity == 1 and logging.getLevelName(level) > logging.INFO:
        level = "INFO"
    setup_logging(level, settings.logging.format)
    return settings


def setup_logging(level: str, style: str = "text") -> None:
    """Log to stderr (no timestamps under journald, which adds its own); `json` writes one
    object per line. A line logged while an HTTP request is handled names the request."""
    handler = logging.StreamHandler(sys.stderr)
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # journald stamps lines itself; elsewhere a timestamp helps.
        fmt = "%(levelname)s %(name)s: %(message)s"
        if not os.environ.get("JOURNAL_STREAM"):
            fmt = "%(asctime)s " + fmt
        handler.setFormatter(TextFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("faster_whisper").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def refuse_unmounted(paths: Mapping[str, Path]) -> None:
    """One line, exit 1, when the disk of one of `paths` (what the command reads or writes,
    by key) is not mounted: nothing is ever written beneath a mount point, nor read from it."""
    problem = unmounted_paths(paths)
    if problem:
        raise click.ClickException(problem)


def open_store(settings: Settings, create: bool = False) -> sqlite3.Connection:
    """The database, migrated. Only commands that record (`analyze`, `speakers enroll`) create
    it: for the others a missing database is a mistyped data directory, not an empty one.
    The others open it on a disk full to the last byte too (see open_db): `status` says so,
    `purge` and `delete` free it; one that records could store nothing there anyway."""
    path = settings.storage.db_path
    refuse_unmounted(store_dirs(settings))  # not the models' or the heartbeat's disk
    try:
        missing = not create and not path.is_file()
    except OSError as exc:  # e.g. a data directory this user may not enter: one line
        raise click.ClickException(f"cannot open database {path}: {exc}") from exc
    if missing:
        raise click.ClickException(
            f"no database at {path}: check storage.data_dir (--config, MERAUDIOD_CONFIG or"
            " MERAUDIOD_STORAGE__DATA_DIR), or the daemon has not run yet"
        )
    try:
        return open_db(path, alone_when_full=not create)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc


class TextFormatter(logging.Formatter):
    """The plain format, with `[request <id>]` on lines logged while a request is handled."""

    def format(self, record: logging.LogRecord) -> str:
        """One line."""
        line = super().format(record)
        request_id = getattr(record, "request_id", "-")
        return line if request_id == "-" else f"{line} [request {request_id}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (when handling a
    request) and the traceback (when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        """One line."""
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def echo_json(data: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(data, ensure_ascii=False, default=str))


def fmt_time(wall_s: float | None) -> str:
    """Local wall-clock time, to the second."""
    if wall_s is None:
        return "-"
    return datetime.fromtimestamp(wall_s).strftime("%Y-%m-%d %H:%M:%S")


def fmt_span(start_s: float, end_s: float) -> str:
    """[start - end] in seconds."""
    return f"[{start_s:7.2f} - {end_s:7.2f}]"


def run_command(settings: Settings, name: str, args: dict[str, Any]) -> Any:
    """Run an entry of the command table, as MQTT does, with the admin's rights."""
    # On the device, by its admin: a command may read any file named.
    conn = open_store(settings)
    context = CommandContext(conn, settings, admin=True, readable_files=None)
    try:
        return execute(context, name, {k: v for k, v in args.items() if v is not None})
    except CommandError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise file_error(exc) from exc
    except sqlite3.Error as exc:
        raise database_error(conn, exc) from exc
    finally:
        conn.close()  # opened alone (a full disk), it would keep the next one out


def file_error(exc: OSError) -> click.ClickException:
    """One line naming the file (e.g. an audio file this user may not delete)."""
    return click.ClickException(f"{exc.filename}: {exc.strerror or exc}")


def database_error(conn: sqlite3.Connection, exc: sqlite3.Error) -> click.ClickException:
    """One line naming the database (e.g. one this user may read but not write), and what to
    do when its disk is full (a purge of recordings without audio frees nothing first)."""
    path = Path(database_file(conn))
    if no_room(exc):
        return click.ClickException(
            f"database {path}: {exc} (its disk is full, and this frees no audio file first):"
            f" make room on the disk of {path.parent}, a few MB, then run this again"
        )
    return click.ClickException(f"database {path}: {exc}")
