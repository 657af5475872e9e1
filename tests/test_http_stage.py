"""The HTTP stage inside the daemon: refusing to start (off loopback without a token, a port
in use), a SIGKILL in the middle of an upload's task, the admin gate and CORS on the
application, JSON logs, and what the stage costs."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import numpy as np
import pytest
import soundfile

from meraudiod.audio import decode_file
from tests.conftest import DEMO, TEST_DATA, db_rows
from tests.httpd import (
    HttpDaemon,
    json_error,
    wait_task,
)


def _refused_start(env: dict[str, str], config: str) -> str:
    """Start the daemon with this configuration: it must fail with one line, never a
    traceback; returns what it printed."""
    Path(env["MERAUDIOD_CONFIG"]).write_text(config)
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
    assert "Traceback" not in err, err
    return err


def test_off_loopback_without_a_token_refuses_to_start(env: dict[str, str]) -> None:
    err = _refused_start(env, '[http]\nenabled = true\nhost = "0.0.0.0"\n')
    assert "http.host 0.0.0.0 is reachable from other machines" in err
    assert "http.token" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("token", "key", "why"),
    [
        ('token_file = "{empty}"', "http.token_file", "is empty"),
        ('token = "   "', "http.token", "printable ASCII"),
        ('token = "p\u00e4ssw\u00f6rd"', "http.token", "printable ASCII"),
    ],
)
def test_a_token_no_client_can_send_is_named(
    env: dict[str, str], tmp_path: Path, token: str, key: str, why: str
) -> None:
    # An empty token file passed `config check` ("configuration ok") and then stopped the
    # start with "set http.token or http.token_file", which was set. A token of spaces, or
    # one not in ASCII (a header is Latin-1, the file UTF-8), was taken: the daemon served
    # 0.0.0.0 and answered every Authorization: Bearer 401, saying nothing of why.
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    config = f'[http]\nenabled = true\nhost = "0.0.0.0"\n{token.format(empty=empty)}\n'
    Path(env["MERAUDIOD_CONFIG"]).write_text(config)
    check = subprocess.run(
        [sys.executable, "-m", "meraudiod", "config", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode != 0 and key in check.stderr and why in check.stderr, check
    err = _refused_start(env, config)
    assert len(err.strip().splitlines()) == 1 and key in err and why in err, err


def test_a_port_in_use_fails_the_start_with_one_line(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        err = _refused_start(env, f"[http]\nenabled = true\nport = {port}\n")
    # Not "Error: HttpError: http: cannot listen ..." (the exception's class; found walking
    # the README).
    assert err.splitlines()[-1].startswith(f"Error: http: cannot listen on 127.0.0.1:{port}: "), err


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
    # the first try died with the process: a crash, not a failed attempt
    assert (body["attempts"], body["crashes"]) == (0, 1), body
    (recording,) = body["result"]["recordings"]
    assert recording["text"].count("Dashwood") == 4
    assert "requeued 1 job left running" in server.log()
    assert uploads.is_dir() and not any(uploads.iterdir())


def test_uploads_still_being_stored_when_the_daemon_stops_are_told_so(
    env: dict[str, str], tmp_path: Path
) -> None:
    # SIGTERM with uploads whose audio was still being stored 5 s later (uvicorn's grace):
    # each client got uvicorn's plain-text "500 Internal Server Error", and the thread
    # storing the upload went on, so one that finished before the process ended was stored
    # all the same, a recording its client was told had failed.
    long_file = tmp_path / "long.flac"
    soundfile.write(long_file, np.tile(decode_file(DEMO), 40), 16000)  # 24 minutes
    data = long_file.read_bytes()
    config = "max_upload_mb = 100\nmax_upload_audio_s = 3600\n[asr]\nenabled = false\n"
    server = HttpDaemon(env, config=config, token=None).start()
    answers: list[Any] = [None] * 16

    def upload(i: int) -> None:
        with server.client() as client:
            try:
                answers[i] = client.post("/api/v1/analysis/upload", files={"file": ("a", data)})
            except httpx.TransportError as exc:
                answers[i] = exc

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(answers))]
    for thread in threads:
        thread.start()
    uploads = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "uploads"
    deadline = time.monotonic() + 60
    while len(list(uploads.glob("*.part"))) < len(answers) and time.monotonic() < deadline:
        time.sleep(0.05)  # every upload is being received
    assert server.stop() == 0, server.log()
    for thread in threads:
        thread.join(60)
    stored = [a.json()["task_id"] for a in answers if a.status_code == 202]
    told = [json_error(a, 503, "unavailable") for a in answers if a.status_code != 202]
    assert told, "no upload was still being stored 5 s after SIGTERM: make them longer"
    assert all("stopping" in m and "nothing was stored" in m for m in told), told
    rows = db_rows(env, "SELECT id FROM recordings")
    assert sorted(r["id"] for r in rows) == sorted(stored)  # none stored unbeknown to its client
    assert not list(uploads.glob("*.part"))


def test_admin_operations_need_http_allow_admin_commands(settings: Any) -> None:
    """The gate, on the application itself (no daemon): reads pass, destructive ones 403."""
    from fastapi.testclient import TestClient

    from meraudiod.http.app import create_app
    from meraudiod.http.common import HttpContext

    app = create_app(HttpContext(settings), token=None)
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/api/v1/recordings").status_code == 200
        for method, path, body in (
            ("DELETE", "/api/v1/recordings/01M89AY2FTNHNGP6MBNKJA4H0J", None),
            ("POST", "/api/v1/persistent-speakers/rename", {"name": "a", "new_name": "b"}),
            ("POST", "/api/v1/persistent-speakers/merge", {"source": "a", "target": "b"}),
            ("POST", "/api/v1/persistent-speakers/opt-out", {"name": "a"}),
            ("DELETE", "/api/v1/persistent-speakers/a", None),
        ):
            message = json_error(client.request(method, path, json=body), 403, "forbidden")
            assert "http.allow_admin_commands" in message


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


def test_another_site_cannot_use_a_daemon_without_a_token(env: dict[str, str]) -> None:
    # Without a token the API is meant for this machine alone (loopback), but a browser
    # here (or an admin's, through an SSH tunnel to it) also runs other sites' scripts: a
    # WebSocket is not held back by the same-origin rule, so any page could read every
    # transcript live from /ws/events; a form could switch listening off; and a name of the
    # site's own resolving to 127.0.0.1 (DNS rebinding) read the whole API as its own.
    import asyncio

    import websockets
    import websockets.exceptions

    server = HttpDaemon(env, token=None).start()
    port = server.port
    evil = {"Origin": "http://evil.example"}

    async def feed(origin: str) -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/events", additional_headers={"Origin": origin}
        ) as ws:
            await ws.ping()

    try:
        with server.client() as client:
            json_error(client.post("/api/v1/vad/stop", headers=evil), 403, "forbidden")
            json_error(client.get("/api/v1/recordings", headers=evil), 403, "forbidden")
            rebound = client.get("/api/v1/recordings", headers={"Host": f"evil.example:{port}"})
            assert "http.token" in json_error(rebound, 403, "forbidden")
            assert client.get("/api/v1/status").json()["listening"] is True
            with pytest.raises(websockets.exceptions.InvalidStatus):
                asyncio.run(feed("http://evil.example"))
            # the page itself, at any loopback name, still works
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
                origin = {"Origin": f"http://{host}", "Host": host}
                assert client.post("/api/v1/vad/stop", headers=origin).status_code == 200
                assert client.post("/api/v1/vad/start", headers=origin).status_code == 200
            asyncio.run(feed(f"http://127.0.0.1:{port}"))
    finally:
        assert server.stop() == 0


def test_connections_beyond_the_limit_are_refused_not_those_before(env: dict[str, str]) -> None:
    # uvicorn's limit_concurrency is checked at each request against every open connection:
    # once more than http.max_connections were open, each request on any of them got 503,
    # so a burst of 100 uploads (or idle connections) served none, not 64 of them. And its
    # 503 was plain text ("Service Unavailable"): now the API's JSON error, and the
    # connection closed after it.
    server = HttpDaemon(env, config="max_connections = 4\n", token=None).start()
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def answer(sock: socket.socket) -> bytes:
        sock.sendall(request)
        return sock.recv(200).split(b"\r\n")[0]

    def refused(sock: socket.socket) -> dict[str, Any]:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(4096):  # to the end: the server closes the connection
            response += chunk
        head, body = response.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 503 Service Unavailable", response
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        assert headers["content-type"] == "application/json", headers
        error: dict[str, Any] = json.loads(body)["error"]
        assert error["request_id"] == headers["x-request-id"], (error, headers)
        return error

    try:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(7)]
        time.sleep(0.5)  # all accepted
        try:
            assert [answer(s) for s in socks[:4]] == [b"HTTP/1.1 200 OK"] * 4
            said = "more than 4 connections open (http.max_connections): try again later"
            for sock in socks[4:]:
                assert refused(sock) == {
                    "code": "unavailable",
                    "message": said,
                    "request_id": ANY,
                }
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.5)
        with server.client() as client:
            assert client.get("/health").status_code == 200
    finally:
        assert server.stop() == 0


def test_cors_origins_star_lets_any_site_in_without_a_token(settings: Any) -> None:
    """`cors_origins = ["*"]` is the admin's word for any site: the other-site check must not
    refuse what CORS allows."""
    from fastapi.testclient import TestClient

    from meraudiod.http.app import create_app
    from meraudiod.http.common import HttpContext

    evil = {"Origin": "http://evil.example"}
    with TestClient(create_app(HttpContext(settings), None), base_url="http://localhost") as c:
        assert c.get("/api/v1/recordings", headers=evil).status_code == 403
    settings.http.cors_origins = ["*"]
    with TestClient(create_app(HttpContext(settings), None), base_url="http://localhost") as c:
        assert c.get("/api/v1/recordings", headers=evil).status_code == 200


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


def test_bench_measures_what_the_http_stage_costs(settings: Any) -> None:
    from meraudiod.bench_http import bench_http

    figures = bench_http(settings, None)
    # The budget: at most 15 MB more resident memory once it has served requests
    # (13.6-13.8 measured; 15.1-15.3 while FastAPI loaded pydantic.v1).
    assert 0 < figures["http_rss_added_mb"] < 15, figures
    assert figures["http_idle_cpu_pct_on"] < 5, figures  # idle: a small fraction of a core
    # the figures the README cites from docs/benchmarks.md: both sides of the comparison
    assert figures["http_upload_task_s"] > 0 and figures["http_analyze_s"] > 0, figures
    ratio = figures["http_upload_task_s"] / figures["http_analyze_s"]
    assert figures["http_upload_vs_analyze"] == round(ratio, 2), figures


def test_bench_measures_what_long_uploads_cost_the_daemons_memory(settings: Any) -> None:
    """The bench's long uploads, shortened: the daemon's RSS once each task completed stays
    where the first left it (three of 2 minutes: 0.2-0.3 MB apart)."""
    from meraudiod.bench_http import bench_long_uploads

    figures = bench_long_uploads(settings, None, upload_s=60.0, uploads=2)
    assert figures["http_long_upload_s"] == 60.0 and figures["http_long_uploads"] == 2
    assert figures["http_long_upload_peak_added_mb"] > 0, figures  # a transcription ran
    assert abs(figures["http_long_uploads_rss_growth_mb"]) < 8, figures
    growth = (
        figures["http_long_upload_rss_after_last_mb"]
        - figures["http_long_upload_rss_after_first_mb"]
    )
    assert figures["http_long_uploads_rss_growth_mb"] == pytest.approx(growth, abs=0.11), figures


def test_the_http_stage_never_loads_pydantic_v1(env: dict[str, str]) -> None:
    """FastAPI imports pydantic.v1 (1.5 MB resident) only to ask whether a route's types are
    v1 models; the app is built, and serves, without it."""
    script = """
import sys
from fastapi.testclient import TestClient
from meraudiod.config import Settings
from meraudiod.http.app import create_app
from meraudiod.http.common import HttpContext
app = create_app(HttpContext(Settings()), token=None)
with TestClient(app, base_url="http://localhost") as client:
    assert client.get("/api/openapi.json").status_code == 200
    assert client.get("/api/v1/nothing").status_code == 404
print(sorted(m for m, mod in sys.modules.items() if m.startswith("pydantic.v1") and mod))
"""
    loaded = subprocess.check_output([sys.executable, "-c", script], env=env, timeout=120)
    assert loaded.decode().strip() == "[]", loaded


class _Trickler:
    """A client on a raw socket that sends its request a byte at a time (slowloris), and
    notes when the server answers and closes the connection."""

    def __init__(self, port: int, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setblocking(False)
        self.request = request
        self.sent = 0
        self.answer = b""
        self.closed_after_s: float | None = None
        self.t0 = time.monotonic()

    def step(self) -> None:
        """Read what the server said; send one more byte while the connection is open."""
        if self.closed_after_s is not None:
            return
        try:
            while select.select([self.sock], [], [], 0)[0]:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionResetError
                self.answer += data
            if self.sent < len(self.request):
                self.sock.send(self.request[self.sent : self.sent + 1])
                self.sent += 1
        except (ConnectionResetError, BrokenPipeError):
            self.closed_after_s = time.monotonic() - self.t0
            self.sock.close()


def test_slow_clients_are_cut_off_while_others_are_served(env: dict[str, str]) -> None:
    """Headers trickled, or a body sent a byte at a time, hold a connection no longer than
    http.header_timeout_s / http.body_timeout_s (each long before the trickle would end)."""
    server = HttpDaemon(env, config="header_timeout_s = 2\nbody_timeout_s = 3\n", token=None)
    server.start()
    head = (
        b"GET /api/v1/recordings HTTP/1.1\r\nHost: localhost\r\nX-Padding: "
        + b"a" * 200
        + b"\r\n\r\n"
    )
    form = (
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        + b"\0" * 300
        + b"\r\n--b0--\r\n"
    )
    upload = (
        b"POST /api/v1/analysis/upload HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: %d\r\nContent-Type: multipart/form-data; boundary=b0\r\n\r\n%s"
        % (len(form), form)
    )
    try:
        silent = _Trickler(server.port, b"")  # connects and sends nothing at all
        headers = _Trickler(server.port, head)
        body = _Trickler(server.port, upload)
        body.sock.setblocking(True)
        body.sock.sendall(upload[: -len(form)])  # the headers whole, then the body byte by byte
        body.sock.setblocking(False)
        body.sent = len(upload) - len(form)
        served = 0
        deadline = time.monotonic() + 60  # a byte every 0.2 s: each trickle would take > 40 s
        with server.client() as client:
            while time.monotonic() < deadline and None in (
                silent.closed_after_s,
                headers.closed_after_s,
                body.closed_after_s,
            ):
                for trickler in (silent, headers, body):
                    trickler.step()
                assert client.get("/api/v1/recordings").status_code == 200  # others are served
                served += 1
                time.sleep(0.2)
    finally:
        assert server.stop() == 0
    assert served > 5
    for trickler, bound_s in ((silent, 2), (headers, 2), (body, 3)):
        assert trickler.closed_after_s is not None, (trickler.sent, trickler.answer)
        assert trickler.closed_after_s < bound_s + 15, trickler.closed_after_s  # generous
    assert headers.sent < len(head) and body.sent < len(upload)  # cut off, not finished
    assert body.answer.startswith(b"HTTP/1.1 408"), body.answer
    assert b'"code":"timeout"' in body.answer and b"http.body_timeout_s" in body.answer
    assert "no complete request headers within 2 s (http.header_timeout_s)" in server.log()
