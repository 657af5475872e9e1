"""What a path a person gave turns out to be, said in their words (standard library only:
the configuration, the sources and the enrolment all name paths the same way)."""

from __future__ import annotations

import errno
from pathlib import Path


class NoHomeError(ValueError):
    """A path starting with ~name of no user (pathlib raised RuntimeError: a traceback)."""


def expand_home(given: str | Path) -> Path:
    """`given` with a leading ~ or ~name expanded; NoHomeError names the user it found none
    for."""
    try:
        return Path(given).expanduser()
    except RuntimeError:
        user = str(given)[1:].split("/")[0]
        raise NoHomeError(f"no home directory for ~{user}") from None


def link_loop(path: Path) -> str | None:
    """Why `path` cannot be opened if it is a symbolic link loop, or lies under one (is_file()
    and exists() say False for ELOOP, as for no file at all); None otherwise."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            where = "a" if path.is_symlink() else "under a"
            return f"is {where} symbolic link loop"
    return None
