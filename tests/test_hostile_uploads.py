"""A client that floods the daemon with uploads, against the room it listens to: the real
daemon with its HTTP stage, real speech on its microphone (stdin) and over HTTP."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from meraudiod.audio import decode_file
from tests.conftest import DEMO, DEMO_TRUTH, TEST_DATA, db_rows, wait_for
from tests.httpd import SPEAKERS_CONFIG, HttpDaemon, daemon_env
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


def _hwm_mb(daemon: HttpDaemon) -> float:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_enrolment_of_a_long_clip_reads_its_first_30_s(
    tmp_path: Path, speaker_models: Path
) -> None:
    # Every clip was decoded whole, and all of them held at once, before any voiceprint was
    # made: a 29-minute clip (within the upload limits) raised the daemon's peak memory by
    # that much audio, and speakers/enroll over MQTT with 20 stored uploads of 30 minutes
    # each would have held 10 hours of it. A voiceprint uses at most 20 s of speech: a clip's
    # first 30 s are read, one clip at a time.
    daemon = HttpDaemon(daemon_env(tmp_path / "enrol", speaker_models), config=SPEAKERS_CONFIG)
    daemon.start()
    try:
        speech = decode_file(TEST_DATA / "ls_2609_0000.flac")
        long = np.tile(speech, 29 * 60 * 16000 // len(speech))

        def wav(samples: np.ndarray) -> bytes:
            out = io.BytesIO()
            soundfile.write(out, samples, 16000, format="WAV", subtype="PCM_16")
            return out.getvalue()

        with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=600) as client:
            # 30 s first: the voiceprint's own peak (its 20 s embedding) is reached
            minute = ("files", ("first.wav", wav(long[: 30 * 16000])))
            enrol = "/api/v1/persistent-speakers/upload"
            warm = client.post(enrol, data={"name": "Warm"}, files=[minute])
            assert warm.status_code == 201, warm.text
            before_mb = _hwm_mb(daemon)
            clip = ("files", ("long.wav", wav(long)))
            response = client.post(enrol, data={"name": "Lena"}, files=[clip])
        assert response.status_code == 201, response.text
        assert _hwm_mb(daemon) - before_mb < 50, (before_mb, _hwm_mb(daemon))
        assert response.json()["sources"][0]["speech_s"] <= 30, response.text
    finally:
        daemon.stop()


def test_a_burst_of_uploads_leaves_threads_for_the_other_routes(
    tmp_path: Path, models_dir: Path
) -> None:
    # Every route that is not async (readiness, status, the listening switch, tasks) runs on
    # one pool of 40 threads, and each upload being decoded and stored held one: a burst of
    # 45 uploads of 20 minutes left none, and /health/ready took 10 s to answer. Now a few
    # are decoded at once and the others wait their turn without a thread.
    import socket
    import time

    env = daemon_env(tmp_path / "burst", models_dir)
    config = "max_upload_mb = 100\nmax_upload_audio_s = 3600\n[asr]\nenabled = false\n"
    server = HttpDaemon(env, config=config, token=None).start()
    silence = io.BytesIO()  # 20 minutes in 60 KB: quick to send, slow to decode and store
    with soundfile.SoundFile(silence, "w", 16000, 1, "PCM_16", format="FLAC") as out:
        for _ in range(20):
            out.write(np.zeros(16000 * 60, dtype=np.int16))
    body = (
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="f.flac"\r\n\r\n'
        + silence.getvalue()
        + b"\r\n--b0--\r\n"
    )
    head = (
        "POST /api/v1/analysis/upload HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: multipart/form-data; boundary=b0\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sockets = []
    try:
        for _ in range(45):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
            sock.sendall(head + body)  # the whole body is taken (the event loop reads it)
            sockets.append(sock)
        received = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "uploads"
        wait_for(
            lambda: (
                sum(p.stat().st_size for p in received.glob("*.part"))
                >= 40 * len(silence.getvalue())
            ),
            60,
            "the uploads received",
        )
        heads = [b""] * len(sockets)
        for i, sock in enumerate(sockets):
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                heads[i] = sock.recv(12)
            sock.setblocking(True)
        answered = sum(map(bool, heads))
        assert answered < 20, f"{answered} of 45 uploads were stored already: make them longer"
        waits = []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for _ in range(3):
                t0 = time.monotonic()
                assert client.get("/health/ready").status_code == 200
                waits.append(time.monotonic() - t0)
        assert max(waits) < 2, waits  # 15 s before
        for sock, start in zip(sockets, heads, strict=True):
            assert start + sock.recv(12 - len(start)) == b"HTTP/1.1 202"
    finally:
        for sock in sockets:
            sock.close()
        assert server.stop() == 0, server.log()
