"""A storage directory (or a file the configuration names) under a mount point that
/etc/fstab lists but nothing is mounted on.

Writing there would go to the filesystem beneath (the SD card) and vanish from view once
the disk is mounted over it; a password read from there is none, or a stale copy. The
daemon waits a while for the mount (a device that boots before its USB disk); a command
refuses at once.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from .config import Settings

_LOGGER = logging.getLogger(__name__)
FSTAB: Final = Path("/etc/fstab")
MOUNTINFO: Final = Path("/proc/self/mountinfo")
WAIT_S: Final = 60.0  # the daemon's wait for a missing mount (under TimeoutStartSec=180)
_POLL_S: Final = 0.5
_OCTAL: Final = re.compile(r"\\([0-7]{3})")


class NotMounted(Exception):
    """A storage directory's (or a named file's) disk is not mounted; the message names the
    key and the mount."""


def _unescape(field: str) -> str:
    """fstab and mountinfo write a space in a path as \\040 (and tab, newline, backslash)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def listed_mount_points(fstab: Path = FSTAB) -> list[Path]:
    """The mount points /etc/fstab lists (swap and non-path entries left out); none when it
    cannot be read."""
    try:
        text = fstab.read_text(errors="replace")
    except OSError:
        return []
    points = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#") or fields[2] == "swap":
            continue
        point = _unescape(fields[1])
        if point.startswith("/") and point != "/":
            points.append(Path(point))
    return points


def mounted_points(mountinfo: Path = MOUNTINFO) -> set[Path]:
    """Where something is mounted now (an automount's autofs counts: using it mounts it)."""
    try:
        lines = mountinfo.read_text(errors="replace").splitlines()
    except OSError:
        return set()
    return {Path(_unescape(line.split()[4])) for line in lines if len(line.split()) > 4}


def _real(path: Path) -> Path:
    """The path with symlinks followed; as it is when they loop (nothing can be there)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: Python 3.11's symlink loop
        return path.absolute()


class MountTable:
    """fstab's mount points and what is mounted, read once for the paths looked up."""

    def __init__(self, fstab: Path = FSTAB, mountinfo: Path = MOUNTINFO) -> None:
        self.mounted = mounted_points(mountinfo)
        # A mounted point is as mountinfo names it, symlinks followed already; it is not
        # looked at (a hung network mount would hang every command).
        self.targets = {p: p if p in self.mounted else _real(p) for p in listed_mount_points(fstab)}

    def missing(self, path: Path) -> Path | None:
        """The mount point that should hold `path` but has nothing mounted on it: the
        deepest one fstab lists above it (symlinks followed, the listed point's too: the
        kernel mounts on, and mountinfo names, its target), when that is not mounted. Named
        as listed."""
        real = _real(path)
        holders = [p for p, target in self.targets.items() if real.is_relative_to(target)]
        if not holders:
            return None
        deepest = max(holders, key=lambda p: len(self.targets[p].parts))
        return None if self.targets[deepest] in self.mounted else deepest


def missing_mount(path: Path, fstab: Path = FSTAB, mountinfo: Path = MOUNTINFO) -> Path | None:
    """MountTable(fstab, mountinfo).missing(path): for one path."""
    return MountTable(fstab, mountinfo).missing(path)


def store_dirs(settings: Settings) -> dict[str, Path]:
    """The database's and the audio's directories, by the key that sets them: what a
    command on the stored recordings reads and writes (a delete removes audio files)."""
    storage = settings.storage
    return {
        "storage.data_dir": storage.data_dir,
        "storage.tmp_audio_dir" if storage.tmp_audio_dir else "audio directory": storage.audio_dir,
    }


def storage_dirs(settings: Settings) -> dict[str, Path]:
    """The directories the daemon writes, by the key that sets them: the store's and the
    heartbeat's."""
    dirs = store_dirs(settings)
    if settings.storage.run_dir is not None:
        dirs["storage.run_dir"] = settings.storage.run_dir
    return dirs


def models_dir(settings: Settings) -> dict[str, Path]:
    """The models' directory (read by the daemon, written by `models install`), by its key."""
    return {"storage.models_dir": settings.storage.resolved_models_dir}


def unmounted_paths(
    paths: Mapping[str, Path], fstab: Path = FSTAB, mountinfo: Path = MOUNTINFO
) -> str | None:
    """One line naming each of `paths` (a directory or a file, by the key that sets it)
    whose disk is not mounted (None: all are)."""
    problems = []
    said: set[Path] = set()  # the audio directory inside the data directory: said once
    table = MountTable(fstab, mountinfo)  # each file read once for all the paths
    for key, path in paths.items():
        point = table.missing(path)
        if point is not None and point not in said:
            said.add(point)
            problems.append(
                f"{key}: {path} is on {point}, which {fstab} lists but nothing is mounted on"
            )
    return "; ".join(problems) or None


def wait_for_mounts(
    paths: Mapping[str, Path],
    stop: threading.Event,
    say: Callable[[str], None],
    wait_s: float = WAIT_S,
    fstab: Path = FSTAB,
    mountinfo: Path = MOUNTINFO,
) -> bool:
    """Wait up to wait_s for the disks of `paths` (the storage directories, the files the
    daemon reads) to be mounted, saying once what is waited for. True when all are; False
    when stopped first; NotMounted after wait_s."""
    problem = unmounted_paths(paths, fstab, mountinfo)
    if problem is None:
        return True
    say(f"waiting up to {wait_s:.0f} s for the mount: {problem}")
    deadline = time.monotonic() + wait_s
    while problem is not None:
        if stop.wait(_POLL_S):
            return False
        if time.monotonic() >= deadline:
            raise NotMounted(f"{problem} (waited {wait_s:.0f} s; mount it and start again)")
        problem = unmounted_paths(paths, fstab, mountinfo)
    _LOGGER.info("mounted: what the daemon needs is on its disks now")
    return True
