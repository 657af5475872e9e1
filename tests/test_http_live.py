"""The live sockets for real: speech streamed to /ws/audio comes back as events and
transcripts, /ws/events sees them, the number of streams is bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meraudiod.audio import decode_file
from tests.conftest import DEMO
from tests.httpd import (
    SPEAKERS_CONFIG,
    TOKEN,
    HttpDaemon,
    daemon_env,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[HttpDaemon]:
    """One daemon for the module, with a token."""
    env = daemon_env(tmp_path_factory.mktemp("httpd"), models_dir)
    server = HttpDaemon(env, config="body_timeout_s = 5\n").start()
    yield server
    assert server.stop() == 0, server.log()


def test_ws_audio_returns_transcripts_of_streamed_speech_and_ws_events_sees_them(
    daemon: HttpDaemon,
) -> None:
    import websockets

    samples = decode_file(DEMO)[: 16000 * 14]  # the first two utterances
    ws_url = daemon.url.replace("http://", "ws://")

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with websockets.connect(f"{ws_url}/ws/events", additional_headers=headers) as feed:
            async with websockets.connect(
                f"{ws_url}/ws/audio", additional_headers=headers
            ) as audio:
                for start in range(0, samples.size, 1600):  # 100 ms messages
                    await audio.send(samples[start : start + 1600].astype("<i2").tobytes())
                await audio.send("end")
                got = []
                while True:
                    message = json.loads(await asyncio.wait_for(audio.recv(), 300))
                    got.append(message)
                    if message.get("type") == "done":
                        break
            seen = []
            while not any(e.get("event_type") == "transcript" for e in seen):
                seen.append(json.loads(await asyncio.wait_for(feed.recv(), 60)))
        return got, seen

    got, seen = asyncio.run(run())
    speech = [e["type"] for e in got if e.get("topic") == "event/speech"]
    assert speech[:2] == ["start", "end"] and speech.count("end") == 2, got
    transcripts = [e for e in got if e.get("event_type") == "transcript"]
    assert len(transcripts) == 2, got
    assert "Dashwood" in transcripts[0]["text"]
    assert got[-1]["recording_ids"] == [t["recording_id"] for t in transcripts]
    assert all(e["source"].startswith("ws:") for e in got[:-1])
    assert transcripts[0]["recording_id"] in [e.get("recording_id") for e in seen]


def first_utterance_at_8k() -> bytes:
    """The demo's first utterance as 16-bit samples at 8 kHz."""
    from scipy.signal import resample_poly

    first = decode_file(DEMO)[: 16000 * 9].astype(np.float32)
    return np.clip(resample_poly(first, 1, 2), -32768, 32767).astype("<i2").tobytes()


def heard_at_8k(daemon: HttpDaemon, messages: list[bytes]) -> str:
    """The transcript of a /ws/audio stream at a declared 8 kHz sent as `messages`."""
    import websockets

    ws_url = daemon.url.replace("http://", "ws://")

    async def run() -> list[dict[str, Any]]:
        async with websockets.connect(
            f"{ws_url}/ws/audio?rate_hz=8000",
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
        ) as audio:
            for message in messages:
                await audio.send(message)
            await audio.send("end")
            got = []
            while not got or got[-1].get("type") != "done":
                got.append(json.loads(await asyncio.wait_for(audio.recv(), 300)))
            return got

    (transcript,) = [e for e in asyncio.run(run()) if e.get("event_type") == "transcript"]
    return str(transcript["text"])


def test_ws_audio_at_a_declared_rate_and_sockets_without_the_token(daemon: HttpDaemon) -> None:
    import websockets

    at_8k = first_utterance_at_8k()
    messages = [at_8k[start : start + 1600] for start in range(0, len(at_8k), 1600)]
    assert "Dashwood" in heard_at_8k(daemon, messages)
    ws_url = daemon.url.replace("http://", "ws://")

    async def refused(path: str, token: str) -> int:
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with websockets.connect(
                f"{ws_url}{path}", additional_headers={"Authorization": f"Bearer {token}"}
            ):
                pass
        return int(info.value.response.status_code)

    assert asyncio.run(refused("/ws/audio", "wrong")) == 403
    assert asyncio.run(refused("/ws/events", "")) == 403


def test_messages_cut_anywhere_at_a_declared_rate_are_heard(daemon: HttpDaemon) -> None:
    # A client streaming bytes as they come (a pipe, a socket) cuts messages anywhere. At a
    # declared rate each message was resampled alone: one byte (no whole sample) made the
    # resampler fail (a traceback, the socket dropped with no close frame), and a sample cut
    # between two messages lost its first byte, every later sample read byte-shifted (noise).
    at_8k = first_utterance_at_8k()
    messages = [at_8k[:1], *(at_8k[start : start + 1601] for start in range(1, len(at_8k), 1601))]
    assert "Dashwood" in heard_at_8k(daemon, messages)
    assert "Traceback" not in daemon.log()


def test_a_rate_the_stream_cannot_have_is_named(daemon: HttpDaemon) -> None:
    import websockets

    ws_url = daemon.url.replace("http://", "ws://") + "/ws/audio"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def closed(query: str) -> tuple[int, str]:
        async with websockets.connect(ws_url + query, additional_headers=headers) as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 60)
        assert info.value.rcvd is not None
        return info.value.rcvd.code, info.value.rcvd.reason

    # was "cannot stream here", the words for a daemon without a pipeline; a rate that is no
    # whole number was refused before the handshake with a bare 403, read as a wrong token
    for query in (
        "?rate_hz=1000000",
        "?rate_hz=44",
        "?rate_hz=abc",
        "?rate_hz=16000.5",
        "?rate_hz=%C2%B2",
        "?rate_hz=" + "9" * 5000,
    ):
        code, reason = asyncio.run(closed(query))
        assert code == 1003 and "rate_hz" in reason and "8000" in reason, (query, reason)


async def one_over_the_limit(
    ws_url: str, limit: int, meanwhile: Callable[[], None] | None = None
) -> int:
    """The close code of one WebSocket more than `limit` open at once (`meanwhile` runs
    while they are)."""
    import websockets

    headers = {"Authorization": f"Bearer {TOKEN}"}
    open_ones = [await websockets.connect(ws_url, additional_headers=headers) for _ in range(limit)]
    try:
        async with websockets.connect(ws_url, additional_headers=headers) as extra:
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                await asyncio.wait_for(extra.recv(), 60)
        assert info.value.rcvd is not None
        if meanwhile is not None:
            meanwhile()
        return int(info.value.rcvd.code)
    finally:
        for ws in open_ones:
            await ws.close()


def test_live_audio_streams_are_limited(daemon: HttpDaemon) -> None:
    import websockets

    from meraudiod.http.live import MAX_LIVE_STREAMS

    ws_url = daemon.url.replace("http://", "ws://") + "/ws/audio"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert asyncio.run(one_over_the_limit(ws_url, MAX_LIVE_STREAMS)) == 1013
    with daemon.client() as client:  # the closed streams gave their slots back
        assert client.get("/health/ready").status_code == 200

    async def again() -> dict[str, Any]:
        deadline = time.monotonic() + 60  # the closed streams' handlers end, then free a slot
        while True:
            try:
                async with websockets.connect(ws_url, additional_headers=headers) as ws:
                    await ws.send("end")
                    return dict(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            except websockets.exceptions.ConnectionClosed as exc:
                if exc.rcvd is None or exc.rcvd.code != 1013 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    assert asyncio.run(again()) == {"type": "done", "recording_ids": []}


def test_a_text_message_that_is_not_utf8_is_refused_in_one_line(daemon: HttpDaemon) -> None:
    # A WebSocket text frame must be UTF-8; one that is not was closed with 1007 as it should,
    # but uvicorn logged a traceback for it (logger.exception) in the daemon's log.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws/events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
            f"\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13"
            f"\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        mask = os.urandom(4)
        text = bytes(c ^ mask[i % 4] for i, c in enumerate(b"\xff\xfe"))
        sock.sendall(bytes([0x81, 0x80 | len(text)]) + mask + text)  # FIN, text, masked
        closing = sock.recv(4096)
    assert closing[:1] == b"\x88" and closing[2:4] == (1007).to_bytes(2, "big"), closing
    deadline = time.monotonic() + 10
    while "Invalid UTF-8" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = daemon.log().splitlines()
    said = [i for i, line in enumerate(lines) if "Invalid UTF-8" in line]
    assert said, "the refusal is logged"
    after = lines[said[-1] + 1 : said[-1] + 2]
    assert not [line for line in after if line.startswith("Traceback")], after


def _rss_kb(daemon: HttpDaemon) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_audio_sent_faster_than_it_is_heard_is_not_held_in_memory(daemon: HttpDaemon) -> None:
    # /ws/audio buffered 256 messages between the socket and the listener, of any size up to
    # uvicorn's 16 MiB: a client sending faster than the VAD hears had the daemon hold up to
    # 4 GiB a stream (+760 MB in 48 s from one client of 16 MiB messages). A message is now
    # at most 1 MiB (over it: 1009) and what waits is held to a few MiB.
    import websockets

    from meraudiod.http.live import MAX_MESSAGE_BYTES

    ws_url = daemon.url.replace("http://", "ws://") + "/ws/audio"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    noise = np.random.default_rng(0).integers(-3000, 3000, MAX_MESSAGE_BYTES // 2, "<i2")

    async def flood() -> tuple[int, int]:
        async with websockets.connect(ws_url, additional_headers=headers, max_size=None) as ws:
            await ws.send(noise[:16000].tobytes())  # the stream's listener is made
            await asyncio.sleep(2)
            before = _rss_kb(daemon)
            deadline = time.monotonic() + 10
            sent = 0
            with contextlib.suppress(TimeoutError):
                while time.monotonic() < deadline:
                    await asyncio.wait_for(ws.send(noise.tobytes()), deadline - time.monotonic())
                    sent += 1
            grown = _rss_kb(daemon) - before
        return grown, sent

    grown_kb, sent = asyncio.run(flood())
    assert grown_kb < 40 << 10, (grown_kb, sent)  # it grew by 61 MB in 8 s, 13 MB now

    async def oversized() -> int:
        async with websockets.connect(ws_url, additional_headers=headers, max_size=None) as ws:
            await ws.send(b"\0" * (MAX_MESSAGE_BYTES + 2))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 30)
        assert info.value.rcvd is not None
        return int(info.value.rcvd.code)

    assert asyncio.run(oversized()) == 1009  # message too big
    with daemon.client() as client:
        assert client.get("/health/ready").status_code == 200

    async def whole_mib_compressed() -> dict[str, Any]:
        # The limit held the frame as sent: with permessage-deflate (websockets' default,
        # and browsers'), 1 MiB that compresses badly is a frame of a little more, and a
        # message within the limit was closed with 1009.
        loud = np.random.default_rng(1).integers(-32768, 32767, MAX_MESSAGE_BYTES // 2, "<i2")
        async with websockets.connect(ws_url, additional_headers=headers, max_size=None) as ws:
            await ws.send(loud.tobytes())
            await ws.send("end")
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 120))
                if message.get("type") == "done":
                    return dict(message)

    assert asyncio.run(whole_mib_compressed())["type"] == "done"


def test_a_stream_that_sends_nothing_gives_its_slot_back(daemon: HttpDaemon) -> None:
    # A /ws/audio client that sent nothing held one of the four streams (a listener, a VAD)
    # as long as it answered pings: four such clients and no one could stream. A stream's
    # next message must come within http.body_timeout_s (5 s here), as a request's body.
    import websockets

    ws_url = daemon.url.replace("http://", "ws://") + "/ws/audio"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def idle() -> tuple[int, str, float]:
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            await ws.send(b"\0" * 3200)  # a message, then nothing
            t0 = time.monotonic()
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
        assert info.value.rcvd is not None
        return info.value.rcvd.code, info.value.rcvd.reason, time.monotonic() - t0

    code, reason, after_s = asyncio.run(idle())
    assert code == 1008 and "http.body_timeout_s" in reason, (code, reason)
    assert 4.5 < after_s < 12, after_s


def test_event_sockets_are_limited_and_leave_connections_for_requests(
    daemon: HttpDaemon,
) -> None:
    # Only a WebSocket holds a connection for long (a request is done in seconds, an idle
    # connection closed after 5), and /ws/events had no limit: 64 of them, the connection
    # limit, and every other request, /health too, got 503.
    import httpx

    from meraudiod.http.live import MAX_EVENT_SOCKETS

    ws_url = daemon.url.replace("http://", "ws://") + "/ws/events"

    def health() -> None:  # the open sockets leave connections for requests
        assert httpx.get(f"{daemon.url}/health").status_code == 200

    assert MAX_EVENT_SOCKETS < 64
    assert asyncio.run(one_over_the_limit(ws_url, MAX_EVENT_SOCKETS, health)) == 1013


def test_recordings_of_a_live_socket_the_locked_database_did_not_take_are_counted(
    tmp_path: Path, models_dir: Path
) -> None:
    """Another process holds the database's write lock while someone speaks into /ws/audio:
    the utterance waits in memory, and `status` and /metrics count it as they count the
    microphone's (they counted only the microphone's: 0). Once the lock goes, it is saved and
    transcribed, and the count is 0 again."""
    import sqlite3

    import websockets

    env = daemon_env(tmp_path, models_dir)
    server = HttpDaemon(env).start()
    samples = decode_file(DEMO)[: 16000 * 14]  # the first two utterances
    ws_url = server.url.replace("http://", "ws://")
    holder = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")

    def unsaved() -> tuple[int, int]:
        metrics = server.client().get("/metrics").text
        line = [x for x in metrics.splitlines() if x.startswith("meraudiod_unsaved_recordings ")]
        said = server.client().get("/api/v1/status").json()["unsaved"]["recordings"]
        return round(float(line[0].split()[1])), int(said)

    async def run() -> tuple[tuple[int, int], list[dict[str, Any]]]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with websockets.connect(f"{ws_url}/ws/audio", additional_headers=headers) as audio:
            holder.execute("BEGIN IMMEDIATE")
            for start in range(0, samples.size, 1600):
                await audio.send(samples[start : start + 1600].astype("<i2").tobytes())
            deadline = time.monotonic() + 60
            while (counted := await asyncio.to_thread(unsaved)) != (2, 2):
                assert time.monotonic() < deadline, counted
                await asyncio.sleep(0.5)
            holder.rollback()
            await audio.send("end")
            got = []
            while not got or got[-1].get("type") != "done":
                got.append(json.loads(await asyncio.wait_for(audio.recv(), 300)))
        return counted, got

    try:
        counted, got = asyncio.run(run())
        deadline = time.monotonic() + 30
        while unsaved() != (0, 0):
            assert time.monotonic() < deadline, unsaved()
            time.sleep(0.5)
    finally:
        holder.close()
        assert server.stop() == 0, server.log()
    transcripts = [e for e in got if e.get("event_type") == "transcript"]
    assert counted == (2, 2) and len(transcripts) == 2, got
    assert "Dashwood" in transcripts[0]["text"]


def test_no_live_stream_is_recorded_while_listening_is_off(daemon: HttpDaemon) -> None:
    # The listening switch closed the microphone, but /ws/audio went on recording: a remote
    # microphone, recorded while the owner had switched listening off.
    import websockets

    ws_url = daemon.url.replace("http://", "ws://") + "/ws/audio"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    first = decode_file(DEMO)[: 16000 * 9].astype("<i2").tobytes()  # one utterance
    second = decode_file(DEMO)[16000 * 9 : 16000 * 14].astype("<i2").tobytes()

    def stored() -> list[str]:
        with daemon.client() as client:
            got = client.get("/api/v1/recordings", params={"limit": 1000}).json()
            return [r["id"] for r in got["recordings"]]

    async def refused() -> tuple[int, str]:
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                await ws.send(first)
                await asyncio.wait_for(ws.recv(), 60)
        assert info.value.rcvd is not None
        return info.value.rcvd.code, info.value.rcvd.reason

    async def switched_off_midway() -> tuple[int, str]:
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            for start in range(0, len(first), 3200):
                await ws.send(first[start : start + 3200])
            with daemon.client() as client:
                assert client.post("/api/v1/vad/stop").json() == {"listening": False}
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                for start in range(0, len(second), 3200):
                    await ws.send(second[start : start + 3200])
                    await asyncio.sleep(0.01)
                while True:
                    await asyncio.wait_for(ws.recv(), 60)
        assert info.value.rcvd is not None
        return info.value.rcvd.code, info.value.rcvd.reason

    before = stored()
    try:
        with daemon.client() as client:
            assert client.post("/api/v1/vad/stop").json() == {"listening": False}
        code, reason = asyncio.run(refused())
        assert code == 4409 and "listening is off" in reason, reason
        assert stored() == before
        with daemon.client() as client:
            assert client.post("/api/v1/vad/start").json() == {"listening": True}
        code, reason = asyncio.run(switched_off_midway())
        assert code == 4409 and "listening was switched off" in reason, reason
        deadline = time.monotonic() + 60
        while len(stored()) == len(before) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        new = [r for r in stored() if r not in before]
        assert len(new) == 1, new  # what was said before the switch, and nothing after
        with daemon.client() as client:
            recording = client.get(f"/api/v1/recordings/{new[0]}").json()
        assert recording["duration_s"] < 9.5, recording
    finally:
        with daemon.client() as client:
            client.post("/api/v1/vad/start")


def test_a_long_upload_deleted_while_it_is_transcribed_is_given_up(
    daemon: HttpDaemon, tmp_path: Path
) -> None:
    # Deleted while transcribed, a ten-minute upload was transcribed to its end (minutes of
    # CPU on a Pi, every recording of the room waiting behind it) and then thrown away.
    import soundfile

    from tests.httpd import wait_task

    demo = decode_file(DEMO)
    long = np.tile(demo, 600 * 16000 // demo.size + 1)[: 600 * 16000]
    path = tmp_path / "meeting.flac"
    soundfile.write(path, long, 16000)
    with daemon.client() as client:
        response = client.post(
            "/api/v1/vad/upload_recording", files={"file": (path.name, path.read_bytes())}
        )
        rec_id = str(response.json()["recording_id"])
        assert wait_task(client, rec_id, "running")["status"] == "running"
        time.sleep(1)
        assert client.delete(f"/api/v1/recordings/{rec_id}").status_code == 200
    said = f"recording {rec_id} deleted while it was transcribed: given up"
    deadline = time.monotonic() + 60
    while said not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    (line,) = [x for x in daemon.log().splitlines() if said in x]
    given_up_s = float(line.split("given up ")[1].split(" s into")[0])
    assert given_up_s < 590, line  # not transcribed to its end


async def _say_to_the_room(daemon: HttpDaemon) -> list[dict[str, Any]]:
    """The demo's first utterance spoken to the device over /ws/audio: what it answers."""
    import websockets

    spoken = decode_file(DEMO)[: 16000 * 9].astype("<i2").tobytes()
    async with websockets.connect(
        daemon.url.replace("http://", "ws://") + "/ws/audio",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
    ) as audio:
        for start in range(0, len(spoken), 3200):
            await audio.send(spoken[start : start + 3200])
        await audio.send("end")
        got = []
        while not got or got[-1].get("type") != "done":
            got.append(json.loads(await asyncio.wait_for(audio.recv(), 300)))
        return got


def test_a_long_upload_yields_to_the_rooms_speech_and_takes_up_where_it_left_off(
    daemon: HttpDaemon, tmp_path: Path
) -> None:
    # A ten-minute upload being transcribed held a command spoken to the device back for as
    # long as it took: it now gives its job back between Whisper windows when the room's
    # audio waits, and goes on from there.
    import soundfile

    from tests.httpd import wait_task

    demo = decode_file(DEMO)
    times = 600 * 16000 // demo.size + 1
    path = tmp_path / "lecture.flac"
    soundfile.write(path, np.tile(demo, times)[: 600 * 16000], 16000)

    with daemon.client() as client:
        response = client.post(
            "/api/v1/vad/upload_recording", files={"file": (path.name, path.read_bytes())}
        )
        rec_id = str(response.json()["recording_id"])
        assert wait_task(client, rec_id, "running")["status"] == "running"
        got = asyncio.run(_say_to_the_room(daemon))
        assert any(e.get("event_type") == "transcript" for e in got), got
        assert client.get(f"/api/v1/tasks/{rec_id}").json()["status"] != "completed"
        assert wait_task(client, rec_id, "completed", 600)["status"] == "completed"
        recording = client.get(f"/api/v1/recordings/{rec_id}").json()
    assert f"recording {rec_id}) given back: the room's recordings first" in daemon.log()
    # Taken up where it left off, not started again from the beginning.
    (resumed,) = [x for x in daemon.log().splitlines() if f"{rec_id}: transcription taken up" in x]
    assert float(resumed.split("taken up at ")[1].split(" s")[0]) >= 30, resumed
    ends = [(s["start_s"], s["end_s"]) for s in recording["segments"]]
    assert all(a <= b <= c for (a, b), (c, _) in itertools.pairwise(ends)), ends
    assert ends[-1][1] > 590, ends[-1]  # to its end, the times of the whole recording
    # Nothing lost or said twice where it was taken up: each repeat of the demo is there.
    assert abs(recording["text"].count("Dashwood") - times) <= 1, recording["text"]


def test_a_long_uploads_speaker_analysis_yields_to_the_room_and_stops_when_deleted(
    tmp_path: Path, speaker_models: Path
) -> None:
    # With diarization on, a long upload's speaker analysis (more CPU than its transcription)
    # held a command spoken to the device back for as long as it took, and went on to its end
    # after the upload was deleted: it now yields between windows, goes on from there, and a
    # deletion gives it up.
    import soundfile

    from tests.httpd import wait_task

    config = '[logging]\nlevel = "DEBUG"\n[diarization]\nenabled = true\n' + SPEAKERS_CONFIG
    daemon = HttpDaemon(daemon_env(tmp_path / "d", speaker_models), config=config).start()
    try:
        demo = decode_file(DEMO)
        path = tmp_path / "meeting.flac"
        soundfile.write(path, np.tile(demo, 150 * 16000 // demo.size + 1), 16000)  # 2.5 minutes

        def logged(text: str, timeout_s: float = 300) -> str:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                found = [x for x in daemon.log().splitlines() if text in x]
                if found:
                    return found[0]
                time.sleep(0.2)
            raise AssertionError(f"not logged: {text}\n{daemon.log()[-3000:]}")

        with daemon.client() as client:
            response = client.post(
                "/api/v1/vad/upload_recording", files={"file": (path.name, path.read_bytes())}
            )
            rec_id = str(response.json()["recording_id"])
            assert wait_task(client, rec_id, "running")["status"] == "running"
            logged("its speakers next", 600)
            got = asyncio.run(_say_to_the_room(daemon))
            assert any(e.get("event_type") == "transcript" for e in got), got
            given_back = logged(f"recording {rec_id}) given back: the room's recordings first")
            assert "speaker analysis given up" in given_back, given_back
            logged(f"recording {rec_id}: speaker analysis taken up")
            assert "transcription taken up" not in daemon.log()  # its words were kept
            assert client.delete(f"/api/v1/recordings/{rec_id}").status_code == 200
            line = logged(f"recording {rec_id} deleted while its speakers were analysed")
            assert line.endswith(("s (segmentation)", "s (embeddings)")), line  # where it was
            assert client.get(f"/api/v1/tasks/{rec_id}").status_code == 404
    finally:
        assert daemon.stop() == 0, daemon.log()
