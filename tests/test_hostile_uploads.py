"""A client that floods the daemon with uploads, against the room it listens to: the real
daemon with its HTTP stage, real speech on its microphone (stdin) and over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO, DEMO_TRUTH, db_rows, wait_for
from tests.httpd import HttpDaemon, daemon_env
from tests.mqtt_daemon import DEMO_PCM

_UPLOADS = 12


@pytest.fixture
def daemon(tmp_path: Path, models_dir: Path) -> Iterator[HttpDaemon]:
    """A daemon with a token, transcription on (tiny.en), speakers off."""
    server = HttpDaemon(daemon_env(tmp_path / "hostile", models_dir)).start()
    yield server
    server.stop()


def _pending(daemon: HttpDaemon, sources: str) -> int:
    return int(
        db_rows(
            daemon.env,
            "SELECT COUNT(*) FROM jobs j JOIN recordings r ON r.id = j.recording_id"
            f" WHERE j.state IN ('pending', 'running') AND ({sources})",
        )[0][0]
    )


def test_a_flood_of_uploads_does_not_hold_up_the_rooms_transcripts(daemon: HttpDaemon) -> None:
    # Jobs were taken oldest first: the microphone's recordings waited behind every file a
    # client had uploaded (under a flood of 1,400 uploads, the 14 the room recorded meanwhile
    # were all still waiting when it ended), and every automation keyed on a transcript with
    # them. The device's own audio now goes first.
    uploads = "r.source LIKE 'upload:%'"
    with daemon.client() as client:
        for _ in range(_UPLOADS):
            response = client.post(
                "/api/v1/analysis/upload", files={"file": ("meeting.flac", DEMO.read_bytes())}
            )
            assert response.status_code == 202, response.text
    assert daemon.proc is not None and daemon.proc.stdin is not None
    daemon.proc.stdin.write(DEMO_PCM)  # the room speaks (the silence feeder waits its turn)
    daemon.proc.stdin.flush()
    room = "r.source = 'stdin'"
    heard = f"SELECT COUNT(*) FROM recordings r WHERE {room}"
    wait_for(
        lambda: db_rows(daemon.env, heard)[0][0] == len(DEMO_TRUTH) and not _pending(daemon, room),
        600,
        "the room's five utterances recorded and transcribed",
    )
    # Each upload is 36 s of speech; at most the one being transcribed when the room spoke,
    # and those done before, went first.
    assert _pending(daemon, uploads) >= _UPLOADS - 3, _pending(daemon, uploads)
