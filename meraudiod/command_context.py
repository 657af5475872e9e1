"""What every command of the table is built from: where it runs (`CommandContext`, with the
running daemon's `Runtime`), its argument schema's base (`Args`) and its table entry
(`Command`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from .config import Settings
from .messages import Event

# Where a request came from: what an error tells its sender to do is said in that surface's
# words (its own endpoint or topic, not another's command).
Surface = Literal["cli", "mqtt", "http"]


class Runtime(Protocol):
    """What a running daemon lets commands change."""

    def set_listening(self, on: bool) -> None:
        """Open or close the microphone."""

    def speaker_stage(self) -> Any:
        """The loaded speaker models (a SpeakerStage), or None."""

    def published(self, event: Event) -> None:
        """A command queued an event in the outbox: deliver it now, and to the live sockets."""

    def snapshot(self) -> dict[str, Any]:
        """What the daemon says about itself now, as in its heartbeat file."""


@dataclass
class CommandContext:
    """Where a command runs: its database connection, settings, and who asks."""

    conn: sqlite3.Connection
    settings: Settings
    admin: bool = True
    runtime: Runtime | None = None
    # Over MQTT a request must be cheap: `status` then reads counters, never the disk tree.
    remote: bool = False
    # Files a command may read (enrolment clips), each with the name to call it by. None:
    # any path (the CLI, run on the device by its admin). A remote surface gives only the
    # files it received itself (an HTTP upload's clips, by the client's names for them), so
    # no client can make the daemon read a path of its choosing.
    readable_files: Mapping[str, str] | None = field(default_factory=dict)
    surface: Surface = "cli"


class Args(BaseModel):
    """Base of command arguments: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not a number


class NoArgs(Args):
    """A command without arguments."""


@dataclass(frozen=True)
class Command:
    """One entry of the table."""

    handler: Callable[[CommandContext, Any], Any]
    args: type[Args] = NoArgs
    admin: bool = False
    help: str = ""
