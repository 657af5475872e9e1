"""Whose fault a failed Wyoming request is (meraudiod/server_faults.py), with the real daemon
and a real TCP server (tests/hostile_wyoming.py) that answers Describe properly: one that
fails every request leaves the recordings waiting, not failed; one that fails a single
recording and transcribes the others still uses up that recording's attempts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meraudiod.audio import decode_file

from .conftest import DEMO, DEMO_TRUTH, cli, db_rows, run_daemon, status_json, wait_for
from .hostile_wyoming import HostileServer, Send, event_bytes
from .httpd import HttpDaemon
from .test_wyoming import wyoming_env

BROKEN = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
HELLO = event_bytes("transcript", {"text": "hello"})
# The protocol's own error event, as from a server whose model cannot run.
GPU_FULL = event_bytes("error", {"text": "GPU out of memory"})
DEMO_PCM = decode_file(DEMO).astype("<i2").tobytes()
TEST_DATA_SHORT = Path(__file__).parent / "data" / "ls_103_0000.flac"  # one utterance


@pytest.fixture
def server() -> Iterator[tuple[HostileServer, dict[str, Callable[[Send], None]]]]:
    """A server and the holder of its answer, to change while the daemon runs."""
    holder: dict[str, Callable[[Send], None]] = {}
    made = HostileServer(answer=lambda send: holder["answer"](send))
    yield made, holder
    made.close()


# Each recording's attempts (asr.max_attempts): were every failed request counted, the
# demo's five recordings would all be `failed` after MAX_ATTEMPTS * 5 of them.
MAX_ATTEMPTS = 2


def daemon(
    env: dict[str, str], uri: str, log: Path, retry_delay_s: float
) -> tuple[dict[str, str], subprocess.Popen[bytes]]:
    """The daemon on the server at `uri`, its log in `log`, failed jobs retried after
    `retry_delay_s` (asr.retry_delay_s, doubling; a job waiting on the servers waits at least
    1 s)."""
    run_env = wyoming_env(
        env,
        [uri],
        MERAUDIOD_ASR__MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        MERAUDIOD_ASR__RETRY_DELAY_S=str(retry_delay_s),
        MERAUDIOD_ASR__WYOMING__RETRY_MAX_S="1",
    )
    with log.open("wb") as log_file:
        proc = run_daemon(run_env, stderr=log_file)
    return run_env, proc


def speak(proc: subprocess.Popen[bytes]) -> None:
    """The demo's five utterances on the daemon's stdin (kept open: the daemon runs on)."""
    assert proc.stdin is not None
    proc.stdin.write(DEMO_PCM)
    proc.stdin.flush()


def jobs(env: dict[str, str]) -> list[dict[str, object]]:
    rows = "SELECT j.state, j.attempts, r.status FROM jobs j JOIN recordings r"
    return [dict(row) for row in db_rows(env, rows + " ON r.id = j.recording_id ORDER BY j.id")]


def stop(proc: subprocess.Popen[bytes], log: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    _, status = os.waitpid(proc.pid, 0)
    text = log.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Traceback" not in text, text
    return text


def test_a_server_failing_every_request_leaves_the_recordings_waiting(
    env: dict[str, str],
    server: tuple[HostileServer, dict[str, Callable[[Send], None]]],
    tmp_path: Path,
) -> None:
    """Its model broken, the server answers Describe and fails every request: each try used
    one of the recording's attempts, and after max_attempts every recording of those hours
    was `failed` for good. No server has transcribed anything since: the recordings wait,
    uncounted, the daemon says why, and they are transcribed once the server is mended."""
    wyoming, holder = server
    holder["answer"] = lambda send: send(BROKEN)
    log = tmp_path / "daemon.log"
    run_env, proc = daemon(env, wyoming.uri, log, retry_delay_s=0.2)
    try:
        speak(proc)
        # Were every failure counted, two attempts each would leave all five `failed` after
        # ten requests, and no request would follow. (A failed request marks the server
        # down, so the worker makes one every 2 s, its idle poll: each costs that here.)
        failing_all = MAX_ATTEMPTS * len(DEMO_TRUTH)
        wait_for(
            lambda: wyoming.requests > failing_all,
            60,
            f"more than {failing_all} failed requests",
        )
        assert {(j["state"], j["attempts"]) for j in jobs(run_env)} <= {
            ("pending", 0),
            ("running", 0),
        }
        said = "transcription servers fail every request"
        wait_for(lambda: said in (status_json(run_env)["degraded"] or ""), 15, "degraded")
        assert "HTTP/1.1 500 Internal Server Error" in status_json(run_env)["degraded"]
        holder["answer"] = lambda send: send(HELLO)  # mended
        wait_for(
            lambda: len(jobs(run_env)) == 5 and all(j["status"] == "done" for j in jobs(run_env)),
            60,
            "every recording transcribed once the server answers",
        )
        # (`degraded` also says that stdin has sent nothing for a while, as a microphone would.)
        wait_for(lambda: said not in (status_json(run_env)["degraded"] or ""), 15, "mended")
    finally:
        text = stop(proc, log) if proc.poll() is None else log.read_text()
        proc.kill()
    assert "no attempt counted (no server has transcribed since it failed)" in text


def test_a_recording_that_fails_where_others_are_transcribed_runs_out_of_attempts(
    env: dict[str, str],
    server: tuple[HostileServer, dict[str, Callable[[Send], None]]],
    tmp_path: Path,
) -> None:
    """The server fails on one recording's audio (a file that crashes its decoder) and
    transcribes the others: once it has transcribed another since that recording's failed
    try, the try counts, so the recording still ends `failed`, not retried for ever."""
    wyoming, holder = server
    poison: list[int] = []

    def answer(send: Send) -> None:
        poison.append(poison[0] if poison else wyoming.audio_bytes)
        send(BROKEN if wyoming.audio_bytes == poison[0] else HELLO)

    holder["answer"] = answer
    log = tmp_path / "daemon.log"
    # Its uncounted wait (3 s) outlasts the worker's 2 s poll while the server is down, so
    # the other recordings are transcribed between its tries, not behind its backoff.
    run_env, proc = daemon(env, wyoming.uri, log, retry_delay_s=3.0)
    try:
        speak(proc)
        wait_for(
            lambda: sum(j["status"] == "done" for j in jobs(run_env)) == 4,
            60,
            "the four other recordings transcribed",
        )
        speak(proc)  # more speech: more transcripts since its last try
        wait_for(
            lambda: jobs(run_env)[0]["status"] == "failed",
            60,
            "the recording the server fails on failed for good",
        )
        first = jobs(run_env)[0]
        assert first["state"] == "failed" and first["attempts"] == 2
        assert "transcription servers" not in (status_json(run_env)["degraded"] or "")
    finally:
        text = stop(proc, log) if proc.poll() is None else log.read_text()
        proc.kill()
    assert "failed: WyomingError" in text


def test_analyze_whose_recordings_failed_to_be_transcribed_says_so_and_exits_1(
    env: dict[str, str],
    server: tuple[HostileServer, dict[str, Callable[[Send], None]]],
) -> None:
    """The server transcribes the demo's first utterance and fails every later request: with
    one attempt each, four of the five recordings end `failed`. Before, `analyze --json`
    printed them with `"state": "failed"` and no text, and exited 0 (found by CI, a Wyoming
    server behind its deadline under load): a script piping it on could not tell."""
    made, holder = server
    answered: list[int] = []

    def first_only(send: Send) -> None:
        answered.append(1)
        send(HELLO if len(answered) == 1 else BROKEN)

    holder["answer"] = first_only
    result, said = _analyzed_trying_once(env, made.uri, "--json", str(DEMO), timeout_s=300)
    states = [rec["state"] for rec in json.loads(result.stdout)["recordings"]]
    assert states == ["done"] + ["failed"] * 4, result.stdout
    assert result.returncode == 1, result.stderr
    assert said == [
        "error: 4 of 5 recordings not transcribed: WyomingError: "
        f"{made.uri}: not a Wyoming server: it sent 'HTTP/1.1 500 Internal Server Error'"
    ], result.stderr


def _analyzed_trying_once(
    env: dict[str, str], uri: str, *args: str, timeout_s: float
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`analyze ARGS` against the server at `uri`, each recording tried once; with the
    error lines it printed."""
    run_env = wyoming_env(
        env, [uri], MERAUDIOD_ASR__MAX_ATTEMPTS="1", MERAUDIOD_ASR__WYOMING__RETRY_MAX_S="1"
    )
    result = cli("analyze", *args, env=run_env, timeout_s=timeout_s)
    return result, [x for x in result.stderr.splitlines() if x.startswith("error:")]


def test_a_server_that_answers_with_an_error_event_is_heard_at_once(
    env: dict[str, str],
    server: tuple[HostileServer, dict[str, Callable[[Send], None]]],
) -> None:
    """A server whose model cannot run answers with the protocol's own `error` event: it was
    skipped while the client waited for a transcript, so each request waited out its
    deadline ("no answer in 35.1 s", three times for an 8 s clip) and the server's words
    were never shown (found by a new user). Now the request fails at once, with them."""
    made, holder = server
    holder["answer"] = lambda send: send(GPU_FULL)
    result, said = _analyzed_trying_once(env, made.uri, str(TEST_DATA_SHORT), timeout_s=120)
    assert result.returncode == 1, result.stderr
    assert said == [
        "error: 1 of 1 recording not transcribed: WyomingError: "
        f"{made.uri}: answered with an error: GPU out of memory"
    ], result.stderr
    assert "no answer in" not in result.stderr, result.stderr


def test_an_upload_task_waiting_to_be_tried_again_says_why_the_last_try_failed(
    env: dict[str, str],
    server: tuple[HostileServer, dict[str, Callable[[Send], None]]],
) -> None:
    """A task whose tries fail is `pending` until its attempts are used up: it said
    `"error": null` meanwhile, while `meraudiod jobs` showed why (found by a new user)."""
    made, holder = server
    holder["answer"] = lambda send: send(GPU_FULL)
    run_env = wyoming_env(
        env,
        [made.uri],
        MERAUDIOD_ASR__MAX_ATTEMPTS="3",
        MERAUDIOD_ASR__RETRY_DELAY_S="600",
        MERAUDIOD_ASR__WYOMING__RETRY_MAX_S="1",
    )
    http = HttpDaemon(run_env).start()
    try:
        with http.client() as client:
            clip = TEST_DATA_SHORT.read_bytes()
            answer = client.post("/api/v1/analysis/upload", files={"file": ("a.flac", clip)})
            assert answer.status_code == 202, answer.text
            task = f"/api/v1/tasks/{answer.json()['task_id']}"
            wait_for(lambda: client.get(task).json()["error"] is not None, 60, "the error")
            body = client.get(task).json()
    finally:
        assert http.stop() == 0, http.log()
    assert body["status"] == "pending", body
    assert "GPU out of memory" in body["error"], body


def test_a_server_at_an_ipv6_address_is_used(env: dict[str, str]) -> None:
    """`tcp://[::1]:10300` was refused by the configuration, "is not tcp://host:port" (found
    by a new user): a bracketed IPv6 address is a server's address too."""
    made = HostileServer(answer=lambda send: send(HELLO), ipv6=True)
    try:
        assert made.uri.startswith("tcp://[::1]:")
        run_env = wyoming_env(env, [made.uri])
        result = cli("analyze", "--json", str(TEST_DATA_SHORT), env=run_env, timeout_s=120)
    finally:
        made.close()
    assert result.returncode == 0, result.stderr
    (recording,) = json.loads(result.stdout)["recordings"]
    assert recording["text"] == "hello", recording
