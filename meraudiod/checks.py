"""What only a person can fix, found before anything starts: every file the configuration
names is readable by this user, every directory the daemon writes is writable. `config
check`, `mqtt test` and the daemon's start use these; each problem is one line naming the
key or directory, the path and the reason."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .config import ConfigError, Settings
from .mounts import storage_dirs

# A lock another process holds is tried again for a second before a start is refused.
_LOCK_TRIES: Final = 20
_LOCK_TRY_GAP_S: Final = 0.05


class StartError(Exception):
    """Something only a person can fix stops the start; the message says what and where."""


class MayPassError(Exception):
    """Something that may pass by itself (a port in use) stops the start: exit 1, and
    systemd starts the daemon again. The message is the whole story."""


def hold_data_dir(settings: Settings) -> int | None:
    """Lock the data directory for this daemon's life (an flock, which ends with the
    process, however it ends); MayPassError naming the daemon that holds it. Two daemons on
    one directory shared its heartbeat and MQTT client id, and each start removed the other's
    uploads under way. None when the lock file cannot be made (a full disk: the store's own
    start-up says so)."""
    data_dir = settings.storage.data_dir
    return _hold(
        data_dir / "daemon.lock",
        lambda holder: (
            f"another meraudiod (pid {holder}) runs on {data_dir}: stop it first"
            " (systemctl stop meraudiod), or give this one another storage.data_dir"
        ),
    )


def data_dir_holder(settings: Settings) -> int | None:
    """The pid of the process that holds the data directory's lock (hold_data_dir): a
    daemon running there, whether or not it writes its heartbeat (0 when it could not write
    its pid); None when none holds it, or the lock cannot be read. To look it takes the lock,
    shared, for a moment (the kernel's table, /proc/locks, misses a lock on btrfs, on
    overlayfs or from another pid namespace); a daemon starting at that moment tries again
    (_hold)."""
    try:
        fd = os.open(settings.storage.data_dir / "daemon.lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # a shared lock taken goes with it
    return None


def _pid_in(fd: int) -> int:
    """The pid a lock file holds (0: none written, or not yet)."""
    text = os.read(fd, 32).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def hold_run_dir(settings: Settings) -> int | None:
    """Lock storage.run_dir (when set, and not the data directory) for this daemon's life,
    as hold_data_dir: two daemons of two data directories given one run_dir (a copy of the
    installed configuration for a second room) wrote one heartbeat, so `status` named
    whichever wrote last, removed each other's notes of the job in hand (job numbers are
    each database's own), and took back each other's recordings kept over a stop."""
    storage = settings.storage
    run_dir = storage.run_dir
    if run_dir is None or run_dir.resolve() == storage.data_dir.resolve():
        return None
    return _hold(
        run_dir / "daemon.lock",
        lambda holder: (
            f"another meraudiod (pid {holder}) uses storage.run_dir {run_dir}:"
            f" give this one (on {storage.data_dir}) a run_dir of its own"
        ),
    )


def _hold(path: Path, refusal: Callable[[str], str]) -> int | None:
    """An flock on `path`, held until the process ends; MayPassError(refusal(holder's pid))
    when another process holds it for _LOCK_TRIES * _LOCK_TRY_GAP_S (a `status` looking who
    holds it takes it for a moment: a start then refused, as if another daemon ran there);
    None when it cannot be made or locked."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError:
        return None
    for attempt in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt + 1 < _LOCK_TRIES:
                time.sleep(_LOCK_TRY_GAP_S)
                continue
            holder = _pid_in(fd)
            os.close(fd)
            raise MayPassError(refusal(str(holder or "?"))) from None
        except OSError:  # a file system without locks (some NFS, FUSE): run as before
            os.close(fd)
            return None
    with contextlib.suppress(OSError):  # the pid is for the message only
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def user_name() -> str:
    """Who this process runs as (the service runs as `meraudiod`)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def named_files(settings: Settings) -> dict[str, Path]:
    """The files the configuration names, by key."""
    m = settings.mqtt
    files = {
        "mqtt.password_file": m.password_file,
        "mqtt.tls_ca_file": m.tls_ca_file,
        "mqtt.tls_cert_file": m.tls_cert_file,
        "mqtt.tls_key_file": m.tls_key_file,
        "http.token_file": settings.http.token_file,
    }
    return {key: path for key, path in files.items() if path is not None}


def files_in_use(settings: Settings) -> dict[str, Path]:
    """The named files the daemon reads, by key: MQTT's while MQTT is on (the password file
    with a user name), the token file while HTTP is on without http.token."""
    m = settings.mqtt
    used = {
        "mqtt.password_file": m.enabled and m.username is not None,
        "mqtt.tls_ca_file": m.enabled,
        "mqtt.tls_cert_file": m.enabled,
        "mqtt.tls_key_file": m.enabled,
        "http.token_file": settings.http.enabled and not settings.http.token,
    }
    return {key: path for key, path in named_files(settings).items() if used[key]}


def unreadable_files(settings: Settings, prefix: str = "", in_use_only: bool = False) -> list[str]:
    """One line per named file this user cannot read (those starting with `prefix`; only
    those the daemon reads with `in_use_only`)."""
    problems = []
    files = files_in_use(settings) if in_use_only else named_files(settings)
    for key, path in files.items():
        if not key.startswith(prefix):
            continue
        try:
            with path.open("rb") as file:
                file.read(1)
        except OSError as exc:
            problems.append(f"{key}: cannot read {path} as user {user_name()}: {exc.strerror}")
    return problems


def mqtt_file_problems(settings: Settings) -> list[str]:
    """The MQTT files this user cannot read, or TLS files that do not load (not PEM, a key
    that does not match its certificate): what would stop the MQTT thread."""
    problems = unreadable_files(settings, "mqtt.")
    m = settings.mqtt
    if problems or not m.tls:
        return problems
    try:
        context = ssl.create_default_context(cafile=str(m.tls_ca_file) if m.tls_ca_file else None)
        if m.tls_cert_file:
            keyfile = str(m.tls_key_file) if m.tls_key_file else None
            context.load_cert_chain(str(m.tls_cert_file), keyfile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        named = ", ".join(
            f"{key} {path}" for key, path in named_files(settings).items() if "tls" in key
        )
        problems.append(f"cannot load the TLS files ({named}): {exc}")
    return problems


def unwritable_dirs(settings: Settings) -> list[str]:
    """One line per directory the daemon writes that this user cannot create or write."""
    problems: list[str] = []
    failed: list[Path] = []
    for key, path in storage_dirs(settings).items():
        if any(path.is_relative_to(bad) for bad in failed):
            continue  # inside one already reported
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            failed.append(path)
            problems.append(f"{key}: {path} is not writable by user {user_name()}: {exc.strerror}")
    if problems:
        return problems
    db = settings.storage.db_path
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            with path.open("r+b"):
                pass
        except FileNotFoundError:
            # None yet, or gone since it was seen: SQLite makes it in the directory found
            # writable above. A reader of the database makes the log and its index and
            # removes them when it closes, the last one: between an exists() and the open,
            # a sound database was refused (exit 78) while another process read it.
            continue
        except OSError as exc:
            problems.append(
                f"database {path} is not writable by user {user_name()}: {exc.strerror}"
            )
    return problems


def unmakeable_dirs(settings: Settings) -> list[str]:
    """One line per directory the daemon writes that cannot be made at all, whoever runs it:
    a part of its path is not a directory (a data_dir under a file). Judged without making
    anything (`config check`, which an admin runs as themselves: who may write is the
    start's to say, as the service's user)."""
    problems: list[str] = []
    said: set[Path] = set()  # the audio directory inside the data directory: said once
    for key, path in storage_dirs(settings).items():
        there = path
        try:
            while not there.exists() and there != there.parent:
                there = there.parent
            is_dir = there.is_dir()
        except OSError:  # a part of it this user may not look into: the start will say
            continue
        if not is_dir and there not in said:
            said.add(there)
            problems.append(f"{key}: {path} cannot be made: {there} is not a directory")
    return problems


def check_writable(settings: Settings) -> None:
    """StartError naming every directory or database file that cannot be written."""
    problems = unwritable_dirs(settings)
    if problems:
        raise StartError("; ".join(problems))


def reload_file_problems(settings: Settings) -> list[str]:
    """The files in use that the running daemon read at start but a restart could not: a token
    file removed, unreadable or emptied under it (the start would fail), MQTT's files."""
    problems = unreadable_files(settings, in_use_only=True)
    if not problems and settings.http.enabled:
        try:
            settings.http.resolved_token()
        except ConfigError as exc:
            problems.append(str(exc))
    return problems
