"""Standard-library features newer than the oldest Python meraudiod supports (3.10).

JetPack 6 ships Python 3.10 (no `tomllib`), and Debian bookworm / Raspberry Pi OS ship
3.11.2, whose `tarfile` has no extraction filters (they came in 3.11.4 and 3.10.12).
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as the package it started as
    import tomli as tomllib

__all__ = ["UnsafeArchiveError", "safe_extract", "tomllib"]


class UnsafeArchiveError(Exception):
    """An archive member would land outside the target folder, or is not a plain file/folder."""


def _checked_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """Every member, refused unless it is a file or folder whose path stays inside dest."""
    root = dest.resolve()
    members = tar.getmembers()
    for member in members:
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"{member.name}: not a regular file or folder")
        if member.name.startswith("/") or not target.is_relative_to(root):
            raise UnsafeArchiveError(f"{member.name}: outside the extraction folder")
    return members


def safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract only plain files and folders inside dest, on every supported Python.

    Checks every member first (so nothing is written from an archive that fails), then uses
    the "data" filter where this Python has it and plain extraction with modes masked where not.
    """
    members = _checked_members(tar, dest)
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
        return
    for member in members:  # what the "data" filter also does: no set-id bits, no owner
        member.mode &= 0o755
        member.uid = member.gid = 0
        member.uname = member.gname = ""
    tar.extractall(dest, members=members)  # every member was checked above
