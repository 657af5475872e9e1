"""asr.backend = "wyoming" against a real wyoming-faster-whisper server (tests/wyoming_server.py),
started, killed, stopped with SIGSTOP and restarted by the tests; the device's jobs table
stays the record."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meraudiod.audio import SAMPLE_RATE_HZ, decode_file

from .broker import Broker, Subscriber, free_port
from .conftest import (
    DEMO,
    DEMO_TRUTH,
    StartWyoming,
    cli,
    db_rows,
    run_daemon,
    status_json,
    wait_for,
)
from .wyoming_server import WyomingServer

NODE = "wyo"


def wyoming_env(
    env: dict[str, str], servers: list[str], fallback: str = "wait", **extra: str
) -> dict[str, str]:
    """The daemon on Wyoming servers with short deadlines; with `wait` the local model is a
    name that does not exist, so loading it would fail the run."""
    values = {
        "MERAUDIOD_ASR__BACKEND": "wyoming",
        "MERAUDIOD_ASR__FALLBACK": fallback,
        "MERAUDIOD_ASR__WYOMING__SERVERS": json.dumps(servers),
        "MERAUDIOD_ASR__WYOMING__DEADLINE_BASE_S": "3",
        "MERAUDIOD_ASR__WYOMING__DEADLINE_PER_AUDIO_S": "1",
        "MERAUDIOD_ASR__WYOMING__RETRY_MAX_S": "2",
        "MERAUDIOD_ASR__MAX_ATTEMPTS": "10",
    }
    if fallback == "wait":
        values["MERAUDIOD_ASR__MODEL"] = "no-such-local-model"
    return {**env, **values, **extra}


def mqtt_to(broker: Broker) -> dict[str, str]:
    """The environment that turns MQTT on, to `broker`, as node NODE."""
    return {
        "MERAUDIOD_MQTT__ENABLED": "true",
        "MERAUDIOD_MQTT__HOST": "127.0.0.1",
        "MERAUDIOD_MQTT__PORT": str(broker.port),
        "MERAUDIOD_MQTT__NODE_ID": NODE,
    }


def run_demo(env: dict[str, str]) -> subprocess.Popen[str]:
    """`meraudiod run --source demo` in the background: it exits once every job is done."""
    return subprocess.Popen(
        [sys.executable, "-m", "meraudiod", "run", "--source", "demo"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen[str], timeout_s: float = 240) -> str:
    """The daemon's log, once it has exited 0."""
    _, stderr = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, stderr
    return stderr


def status(env: dict[str, str]) -> dict:
    return status_json(env)  # once the daemon has made its database


def recordings(env: dict[str, str]) -> list[dict]:
    rows = db_rows(env, "SELECT id, status, text, model FROM recordings ORDER BY id")
    return [dict(row) for row in rows]


def attempts(env: dict[str, str]) -> list[int]:
    """Failed tries per job (jobs.attempts); a process that died holding one counts apart."""
    rows = db_rows(env, "SELECT attempts, crashes FROM jobs ORDER BY id")
    assert all(int(r["crashes"]) == 0 for r in rows)  # the daemon itself never died
    return [int(r["attempts"]) for r in rows]


# --- the same text -------------------------------------------------------------------------


def test_local_and_wyoming_give_the_same_text_on_the_demo(
    env: dict[str, str], start_wyoming: StartWyoming, tmp_path: Path
) -> None:
    server = start_wyoming()
    local_env = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "local")}
    remote_env = wyoming_env(
        {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / "remote")}, [server.uri]
    )
    texts = []
    for run_env in (local_env, remote_env):
        result = cli("analyze", str(DEMO), "--json", env=run_env, timeout_s=240)
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout.splitlines()[-1])["recordings"]
        texts.append([r["text"] for r in found])
        assert all(r["state"] == "done" and r["segments"] for r in found)
    assert len(texts[0]) == len(DEMO_TRUTH) and texts[0] == texts[1]
    # The server's model is named with every transcript, and the local one was never loaded
    # (its name does not exist).
    assert {r["model"] for r in recordings(remote_env)} == {str(server.model_dir)}
    assert server.requests_in() >= len(DEMO_TRUTH)


# --- failures ------------------------------------------------------------------------------


def test_server_killed_mid_request_and_restarted_gives_one_transcript_each(
    env: dict[str, str], start_wyoming: StartWyoming, tmp_path: Path
) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        sub = Subscriber(
            broker.port, [f"meraudiod/{NODE}/event/transcript", f"meraudiod/{NODE}/state"]
        )
        server = start_wyoming()
        run_env = wyoming_env(env, [server.uri], **mqtt_to(broker))
        proc = run_demo(run_env)
        # The second request's audio is in and the server is transcribing it: kill it.
        wait_for(lambda: server.requests_in() >= 2, 120, "the second request")
        server.kill()
        time.sleep(2.0)  # the daemon meets a dead server (and its retry waits)
        start_wyoming(server.port)
        log = finished(proc)
        assert "is down" in log and "is up" in log
        done = recordings(run_env)
        assert len(done) == len(DEMO_TRUTH) and all(r["status"] == "done" for r in done)
        # The killed request's recording waited for the server without using an attempt (no
        # server had transcribed anything since it failed: server_faults.py), and so did the
        # jobs behind it.
        assert attempts(run_env) == [0] * len(DEMO_TRUTH)
        sub.wait_for(lambda: len(sub.on("/event/transcript")) >= len(DEMO_TRUTH), 30)
        time.sleep(1.0)  # a duplicate would arrive by now
        events = [m.json() for m in sub.on("/event/transcript")]
        assert sorted(e["recording_id"] for e in events) == [r["id"] for r in done]
        assert {e["model"] for e in events} == {str(server.model_dir)}
        models = sub.on("/state")[-1].json()["models"]  # the retained state names the server's
        assert models["asr"] == str(server.model_dir) and models["asr_server"] == server.uri
        sub.close()
    finally:
        broker.stop()


def test_the_retained_state_names_the_server_as_the_daemon_knows_it(
    env: dict[str, str], start_wyoming: StartWyoming, tmp_path: Path
) -> None:
    """The MQTT state named the ASR model from the heartbeat file `status` reads, written
    every 5 s: the last state before `offline` said `wyoming` and no server when the server
    had come back after the last heartbeat (seen under load), and always where the heartbeat
    cannot be written (its path a directory here). It is the daemon's own knowledge now."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        sub = Subscriber(broker.port, [f"meraudiod/{NODE}/state"])
        server = start_wyoming()
        run_dir = tmp_path / "run"
        (run_dir / "heartbeat.json").mkdir(parents=True)
        run_env = wyoming_env(
            env, [server.uri], MERAUDIOD_STORAGE__RUN_DIR=str(run_dir), **mqtt_to(broker)
        )
        log = finished(run_demo(run_env))
        assert "cannot write the heartbeat" in log
        sub.wait_for(lambda: sub.on("/state"), 10)
        models = sub.on("/state")[-1].json()["models"]
        assert models["asr"] == str(server.model_dir) and models["asr_server"] == server.uri
        sub.close()
    finally:
        broker.stop()


def test_server_down_at_start_keeps_a_backlog_that_drains_when_it_comes(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    port = free_port()
    run_env = wyoming_env(env, [f"tcp://127.0.0.1:{port}"])
    proc = run_demo(run_env)
    try:

        def backlog_shown() -> bool:
            info = status(run_env)
            return bool(info["running"] and info["backlog"] == len(DEMO_TRUTH))

        wait_for(backlog_shown, 120, "the backlog in status")
        info = status(run_env)
        assert info["jobs"]["pending"] == len(DEMO_TRUTH)
        (server_info,) = info["asr_servers"]
        assert server_info["up"] is False and "refused" in server_info["error"].lower()
        assert info["models"]["asr"] == "wyoming" and info["models"]["asr_server"] is None
        assert info["degraded"] == "no Wyoming server answers: recordings wait"
        shown = cli("status", env=run_env).stdout
        assert f"asr server       tcp://127.0.0.1:{port}  down" in shown, shown
        server = start_wyoming(port)
        finished(proc)
    finally:
        proc.kill()
    done = recordings(run_env)
    assert len(done) == len(DEMO_TRUTH) and all(r["status"] == "done" for r in done)
    assert attempts(run_env) == [0] * len(DEMO_TRUTH)  # waiting failed no try
    assert server.requests_in() >= len(DEMO_TRUTH)


@contextmanager
def hung_server_daemon(
    env: dict[str, str], start_wyoming: StartWyoming, **extra: str
) -> Iterator[tuple[WyomingServer, dict[str, str], subprocess.Popen[bytes]]]:
    """A daemon on one server that stops answering (SIGSTOP: connections are accepted,
    nothing is answered) once it is up, then given the demo's speech on stdin; yields the
    server, the daemon's environment and the daemon, which is killed at the end."""
    server = start_wyoming()
    run_env = wyoming_env(env, [server.uri], **extra)
    proc = run_daemon(run_env)
    assert proc.stdin is not None
    try:
        wait_for(lambda: status(run_env)["models"]["asr_server"] == server.uri, 120, "server up")
        server.pause()
        proc.stdin.write(decode_file(DEMO).astype("<i2").tobytes())
        proc.stdin.flush()
        yield server, run_env, proc
    finally:
        proc.kill()


def test_hung_server_hits_the_deadline_and_the_daemon_stays_responsive(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    # Every request's deadline 3 s, whatever its audio (with 1 s per second of it, the hung
    # first recording's was 10.3 s); resumed, the server answers each in 0.4-0.8 s here.
    flat = {"MERAUDIOD_ASR__WYOMING__DEADLINE_PER_AUDIO_S": "0"}
    with hung_server_daemon(env, start_wyoming, **flat) as (server, run_env, proc):
        rows = lambda: db_rows(run_env, "SELECT error FROM jobs WHERE error IS NOT NULL")  # noqa: E731
        wait_for(lambda: any("no answer in" in r["error"] for r in rows()), 120, "the deadline")
        # The main loop goes on writing its heartbeat, which shows the server down.
        wait_for(lambda: status(run_env)["asr_servers"][0]["up"] is False, 20, "server down")
        info = status(run_env)
        assert info["running"] and info["heartbeat_age_s"] < 10 and info["backlog"] > 0
        assert proc.poll() is None
        server.resume()
        _, stderr = proc.communicate(timeout=240)  # closes stdin: the input has ended
        assert proc.returncode == 0, stderr.decode()
    done = recordings(run_env)
    assert len(done) == len(DEMO_TRUTH) and all(r["status"] == "done" for r in done)


def test_stop_abandons_a_request_to_a_hung_server(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    """SIGTERM while the worker waits on a stopped server: the daemon exits long before the
    request's deadline, and the job is left pending for the next start."""
    slow = {"MERAUDIOD_ASR__WYOMING__DEADLINE_BASE_S": "120"}
    with hung_server_daemon(env, start_wyoming, **slow) as (_, run_env, proc):
        running = "SELECT id FROM jobs WHERE state='running'"
        wait_for(lambda: db_rows(run_env, running), 120, "a request in flight")
        time.sleep(1.0)  # well inside the request, far from its 120 s deadline
        asked_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert time.monotonic() - asked_at < 30 and proc.returncode == 0
    states = {r["state"] for r in db_rows(run_env, "SELECT state FROM jobs")}
    assert states == {"pending"}  # nothing lost, nothing half done


def test_stop_while_a_played_file_waits_for_a_server(env: dict[str, str]) -> None:
    """The input has ended and the backlog waits for a server that is down: SIGTERM ends
    the wait at once, and the recordings stay pending for the next start."""
    run_env = wyoming_env(env, [f"tcp://127.0.0.1:{free_port()}"])
    proc = run_demo(run_env)
    try:
        pending = "SELECT id FROM jobs WHERE state='pending'"
        wait_for(lambda: status(run_env)["backlog"] == len(DEMO_TRUTH), 120, "the backlog")
        time.sleep(1.0)  # the demo has played: the daemon waits for its jobs
        asked_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert time.monotonic() - asked_at < 30 and proc.returncode == 0
    finally:
        proc.kill()
    assert len(db_rows(run_env, pending)) == len(DEMO_TRUTH)


def test_two_servers_one_killed_all_jobs_complete(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    first, second = start_wyoming(), start_wyoming()
    run_env = wyoming_env(env, [first.uri, second.uri])
    proc = run_demo(run_env)
    wait_for(lambda: first.requests_in() >= 1, 120, "the first request")
    first.kill()
    finished(proc)
    done = recordings(run_env)
    assert len(done) == len(DEMO_TRUTH) and all(r["status"] == "done" for r in done)
    assert second.requests_in() >= len(DEMO_TRUTH) - 1  # the rest went to the second


def test_spread_gives_both_servers_requests_and_survives_one_killed(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    """strategy = spread: the first three utterances go to both servers in turn; then one is
    killed, and the last two go to the other, without a failed try."""
    first, second = start_wyoming(), start_wyoming()
    run_env = wyoming_env(env, [first.uri, second.uri], MERAUDIOD_ASR__WYOMING__STRATEGY="spread")
    proc = run_daemon(run_env)
    assert proc.stdin is not None
    pcm = decode_file(DEMO).astype("<i2").tobytes()
    # Mid-way through the pause after the third utterance (the demo's pauses are 2 s).
    cut_s = (DEMO_TRUTH[2]["end_s"] + DEMO_TRUTH[3]["start_s"]) / 2
    cut = int(cut_s * SAMPLE_RATE_HZ) * 2
    done = "SELECT id FROM recordings WHERE status='done'"
    try:

        def both_up() -> bool:  # none listed in the heartbeat written before the worker runs
            servers = status(run_env)["asr_servers"] or []
            return len(servers) == 2 and all(s["up"] for s in servers)

        wait_for(both_up, 120, "both servers up")
        proc.stdin.write(pcm[:cut])
        proc.stdin.flush()
        wait_for(lambda: len(db_rows(run_env, done)) == 3, 120, "three transcripts")
        assert first.requests_in() >= 1 and second.requests_in() >= 1  # both had a turn
        second_before = second.requests_in()
        first.kill()
        proc.stdin.write(pcm[cut:])
        proc.stdin.flush()
        _, stderr = proc.communicate(timeout=240)  # closes stdin: the input has ended
        assert proc.returncode == 0, stderr.decode()
    finally:
        proc.kill()
    rows = recordings(run_env)
    assert len(rows) == len(DEMO_TRUTH) and all(r["status"] == "done" for r in rows)
    assert second.requests_in() >= second_before + 2  # the survivor took the rest
    assert attempts(run_env) == [0] * len(DEMO_TRUTH)  # the dead server cost no try


def test_without_a_local_whisper_none_of_it_is_imported(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    """backend wyoming + fallback wait: the daemon transcribes the demo on the server and
    never imports faster-whisper, CTranslate2 or its tokenizer (Python's own import log)."""
    server = start_wyoming()
    run_env = wyoming_env(env, [server.uri])
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "meraudiod", "run", "--source", "demo"],
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = finished(proc)
    done = recordings(run_env)
    assert len(done) == len(DEMO_TRUTH) and all(r["status"] == "done" for r in done)
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in log.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"meraudiod", "onnxruntime", "wyoming"} <= imported  # the log is complete
    assert not imported & {"faster_whisper", "ctranslate2", "tokenizers", "huggingface_hub"}


def test_fallback_to_local_when_every_server_is_down(env: dict[str, str]) -> None:
    run_env = wyoming_env(env, [f"tcp://127.0.0.1:{free_port()}"], fallback="local")
    log = finished(run_demo(run_env))
    assert "transcribing locally" in log
    done = recordings(run_env)
    assert len(done) == len(DEMO_TRUTH) and all(r["status"] == "done" for r in done)
    assert {r["model"] for r in done} == {"tiny.en"}


# --- bench ---------------------------------------------------------------------------------


def test_bench_in_wyoming_mode(env: dict[str, str], start_wyoming: StartWyoming) -> None:
    """Without a local Whisper the daemon fits a 512 MB device, and transcription costs the
    device a small share of what it costs locally (CPU time, not wall clock)."""
    server = start_wyoming()
    run_env = wyoming_env(env, [server.uri], fallback="local")  # bench runs it with wait
    # The sample's first 13.5 s instead of 20, 19.5 s less over three daemons at real time:
    # its first two utterances, the same two recordings as in a longer clip (the second ends
    # at 13.09 s, and the end of the clip closes it where the pause after it would).
    result = cli(
        "bench", "--json", "--only", "pipeline", "--clip-s", "13.5", env=run_env, timeout_s=400
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["asr_backend"] == "wyoming" and "asr_passage_rtf" not in figures
    assert figures["pipeline_recordings"] == 2
    assert figures["pipeline_asr_model"] == str(server.model_dir)
    assert figures["daemon_peak_rss_mb"] < 150 < figures["local_daemon_peak_rss_mb"]
    assert 0 <= figures["transcription_cpu_ratio_vs_local"] < 0.25
    assert figures["device_cpu_ratio_vs_local"] < 1
