"""The HTTP stage for real: the daemon as a process serving on a free loopback port, httpx
and websockets clients, real speech, a real restart in the middle of an upload's task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile

from meraudiod.audio import decode_file
from tests.conftest import DEMO, TEST_DATA
from tests.httpd import TOKEN, HttpDaemon, wait_task

SPEAKERS_CONFIG = """
[speakers]
enabled = true
"""


def _env(folder: Path, models_dir: Path) -> dict[str, str]:
    """The environment of a daemon with its own data directory (a module's daemon cannot use
    the function-scoped `env` fixture)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    config.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MERAUDIOD_")}
    return {
        **base,
        "MERAUDIOD_CONFIG": str(config),
        "MERAUDIOD_STORAGE__DATA_DIR": str(folder / "data"),
        "MERAUDIOD_STORAGE__MODELS_DIR": str(models_dir),
    }


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, speaker_models: Path) -> Iterator[HttpDaemon]:
    """One daemon for the module: a token, admin allowed, speakers on, a 5 MB upload limit."""
    env = _env(tmp_path_factory.mktemp("httpd"), speaker_models)
    config = "max_upload_mb = 5\n" + SPEAKERS_CONFIG
    server = HttpDaemon(env, config=config).start()
    yield server
    assert server.stop() == 0, server.log()


def _error(response: httpx.Response, status: int, code: str) -> str:
    """The one error shape; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return str(body["error"]["message"])


def test_upload_is_a_task_that_completes_with_what_analyze_prints(daemon: HttpDaemon) -> None:
    with daemon.client() as client:
        response = client.post(
            "/api/v1/analysis/upload",
            files={"file": ("talk.flac", DEMO.read_bytes())},
            headers={"X-Request-ID": "upload-1"},
        )
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        assert response.json()["status"] == "pending"
        body = wait_task(client, task_id, "completed")
    assert body["status"] == "completed", body
    assert body["progress"] == 1.0
    result = body["result"]
    assert set(result) == {"file", "duration_s", "recordings"}  # analyze --json's object
    assert result["file"] == "talk.flac"
    assert result["duration_s"] == pytest.approx(35.7, abs=0.1)
    (recording,) = result["recordings"]
    assert set(recording) == {"id", "start_s", "end_s", "text", "state", "segments"}
    assert "Dashwood" in recording["text"] and "amiable himself" in recording["text"]
    assert recording["state"] == "done"
    assert len(recording["segments"]) >= 3
    assert {"start_s", "end_s", "text", "suspect", "speaker"} == set(recording["segments"][0])
    # the work the request caused is logged under its id
    assert f"recording {task_id}: 35.73 s from upload:talk.flac" in daemon.log()
    line = next(x for x in daemon.log().splitlines() if f"recording {task_id}:" in x)
    assert line.endswith("[request upload-1]"), line


def test_recordings_search_page_play_and_delete(daemon: HttpDaemon) -> None:
    with daemon.client() as client:
        ids = []
        for clip in ("ls_2609_0000.flac", "ls_3080_0000.flac"):
            response = client.post(
                "/api/v1/vad/upload_recording",
                files={"file": (clip, (TEST_DATA / clip).read_bytes())},
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["recording_id"])
        for rec_id in ids:
            assert wait_task(client, rec_id, "completed")["status"] == "completed"
        first = client.get("/api/v1/recordings", params={"limit": 1}).json()
        assert [r["id"] for r in first["recordings"]] == [ids[1]]  # newest first
        second = client.get(
            "/api/v1/recordings", params={"limit": 1, "cursor": first["next_cursor"]}
        ).json()
        assert [r["id"] for r in second["recordings"]] == [ids[0]]
        words = second["recordings"][0]["text"].split()
        found = client.get("/api/v1/recordings", params={"search": words[-1]}).json()
        assert ids[0] in [r["id"] for r in found["recordings"]]

        details = client.get(f"/api/v1/recordings/{ids[0]}").json()
        assert details["segments"] and "audio_path" not in details
        assert details["audio_url"] == f"/api/v1/recordings/{ids[0]}/audio"
        whole = client.get(details["audio_url"])
        assert whole.status_code == 200 and whole.headers["content-type"] == "audio/flac"
        part = client.get(details["audio_url"], headers={"Range": "bytes=100-199"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole.content)}"
        assert part.content == whole.content[100:200]

        assert client.delete(f"/api/v1/recordings/{ids[0]}").json()["deleted"] == 1
        _error(client.get(f"/api/v1/recordings/{ids[0]}"), 404, "not_found")
        _error(client.get(details["audio_url"]), 404, "not_found")
        _error(client.delete(f"/api/v1/recordings/{ids[0]}"), 404, "not_found")


def test_every_failure_is_one_json_error_with_the_request_id(daemon: HttpDaemon) -> None:
    with daemon.client() as client:
        given = client.get("/api/v1/recordings/nope", headers={"X-Request-ID": "abc-123"})
        assert _error(given, 404, "not_found")
        assert given.headers["x-request-id"] == "abc-123"  # a client's id is kept
        _error(client.get("/api/v1/recordings/..%2F..%2Fetc%2Fpasswd"), 404, "not_found")
        _error(client.get("/api/v1/recordings/..%2F..%2Fetc%2Fpasswd/audio"), 404, "not_found")
        _error(client.get("/api/v1/tasks/..%2Fmeraudiod.db"), 404, "not_found")
        _error(client.get("/no/such/route"), 404, "not_found")
        _error(client.get("/api/v1/recordings", params={"limit": 0}), 422, "invalid_request")
        _error(
            client.post("/api/v1/persistent-speakers", json={"nme": "x"}), 422, "invalid_request"
        )
        message = _error(
            client.post(
                "/api/v1/analysis/upload",
                files={"file": ("speech.wav", b"RIFF not really a wave file" * 100)},
            ),
            415,
            "unsupported_media",
        )
        assert "speech.wav" in message
        _error(
            client.post(
                "/api/v1/persistent-speakers/rename", json={"name": "Nobody", "new_name": "X"}
            ),
            404,
            "not_found",
        )
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.get(f"{daemon.url}/api/v1/recordings", headers=headers)
        _error(response, 401, "unauthorized")
    assert httpx.get(f"{daemon.url}/health").status_code == 200  # liveness needs no token
    with daemon.client() as client:  # the daemon logged the work under the request's id
        client.get(
            "/api/v1/recordings/01M89AY2FTNHNGP6MBNKJA4H0J", headers={"X-Request-ID": "req-77"}
        )
    assert "[request req-77]" in daemon.log()


def _raw_request(port: int, head: str, body_chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request over a plain socket; returns the response and the body bytes sent
    before the server answered or closed."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        response = b""
        for chunk in body_chunks:
            with contextlib.suppress(BlockingIOError):
                response += sock.recv(65536)
            if response:
                break
            try:
                sock.setblocking(True)
                sock.sendall(chunk)
                sock.setblocking(False)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.setblocking(True)
        sock.settimeout(30)
        try:
            while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                response += data
        except (ConnectionResetError, TimeoutError):
            pass
    return response, sent


def test_a_2_gb_upload_is_refused_before_it_is_stored(daemon: HttpDaemon) -> None:
    uploads = Path(daemon.env["MERAUDIOD_STORAGE__DATA_DIR"])
    boundary = "b0undary"
    prefix = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"'
        "\r\nContent-Type: audio/wav\r\n\r\n"
    ).encode()
    two_gb = 2 * 1024**3
    chunk = b"\0" * (1 << 20)

    def body() -> Iterator[bytes]:
        yield prefix
        for _ in range(two_gb // len(chunk)):
            yield chunk

    auth = f"Authorization: Bearer {TOKEN}\r\n"
    declared = (
        f"POST /api/v1/analysis/upload HTTP/1.1\r\nHost: x\r\n{auth}"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {two_gb + len(prefix)}\r\n\r\n"
    )
    response, sent = _raw_request(daemon.port, declared, body())
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"code":"too_large"' in response and b"http.max_upload_mb" in response
    assert sent < 64 << 20  # refused from its declared length, not after reading it

    chunked = (
        f"POST /api/v1/analysis/upload HTTP/1.1\r\nHost: x\r\n{auth}"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    framed = (b"%x\r\n%s\r\n" % (len(c), c) for c in body())
    response, sent = _raw_request(daemon.port, chunked, framed)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 64 << 20  # refused once past the limit
    big = [p for p in uploads.rglob("*") if p.is_file() and p.stat().st_size > 5e6]
    assert not big, big  # nothing near the upload's size was stored


def test_listening_switch_status_metrics_and_docs(daemon: HttpDaemon) -> None:
    with daemon.client() as client:
        assert client.post("/api/v1/vad/stop").json() == {"listening": False}
        status = client.get("/api/v1/status").json()
        assert status["listening"] is False and status["backlog"] >= 0
        assert client.post("/api/v1/vad/start").json() == {"listening": True}
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.text.splitlines()
            if line and not line.startswith("#")
        }
        for name in (
            "meraudiod_frames_total",
            "meraudiod_recordings",
            "meraudiod_backlog_jobs",
            "meraudiod_job_latency_ms",
            "meraudiod_rtf",
            "meraudiod_outbox_depth",
            "meraudiod_dropped_frames_total",
            "meraudiod_failed_jobs",
        ):
            assert name in values, metrics.text
        assert values["meraudiod_recordings"] >= 1
        ready = client.get("/health/ready").json()
        assert ready["status"] == "ready"
        assert {"models", "database", "microphone"} <= set(ready["checks"])
        schema = client.get("/api/openapi.json").json()
        docs = client.get("/api/docs").text
        redoc = client.get("/api/redoc").text
    operations = {(m.upper(), p) for p, item in schema["paths"].items() for m in item}
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for expected in (
        ("GET", "/api/v1/recordings"),
        ("GET", "/api/v1/recordings/{rec_id}/audio"),
        ("POST", "/api/v1/analysis/upload"),
        ("GET", "/api/v1/tasks/{task_id}"),
        ("POST", "/api/v1/persistent-speakers/upload"),
        ("POST", "/api/v1/vad/start"),
        ("GET", "/health/ready"),
    ):
        assert expected in operations
    for page in (docs, redoc):  # served from the device: no other host is named
        assert "/api/static-docs/" in page and "cdn" not in page.lower()
        assert "http://" not in page and "https://" not in page


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


def test_bad_tokens_and_a_token_kept_in_a_cookie(daemon: HttpDaemon) -> None:
    login = httpx.get(f"{daemon.url}/", params={"token": TOKEN})
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.cookies["meraudiod_token"]
    assert "httponly" in login.headers["set-cookie"].lower()
    with httpx.Client(base_url=daemon.url, cookies={"meraudiod_token": cookie}) as browser:
        assert browser.get("/api/v1/recordings").status_code == 200
    assert httpx.get(f"{daemon.url}/", params={"token": "wrong"}).status_code == 401
    with httpx.Client(base_url=daemon.url, cookies={"meraudiod_token": "wrong"}) as browser:
        _error(browser.get("/api/v1/recordings"), 401, "unauthorized")
    for cookie in ('meraudiod_token="unterminated', "meraudiod_token=\u00e9t\u00e9"):
        response = httpx.get(f"{daemon.url}/api/v1/recordings", headers={"Cookie": cookie.encode()})
        _error(response, 401, "unauthorized")
    login = httpx.get(f"{daemon.url}/", params={"token": "\u00e9t\u00e9"})
    assert login.status_code == 401  # a non-ASCII guess is a wrong token, not a crash


def test_off_loopback_without_a_token_refuses_to_start(env: dict[str, str], tmp_path: Path) -> None:
    Path(env["MERAUDIOD_CONFIG"]).write_text('[http]\nenabled = true\nhost = "0.0.0.0"\n')
    result = subprocess.run(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env=env,
        input=b"",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert "http.host 0.0.0.0 is reachable from other machines" in err
    assert "http.token" in err and len(err.strip().splitlines()) == 1, err


def test_a_restart_in_the_middle_of_an_upload_task_loses_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    demo = decode_file(DEMO)
    long_file = tmp_path / "long.wav"
    soundfile.write(long_file, np.concatenate([demo] * 4), 16000)  # 143 s of speech
    server = HttpDaemon(env, token=None).start()
    try:
        with server.client() as client:
            response = client.post(
                "/api/v1/analysis/upload", files={"file": ("long.wav", long_file.read_bytes())}
            )
            task_id = response.json()["task_id"]
            assert wait_task(client, task_id, "running")["status"] == "running"
    finally:
        server.stop(signal.SIGKILL)  # no chance to finish or to clean up
    uploads = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "uploads"
    (uploads / "tmpk1ll3d.part").write_bytes(b"\0" * 1000)  # as if killed while receiving
    server = HttpDaemon(env, token=None).start()
    try:
        with server.client() as client:
            body = wait_task(client, task_id, "completed")
    finally:
        assert server.stop() == 0
    assert body["status"] == "completed", body
    assert body["attempts"] == 2  # the first attempt died with the process
    (recording,) = body["result"]["recordings"]
    assert recording["text"].count("Dashwood") == 4
    assert "requeued 1 jobs" in server.log()
    assert uploads.is_dir() and not any(uploads.iterdir())


def _upload_recording(client: httpx.Client, clip: str) -> str:
    response = client.post(
        "/api/v1/vad/upload_recording", files={"file": (clip, (TEST_DATA / clip).read_bytes())}
    )
    assert response.status_code == 202, response.text
    rec_id = str(response.json()["recording_id"])
    assert wait_task(client, rec_id, "completed")["status"] == "completed"
    return rec_id


def test_speakers_enrol_identify_review_merge_opt_out_and_delete(daemon: HttpDaemon) -> None:
    base = "/api/v1/persistent-speakers"
    with daemon.client() as client:
        clips = ("ls_2609_0000.flac", "ls_2609_0001.flac")
        files = [("files", (n, (TEST_DATA / n).read_bytes())) for n in clips]
        enrolled = client.post(f"{base}/upload", data={"name": "Bob"}, files=files)
        assert enrolled.status_code == 201, enrolled.text
        assert [(s["source"], s["stored"]) for s in enrolled.json()["sources"]] == [
            (clips[0], True),
            (clips[1], True),
        ]
        bad = client.post(
            f"{base}/upload", data={"name": "Eve"}, files=[("files", ("notes.txt", b"hi" * 500))]
        )
        message = _error(bad, 400, "bad_request")
        assert "notes.txt" in message and "uploads" not in message  # no path of ours leaks

        bob_again = _upload_recording(client, "ls_2609_0003.flac")
        segments = client.get(f"/api/v1/recordings/{bob_again}").json()["segments"]
        assert any(s["speaker"] and s["speaker"]["name"] == "Bob" for s in segments), segments

        stranger = _upload_recording(client, "ls_3080_0004.flac")
        unknown = [p["name"] for p in client.get(base).json() if p["provisional"]]
        heard = {n: client.get(f"{base}/{n}/clips").json() for n in unknown}
        (name,) = [n for n, rows in heard.items() if stranger in [r["recording_id"] for r in rows]]
        clip = next(r for r in heard[name] if r["recording_id"] == stranger)
        assert 0 <= clip["start_s"] < clip["end_s"] and clip["text"]
        assert client.get(clip["audio_url"]).status_code == 200

        carol_rec = _upload_recording(client, "ls_3080_0001.flac")
        carol = client.post(base, json={"name": "Carol", "recording_ids": [carol_rec]})
        assert carol.status_code == 201, carol.text
        merged = client.post(f"{base}/merge", json={"source": name, "target": "Carol"}).json()
        assert merged["embeddings_moved"] >= 1
        names = {p["name"]: p for p in client.get(base).json()}
        assert name not in names and not names["Carol"]["provisional"]

        assert client.post(f"{base}/opt-out", json={"name": "Carol"}).json()["opt_out"] is True
        assert {p["name"]: p["opt_out"] for p in client.get(base).json()}["Carol"] is True
        client.post(f"{base}/opt-out", json={"name": "Carol", "opt_out": False})
        assert {p["name"]: p["opt_out"] for p in client.get(base).json()}["Carol"] is False

        deleted = client.delete(f"{base}/Bob", params={"recordings": "true"}).json()
        assert deleted["name"] == "Bob" and deleted["recordings"] >= 1
        _error(client.get(f"/api/v1/recordings/{bob_again}"), 404, "not_found")
        _error(client.delete(f"{base}/Bob"), 404, "not_found")


def test_admin_operations_need_http_allow_admin_commands(settings: Any) -> None:
    """The gate, on the application itself (no daemon): reads pass, destructive ones 403."""
    from fastapi.testclient import TestClient

    from meraudiod.http.app import create_app
    from meraudiod.http.common import HttpContext

    app = create_app(HttpContext(settings), token=None)
    with TestClient(app) as client:
        assert client.get("/api/v1/recordings").status_code == 200
        for method, path, body in (
            ("DELETE", "/api/v1/recordings/01M89AY2FTNHNGP6MBNKJA4H0J", None),
            ("POST", "/api/v1/persistent-speakers/rename", {"name": "a", "new_name": "b"}),
            ("POST", "/api/v1/persistent-speakers/merge", {"source": "a", "target": "b"}),
            ("POST", "/api/v1/persistent-speakers/opt-out", {"name": "a"}),
            ("DELETE", "/api/v1/persistent-speakers/a", None),
        ):
            message = _error(client.request(method, path, json=body), 403, "forbidden")
            assert "http.allow_admin_commands" in message


def test_a_port_in_use_fails_the_start_with_one_line(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        Path(env["MERAUDIOD_CONFIG"]).write_text(f"[http]\nenabled = true\nport = {port}\n")
        result = subprocess.run(
            [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
            env=env,
            input=b"",
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert f"http: cannot listen on 127.0.0.1:{port}" in err.splitlines()[-1], err


def test_bench_measures_what_the_http_stage_costs(settings: Any) -> None:
    from meraudiod.bench_http import bench_http

    figures = bench_http(settings, None)
    # The budget: at most 15 MB more resident memory once it has served requests.
    assert 0 < figures["http_rss_added_mb"] <= 15, figures
    assert figures["idle_cpu_pct_http_on"] < 5, figures  # idle: a small fraction of a core


def test_cross_origin_requests_only_from_configured_origins(settings: Any) -> None:
    from fastapi.testclient import TestClient

    from meraudiod.http.app import create_app
    from meraudiod.http.common import HttpContext

    preflight = {
        "Origin": "http://ha.local:8123",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    with TestClient(create_app(HttpContext(settings), token=None)) as client:
        response = client.get("/api/v1/recordings", headers={"Origin": "http://ha.local:8123"})
        assert "access-control-allow-origin" not in response.headers
    settings.http.cors_origins = ["http://ha.local:8123"]
    with TestClient(create_app(HttpContext(settings), token="t")) as client:
        response = client.options("/api/v1/recordings", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://ha.local:8123"
        other = client.options(
            "/api/v1/recordings", headers={**preflight, "Origin": "http://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_ws_audio_at_a_declared_rate_and_sockets_without_the_token(daemon: HttpDaemon) -> None:
    import websockets
    from scipy.signal import resample_poly

    first = decode_file(DEMO)[: 16000 * 9].astype(np.float32)  # the first utterance
    at_8k = np.clip(resample_poly(first, 1, 2), -32768, 32767).astype("<i2")
    ws_url = daemon.url.replace("http://", "ws://")
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def run() -> list[dict[str, Any]]:
        async with websockets.connect(
            f"{ws_url}/ws/audio?rate_hz=8000", additional_headers=headers
        ) as audio:
            for start in range(0, at_8k.size, 800):
                await audio.send(at_8k[start : start + 800].tobytes())
            await audio.send("end")
            got = []
            while not got or got[-1].get("type") != "done":
                got.append(json.loads(await asyncio.wait_for(audio.recv(), 300)))
            return got

    got = asyncio.run(run())
    (transcript,) = [e for e in got if e.get("event_type") == "transcript"]
    assert "Dashwood" in transcript["text"], transcript

    async def refused(path: str, token: str) -> int:
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with websockets.connect(
                f"{ws_url}{path}", additional_headers={"Authorization": f"Bearer {token}"}
            ):
                pass
        return int(info.value.response.status_code)

    assert asyncio.run(refused("/ws/audio", "wrong")) == 403
    assert asyncio.run(refused("/ws/events", "")) == 403


def test_json_log_lines_carry_the_request_id(env: dict[str, str]) -> None:
    server = HttpDaemon(env, config='[logging]\nformat = "json"\n', token=None).start()
    try:
        with server.client() as client:
            clip = TEST_DATA / "ls_103_0000.flac"
            client.post(
                "/api/v1/vad/upload_recording",
                files={"file": (clip.name, clip.read_bytes())},
                headers={"X-Request-ID": "json-req-1"},
            )
    finally:
        assert server.stop() == 0
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert entries and all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    mine = [e for e in entries if e.get("request_id") == "json-req-1"]
    assert {e["logger"] for e in mine} >= {"meraudiod.recordings", "meraudiod.http.app"}, mine
    assert any(e["message"].startswith("POST /api/v1/vad/upload_recording 202") for e in mine)


def test_live_audio_streams_are_limited(daemon: HttpDaemon) -> None:
    import websockets

    from meraudiod.http.live import MAX_LIVE_STREAMS

    ws_url = daemon.url.replace("http://", "ws://") + "/ws/audio"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def run() -> int:
        open_ones = [
            await websockets.connect(ws_url, additional_headers=headers)
            for _ in range(MAX_LIVE_STREAMS)
        ]
        try:
            async with websockets.connect(ws_url, additional_headers=headers) as extra:
                with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                    await asyncio.wait_for(extra.recv(), 60)
                assert info.value.rcvd is not None
                return int(info.value.rcvd.code)
        finally:
            for ws in open_ones:
                await ws.close()

    assert asyncio.run(run()) == 1013
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
