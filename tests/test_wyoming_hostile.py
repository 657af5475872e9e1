"""A Wyoming server that speaks the protocol wrong (tests/hostile_wyoming.py, a real TCP
server): broken, another program on the configured port, or hostile. Each reply ends the
request at once with one line naming what the server sent, the server is taken for down, and
the daemon's memory stays its own whatever a header announces."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from meraudiod import models
from meraudiod.asr_wyoming import WyomingError, WyomingTranscriber
from meraudiod.audio import SAMPLE_RATE_HZ, decode_file
from meraudiod.config import Settings
from meraudiod.vad import SileroVad

from .conftest import DEMO, db_rows, run_daemon, status_json, wait_for
from .hostile_wyoming import HostileServer, Send, event_bytes, hold, stream_forever
from .test_wyoming import wyoming_env

GIB = 1 << 30
Answer = Callable[[HostileServer], Callable[[Send], None]]


def header(fields: dict[str, object]) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def says(raw: bytes) -> Answer:
    return lambda server: lambda send: send(raw)


# What the server answers a request with, and what the error must say.
ANSWERS: dict[str, tuple[Answer, str]] = {
    "http": (
        says(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
        "not a Wyoming server: it sent 'HTTP/1.1 400 Bad Request'",
    ),
    "ssh banner": (
        lambda s: hold(s, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"),
        "not a Wyoming server: it sent 'SSH-2.0-OpenSSH_9.2p1",
    ),
    "not utf-8": (says(b"\xff\xfe{}\n"), r"not a Wyoming server: it sent '\xff\xfe{}'"),
    "json list": (says(b"[1, 2]\n"), "sent a header that is not a Wyoming event: '[1, 2]'"),
    "no type": (says(header({"data": {}})), "not a Wyoming event"),
    "data a list": (
        says(header({"type": "transcript", "data": ["x"]})),
        "data is not an object",
    ),
    "data_length a string": (
        says(header({"type": "transcript", "data_length": "2"}) + b"{}"),
        "sent a data_length that is not a byte count: '\"2\"'",
    ),
    "data not an object": (
        says(header({"type": "transcript", "data_length": 2}) + b"[]"),
        "sent event data that is not an object: '[]'",
    ),
    "endless line": (
        lambda s: stream_forever(s, b'{"type": "transcript", "text": "'),
        "sent a line over 64 KiB: not a Wyoming server",
    ),
    "1 GiB of data, streamed": (
        lambda s: stream_forever(s, header({"type": "transcript", "data_length": GIB})),
        "announced a data_length of 1073741824 bytes (more than the 1024 KiB allowed)",
    ),
    "1 GiB of payload, never sent": (
        lambda s: hold(s, header({"type": "transcript", "payload_length": GIB})),
        "announced a payload_length of 1073741824 bytes",
    ),
    "40 MB of text": (
        says(event_bytes("transcript", {"text": "word " * 8_000_000})),
        "announced a data_length of 40000012 bytes",
    ),
    "text a number": (
        says(event_bytes("transcript", {"text": 42})),
        "sent a transcript whose text is int, not text",
    ),
    "no text": (
        says(event_bytes("transcript", {"language": "en"})),
        "sent a transcript whose text is NoneType, not text",
    ),
    "language a list": (
        says(event_bytes("transcript", {"text": "hello", "language": ["en"]})),
        "sent a transcript whose language is list, not text",
    ),
    "closed mid-header": (
        says(b'{"type": "transcr'),
        "closed the connection in the middle of a reply",
    ),
    "closed mid-data": (
        says(header({"type": "transcript", "data_length": 100}) + b'{"text": '),
        "closed the connection in the middle of a reply",
    ),
}

# What the server answers Describe with.
INFOS: dict[str, tuple[Answer, str]] = {
    "asr a number": (
        says(event_bytes("info", {"asr": 5})),
        "answered Describe with an info that is not one",
    ),
    "a program without its fields": (
        says(event_bytes("info", {"asr": [{"name": "x"}]})),
        "answered Describe with an info that is not one",
    ),
    "50 MB of info": (
        says(event_bytes("info", {"asr": [], "junk": "x" * 50_000_000})),
        "announced a data_length of 50000023 bytes",
    ),
    "http": (says(b"HTTP/1.1 400 Bad Request\r\n\r\n"), "not a Wyoming server"),
}


@pytest.fixture(scope="module")
def vad(models_dir: Path) -> SileroVad:
    return SileroVad(models.vad_file(Settings(storage={"models_dir": models_dir})))


def transcriber(uri: str, vad: SileroVad) -> WyomingTranscriber:
    settings = Settings()
    settings.asr.wyoming.servers = [uri]
    settings.asr.wyoming.deadline_base_s = 5.0
    return WyomingTranscriber(settings, vad, threading.Event())


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileServer]]:
    made: list[HostileServer] = []

    def make(answer: Answer | None = None, info: Answer | None = None) -> HostileServer:
        holder: dict[str, Callable[[Send], None]] = {}
        server = HostileServer(
            answer=lambda send: holder["answer"](send),
            info=(lambda send: holder["info"](send)) if info else None,
        )
        holder["answer"] = (answer or says(event_bytes("transcript", {"text": "hello"})))(server)
        if info:
            holder["info"] = info(server)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize("case", list(ANSWERS))
def test_a_wrong_answer_is_one_error_naming_it_at_once(
    case: str, vad: SileroVad, hostile: Callable[..., HostileServer]
) -> None:
    answer, message = ANSWERS[case]
    server = hostile(answer)
    client = transcriber(server.uri, vad)
    assert client.ready()  # it answered Describe properly
    started = time.monotonic()
    with pytest.raises(WyomingError) as raised:
        client.transcribe(np.zeros(SAMPLE_RATE_HZ, dtype=np.float32))
    assert time.monotonic() - started < 2.0  # not the 6 s deadline, not a GiB's transfer
    assert str(raised.value).startswith(f"{server.uri}: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)
    # Nothing announced is read beyond the bounds: the kernel's buffers, a few MB at most.
    assert server.sent_bytes < 8_000_000 or case == "40 MB of text"
    (shown,) = client.describe()["servers"]
    assert shown["up"] is False and message in shown["error"]


def test_a_server_up_again_keeps_its_last_requests_error_until_one_succeeds(
    vad: SileroVad,
) -> None:
    """A server that answers Describe and fails every request: the next Describe cleared its
    error, so `status` showed it up with nothing wrong half the time (and a CI run's status
    caught it so). The error stays until a request succeeds."""
    holder: dict[str, Callable[[Send], None]] = {}
    server = HostileServer(answer=lambda send: holder["answer"](send))
    try:
        flood, message = ANSWERS["1 GiB of data, streamed"]
        holder["answer"] = flood(server)
        client = transcriber(server.uri, vad)
        assert client.ready()
        with pytest.raises(WyomingError):
            client.transcribe(np.zeros(SAMPLE_RATE_HZ, dtype=np.float32))
        wait_for(client.ready, 10, "the server asked again, and answering Describe")
        (shown,) = client.describe()["servers"]
        assert shown["up"] is True and message in shown["error"]
        holder["answer"] = says(event_bytes("transcript", {"text": "hello"}))(server)
        client.transcribe(np.zeros(SAMPLE_RATE_HZ, dtype=np.float32))
        (shown,) = client.describe()["servers"]
        assert shown["up"] is True and shown["error"] is None
    finally:
        server.close()


@pytest.mark.parametrize("case", list(INFOS))
def test_a_wrong_info_leaves_the_server_down(
    case: str, vad: SileroVad, hostile: Callable[..., HostileServer]
) -> None:
    info, message = INFOS[case]
    server = hostile(info=info)
    client = transcriber(server.uri, vad)
    assert not client.ready()
    (shown,) = client.describe()["servers"]
    assert shown["up"] is False and message in shown["error"]
    assert client.problem() == "no Wyoming server answers: recordings wait"


def test_a_model_name_is_one_short_line(
    vad: SileroVad, hostile: Callable[..., HostileServer]
) -> None:
    program = {
        "name": "p",
        "attribution": {"name": "a", "url": "u"},
        "installed": True,
        "description": None,
        "version": None,
    }
    model = {**program, "name": "forged\nERROR meraudiod: " + "x" * 500, "languages": ["en"]}
    server = hostile(info=says(event_bytes("info", {"asr": [{**program, "models": [model]}]})))
    client = transcriber(server.uri, vad)
    assert client.ready()
    name = client.describe()["servers"][0]["model"]
    assert name.startswith("forged ERROR") and "\n" not in name and len(name) <= 123


def _peak_rss_kb(pid: int) -> int:
    """A running process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_the_daemon_outlives_servers_that_speak_nonsense(
    env: dict[str, str], hostile: Callable[..., HostileServer], tmp_path: Path
) -> None:
    """One server answers Describe with a broken Info (the worker, and so the daemon, died
    of it at every start), the other announces 1 GiB of data and streams it: the daemon goes
    on, says what each did in `status`, keeps every recording pending, and stays small."""
    broken_info = hostile(info=INFOS["asr a number"][0])
    flood = hostile(ANSWERS["1 GiB of data, streamed"][0])
    run_env = wyoming_env(
        env,
        [broken_info.uri, flood.uri],
        MERAUDIOD_ASR__RETRY_DELAY_S="0.5",
        MERAUDIOD_ASR__WYOMING__RETRY_MAX_S="1",
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log_file:
        proc = run_daemon(run_env, stderr=log_file)
    assert proc.stdin is not None
    try:
        proc.stdin.write(decode_file(DEMO).astype("<i2").tobytes())
        proc.stdin.flush()
        # Tried twice, each time given back uncounted (the server never transcribes).
        wait_for(lambda: flood.requests >= 2, 60, "two tries on the flooding server")

        def errors() -> dict[str, str]:
            info = status_json(run_env)
            assert info["running"] and proc.poll() is None
            return {s["uri"]: s["error"] or "" for s in info["asr_servers"]}

        # The heartbeat `status` reads is up to 5 s old.
        wait_for(lambda: all(errors().values()), 15, "both servers' errors in status")
        assert "answered Describe with an info that is not one" in errors()[broken_info.uri]
        assert "announced a data_length of 1073741824 bytes" in errors()[flood.uri]
        states = {r["state"] for r in db_rows(run_env, "SELECT state FROM jobs")}
        assert states <= {"pending", "running"}  # nothing failed
        # Each request is cut at the header: what the server got out is what the sockets'
        # buffers hold (a few MB on loopback), per request, however many retries a loaded
        # machine fits in before this line.
        assert flood.requests >= 2
        assert flood.sent_bytes < 8_000_000 * flood.requests
        # The daemon's own peak: wait4's ru_maxrss starts from the forking test process's
        # (kept across exec), 1.2 GB late in the suite.
        peak_kb = _peak_rss_kb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, status = os.waitpid(proc.pid, 0)
    finally:
        proc.kill()
    log = log_path.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, log
    # The daemon on Wyoming without a local model: about 90 MB, not the GiB announced.
    assert peak_kb * 1024 < 400_000_000, peak_kb
    assert "Traceback" not in log, log
    assert f"Wyoming server {flood.uri} is down: announced a data_length" in log
