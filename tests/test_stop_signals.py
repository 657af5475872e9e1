"""Real SIGTERM, SIGINT and SIGHUP to real `meraudiod` processes at many moments: during
start-up, mid-utterance, while the worker transcribes a backlog, during the drain after stdin
ends, with MQTT on a dead port or a real broker, with a live HTTP audio socket, and to
`analyze`. Each stop must be prompt (well within systemd's 90 s), exit as promised (`run`:
0; an `analyze` that left work undone: 1, saying what in one line), print no traceback, and
leave the store whole: every recording with its audio, nothing heard before the signal
lost, no job left `running`.

A signal in the first hundredths of a second meets the interpreter itself starting (SIGTERM
kills, SIGINT is a KeyboardInterrupt in its own imports): nothing of ours has run, nothing
is written. The moments tried start at 0.3 s."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile

from meraudiod.audio import decode_file
from meraudiod.wording import counted

from .broker import Broker, Subscriber, free_port
from .conftest import DEMO, DEMO_TRUTH, StartWyoming, db_rows, run_daemon, stored_audio, wait_for
from .httpd import TOKEN, HttpDaemon
from .test_locked_database import WORKER_PAUSED_ON_ITS_JOB, Output, paused
from .wedged_mic import IN_READ

PCM = decode_file(DEMO).astype("<i2").tobytes()  # 16 kHz s16le: 32,000 bytes a second
STOP_S = 30.0  # a stop must end the process within this (systemd waits 90 s, then SIGKILLs)
HEARD_S = 2.5  # an utterance that ended this long before the signal has been heard whole


class Process:
    """A `meraudiod` process whose stderr is read on a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        stderr = proc.stderr
        assert stderr is not None
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(x.decode(errors="replace") for x in stderr),
            name="stderr-reader",
            daemon=True,
        )
        self._reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until the daemon logs `ready:` (models loaded, listening)."""

        def ready() -> bool:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr}"
            return any("ready:" in x for x in self.lines)

        wait_for(ready, timeout_s, "the daemon to be ready", poll_s=0.05)

    def wait_handlers(self, timeout_s: float = 30) -> None:
        """Until the process catches SIGTERM (SigCgt in /proc/PID/status), the first thing
        it does: a signal before that, in the interpreter's own start (0.3 s and more on a
        loaded machine), gets the kernel's default action, as any process's would."""
        term_bit = 1 << (signal.SIGTERM - 1)

        def caught() -> bool:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr}"
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            mask = next(x for x in status.splitlines() if x.startswith("SigCgt:"))
            return bool(int(mask.split()[1], 16) & term_bit)

        wait_for(caught, timeout_s, "its signal handlers", poll_s=0.005)

    def stop(self, *signals: signal.Signals, between_s: float = 0.0) -> tuple[int, float]:
        """Send the signals (a second one `between_s` later, as an impatient admin or a
        second `systemctl stop` would), wait for the end; the exit code and how long the stop
        took. Fails if the process does not end within STOP_S."""
        asked_at = time.monotonic()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(between_s)
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"{signals} did not stop it in {STOP_S} s: {self.stderr}"
            ) from None
        self._reader.join(10)
        assert "Traceback" not in self.stderr, self.stderr
        return code, time.monotonic() - asked_at


def stop_server(server: HttpDaemon) -> int:
    """SIGTERM an HTTP daemon and wait STOP_S; one that does not stop is killed, and the
    test fails."""
    try:
        return server.stop(timeout_s=STOP_S)
    except subprocess.TimeoutExpired:
        assert server.proc is not None
        server.proc.kill()
        server.stop()
        raise AssertionError(f"not stopped in {STOP_S} s: {server.log()[-3000:]}") from None


def assert_store_whole(env: dict[str, str]) -> list[dict[str, object]]:
    """Every recording has its audio (or was transcribed and let go), no job is left
    running, no half-written file is left; the recordings, in order."""
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    if not (data_dir / "meraudiod.db").is_file():
        return []  # stopped before the store was opened
    rows = [dict(r) for r in db_rows(env, "SELECT * FROM recordings ORDER BY start_s")]
    for row in rows:
        if row["audio_path"] is None:
            assert row["status"] != "pending", row
        else:
            path = stored_audio(env, str(row["audio_path"]))
            assert soundfile.info(path).frames > 0, row
    assert not db_rows(env, "SELECT id FROM jobs WHERE state='running'")
    assert not list(data_dir.rglob("*.part"))
    return rows


def assert_heard_kept(rows: list[dict[str, object]], heard_s: float) -> None:
    """Each utterance of the demo heard whole before the signal is one recording; the one
    under way, when well begun, is saved from its start."""
    for truth in DEMO_TRUTH:
        if truth["start_s"] + 1.0 > heard_s:
            break
        whole = truth["end_s"] + HEARD_S < heard_s
        kept = [
            r
            for r in rows
            if float(str(r["start_s"])) <= truth["start_s"] + 0.3
            and (not whole or float(str(r["end_s"])) >= truth["end_s"] - 0.1)
        ]
        if whole or truth["start_s"] + HEARD_S < heard_s:
            assert kept, (truth, heard_s, rows)


def moments(rounds: int, low_s: float, high_s: float, seed: str) -> list[float]:
    """`rounds` moments: the earliest and latest, then random ones between (seeded by the
    test, so a failure can be run again)."""
    rng = random.Random(seed)
    return [low_s, high_s, *(rng.uniform(low_s, high_s) for _ in range(rounds - 2))]


# --- analyze -----------------------------------------------------------------------------


def _analyze(env: dict[str, str], *files: Path) -> Process:
    return Process(
        subprocess.Popen(
            [sys.executable, "-m", "meraudiod", "analyze", *map(str, files)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )


def test_analyze_stopped_mid_file_stops_at_once_and_says_what_it_left(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Before, Ctrl-C went on reading the file to its end (a 24-minute file: some 200
    recordings saved after the signal, 6-9 s here, a long meeting's minutes), then printed
    them without their text and exited 0 without a word: to a script, a whole result."""
    long = tmp_path / "long.wav"
    soundfile.write(long, np.tile(decode_file(DEMO), 40), 16000)  # 24 minutes
    run = _analyze(env, long, DEMO)
    count = "SELECT COUNT(*) AS n FROM recordings"

    def saved() -> int:
        try:
            return int(db_rows(env, count)[0]["n"])
        except Exception:  # no database (or table) yet
            return 0

    wait_for(saved, 120, "the first recording of the long file", poll_s=0.02)
    at_signal = saved()
    code, took_s = run.stop(signal.SIGINT)
    assert code == 1, run.stderr
    assert took_s < 20.0, took_s  # the job in hand, then out (a loaded machine is slow)
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted: {long} read to "), run.stderr
    assert "1 of 2 files not read" in last
    rows = assert_store_whole(env)
    # Those not transcribed are counted (none when the job in hand was the only one saved,
    # as on a loaded machine that read little before the signal).
    pending = sum(row["status"] == "pending" for row in rows)
    left = f"{counted(pending, 'recording')} not transcribed (left for the daemon)"
    assert (left in last) if pending else ("not transcribed" not in last), (pending, last)
    assert len(rows) <= at_signal + 10, len(rows)  # read on for a moment (it was ~200)
    # What was stored is printed, each recording once.
    assert run.proc.stdout is not None
    printed = run.proc.stdout.read().decode().splitlines()
    assert printed[0].startswith(f"{long} (") and len(printed) == 1 + len(rows), printed


def test_analyze_stopped_while_it_transcribes_leaves_the_rest_to_the_daemon(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Ctrl-C with the worker on the first recording and more saved behind it (the worker
    held on its job until the signal, so the count is certain): that job is finished, the
    others stay `pending` for a daemon on this data directory, and the last line counts
    them."""
    long = tmp_path / "long.wav"
    soundfile.write(long, np.tile(decode_file(DEMO), 4), 16000)  # 2.4 minutes, 20 utterances
    count = "SELECT COUNT(*) AS n FROM recordings"
    with paused(WORKER_PAUSED_ON_ITS_JOB, ["analyze", str(long)], env) as (proc, go):
        out = Output(proc.stderr)
        wait_for(lambda: int(db_rows(env, count)[0]["n"]) >= 3, 120, "three recordings saved")
        proc.send_signal(signal.SIGINT)
        go()
        code = proc.wait(timeout=60)
    out.join()
    assert code == 1, out.text
    rows = assert_store_whole(env)
    pending = sum(row["status"] == "pending" for row in rows)
    assert rows[0]["status"] == "done" and pending == len(rows) - 1 >= 2, rows
    last = out.text.strip().splitlines()[-1]
    assert last.startswith("error: interrupted: "), out.text
    assert last.endswith(f", {pending} recordings not transcribed (left for the daemon)") or (
        last == f"error: interrupted: {pending} recordings not transcribed (left for the daemon)"
    ), out.text


def test_analyze_stopped_at_any_moment(env: dict[str, str]) -> None:
    """SIGTERM or Ctrl-C while it starts, loads its models, reads or transcribes. Before,
    a SIGTERM in the second of imports before its handlers killed it without a word."""
    for i, delay_s in enumerate(moments(4, 0.0, 3.0, "analyze")):
        run = _analyze(env, DEMO)
        run.wait_handlers()
        time.sleep(delay_s)
        code, _ = run.stop(signal.SIGTERM if i % 2 else signal.SIGINT)
        lines = run.stderr.strip().splitlines()
        if code:  # stopped before the end: said in one line
            assert code == 1 and len(lines) == 1, (delay_s, run.stderr)
            assert lines[0].startswith("error: interrupted: "), (delay_s, lines)
        assert_store_whole(env)


# --- run -----------------------------------------------------------------------------------


def test_run_stopped_at_any_moment_of_its_start(env: dict[str, str]) -> None:
    """Before or while the models load, with a SIGHUP before the stop or a second signal
    after it: 0, at once, nothing half done."""
    for i, delay_s in enumerate(moments(5, 0.0, 3.0, "start")):
        daemon = Process(run_daemon(env, source="demo"))
        daemon.wait_handlers()
        time.sleep(delay_s)
        if i % 2:
            daemon.proc.send_signal(signal.SIGHUP)  # a reload asked for while it starts
        first = (signal.SIGTERM, signal.SIGINT)[i % 2]
        second = (signal.SIGINT, signal.SIGTERM)[i % 2]
        code, took_s = daemon.stop(first, second, between_s=0.1 * i)
        assert code == 0, (delay_s, daemon.stderr)
        assert took_s < 15, (delay_s, took_s)
        assert_store_whole(env)


@pytest.mark.parametrize(
    ("device", "said", "naming"),
    [
        ("", "did not stop", ("listener of mic:wedged", "WedgedMic.read")),
        ("hung-stop", "did not close", ("ERROR", "mic:hung-stop")),
    ],
    ids=["read", "stream-stop"],
)
def test_run_stopped_while_its_microphone_hangs_in_the_driver(
    env: dict[str, str], device: str, said: str, naming: tuple[str, ...]
) -> None:
    """A driver hung in read() (the listener never sees its stop), or in PortAudio's stream
    stop (the listener stops, the device's stop() never returns). Before, the daemon's stop
    waited for it for ever (systemd SIGKILLs after TimeoutStopSec=30, losing what was in
    memory); now it is given a bounded wait, said in one line naming it (and where a
    listener is stuck), and the rest closes as usual: the heartbeat says stopped, exit 0."""
    daemon = Process(
        subprocess.Popen(
            [sys.executable, "-m", "tests.wedged_mic", "run", "--source", "mic"],
            env={**env, "MERAUDIOD_AUDIO__DEVICE": device} if device else env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    )
    daemon.wait_ready()
    if not device:  # stopped once the listener hangs (on a loaded machine, "ready:" came first
        # and the stop reached the listener before its first read: a clean stop, not this one)
        wait_for(lambda: IN_READ in daemon.stderr, 60, "the listener in read()", 0.05)
    code, took_s = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.stderr
    assert took_s < 20, took_s  # well within the unit's TimeoutStopSec=30
    lines = [line for line in daemon.lines if said in line]
    assert len(lines) == 1 and all(word in lines[0] for word in naming), daemon.stderr
    heartbeat = json.loads(
        (Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "heartbeat.json").read_text()
    )
    assert heartbeat["at"] == 0.0, heartbeat  # the last write of the stop was made


def _feed_live(proc: subprocess.Popen[bytes], written_s: list[float]) -> threading.Thread:
    """The demo on the daemon's stdin at real time, as a microphone delivers it."""

    def feed() -> None:
        assert proc.stdin is not None
        started = time.monotonic()
        block = 3200  # 0.1 s
        try:
            for offset in range(0, len(PCM), block):
                proc.stdin.write(PCM[offset : offset + block])
                proc.stdin.flush()
                written_s[0] = (offset + block) / 32000
                time.sleep(max(0.0, started + written_s[0] - time.monotonic()))
        except (BrokenPipeError, ValueError):  # the daemon has stopped
            pass

    thread = threading.Thread(target=feed, name="stdin-speech", daemon=True)
    thread.start()
    return thread


def test_run_stopped_mid_speech_keeps_what_was_heard(env: dict[str, str], tmp_path: Path) -> None:
    """Speech arriving live, stopped at random moments (mid-utterance or between), by
    SIGTERM, SIGINT or both: every utterance heard before the signal is stored with its
    audio, the one under way from its start. The rounds run side by side (each is mostly
    speech played at real time up to its moment), each a daemon of its own on a fresh data
    directory, so each is judged alone."""

    def stopped_at(i: int, delay_s: float) -> None:
        round_env = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(tmp_path / f"round-{i}")}
        daemon = Process(run_daemon(round_env))
        try:
            daemon.wait_ready()
            written_s = [0.0]
            feeder = _feed_live(daemon.proc, written_s)
            time.sleep(delay_s)
            heard_s = written_s[0]
            signals = [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGTERM)]
            code, took_s = daemon.stop(*signals[i % 3], between_s=0.2)
            feeder.join(10)
        finally:
            if daemon.proc.poll() is None:  # failed before its stop: not left running
                daemon.proc.kill()
                daemon.proc.wait()
        assert code == 0, daemon.stderr
        assert took_s < 15, took_s
        assert_heard_kept(assert_store_whole(round_env), heard_s)

    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="stop-round") as pool:
        rounds = [
            pool.submit(stopped_at, i, delay_s)
            for i, delay_s in enumerate(moments(3, 2.0, 12.0, "speech"))
        ]
    for done in rounds:
        done.result()  # a round's failure, raised here


def _last_status(watcher: Subscriber) -> bytes | None:
    said = watcher.on("/status")
    return said[-1].payload if said else None


@pytest.mark.parametrize("mqtt", ["off", "dead port", "broker"])
def test_run_stopped_in_its_backlog_or_drain(
    env: dict[str, str], tmp_path: Path, mqtt: str
) -> None:
    """The whole demo at once and stdin closed: stopped while the worker transcribes the
    backlog or while the run drains it, with MQTT off, connecting to a port nobody listens
    on, or on a real Mosquitto (which then holds `offline`). Whatever was stored stays
    whole; what was not transcribed stays pending."""
    broker = Broker(tmp_path / "broker") if mqtt == "broker" else None
    if broker is not None:
        broker.start()
    port = broker.port if broker is not None else free_port()
    if mqtt != "off":
        env = {
            **env,
            "MERAUDIOD_MQTT__ENABLED": "true",
            "MERAUDIOD_MQTT__HOST": "127.0.0.1",
            "MERAUDIOD_MQTT__PORT": str(port),
            "MERAUDIOD_MQTT__NODE_ID": "stop-test",
        }
    try:
        watcher = Subscriber(port, ["meraudiod/stop-test/status"]) if broker else None
        for i, delay_s in enumerate(moments(2, 0.3, 3.0, f"drain {mqtt}")):
            daemon = Process(run_daemon(env))
            daemon.wait_ready()
            assert daemon.proc.stdin is not None
            daemon.proc.stdin.write(PCM)
            daemon.proc.stdin.close()
            time.sleep(delay_s)
            code, took_s = daemon.stop((signal.SIGTERM, signal.SIGINT)[i % 2])
            assert code == 0, daemon.stderr
            assert took_s < 15, took_s
            rows = assert_store_whole(env)
            assert {r["status"] for r in rows} <= {"done", "pending", "suspect"}, rows
            # What is left is said (a stop said nothing of it; `run` on a terminal showed
            # `4 recordings, 1 transcribed` and no more).
            left = sum(r["status"] == "pending" for r in rows)
            said = (
                f"stopped with {counted(left, 'recording')} left to transcribe:"
                " transcribed at the next start"
            )
            assert (said in daemon.stderr) == (left > 0), (left, daemon.stderr)
            if watcher is not None:
                watcher.wait_for(lambda: _last_status(watcher) == b"offline", 10)
        if watcher is not None:
            watcher.close()
    finally:
        if broker is not None:
            broker.stop()
    # Stored once each, none lost: the last round's drain has transcribed every one, or
    # left it pending for the next start.
    assert len(rows) >= len(DEMO_TRUTH)


def test_run_stopped_while_a_live_audio_socket_speaks(env: dict[str, str]) -> None:
    """SIGTERM mid-utterance on /ws/audio: the socket's listener saves what it heard."""
    import websockets

    server = HttpDaemon(env).start()
    cut_s = (DEMO_TRUTH[1]["start_s"] + DEMO_TRUTH[1]["end_s"]) / 2
    samples = decode_file(DEMO)[: int(cut_s * 16000)]
    url = server.url.replace("http://", "ws://") + "/ws/audio"

    async def speak_then_stop() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with websockets.connect(url, additional_headers=headers) as audio:
            for start in range(0, samples.size, 3200):  # 0.2 s messages, at 4x real time
                await audio.send(samples[start : start + 3200].astype("<i2").tobytes())
                await asyncio.sleep(0.05)
            # Heard: the second utterance's start comes back (a listener behind the client,
            # as on a loaded machine, has not heard it yet a second after the last message).
            starts = 0
            while starts < 2:
                event = json.loads(await asyncio.wait_for(audio.recv(), STOP_S))
                if event.get("topic") == "event/speech" and event["type"] == "start":
                    starts += 1
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            try:
                while True:
                    await asyncio.wait_for(audio.recv(), STOP_S)
            except websockets.ConnectionClosed:
                pass

    asked_at = time.monotonic()
    try:
        asyncio.run(speak_then_stop())
    finally:
        code = stop_server(server)
    assert time.monotonic() - asked_at < 60
    assert code == 0 and "Traceback" not in server.log(), server.log()
    rows = [r for r in assert_store_whole(env) if str(r["source"]).startswith("ws:")]
    assert len(rows) == 2, rows  # the first utterance, and the second up to the cut
    assert float(str(rows[1]["start_s"])) < DEMO_TRUTH[1]["start_s"] + 0.3


def test_run_stopped_while_an_upload_stalls_mid_body(env: dict[str, str]) -> None:
    """SIGTERM while a client's upload has sent half its body and waits: the stop's grace
    (5 s) ends it. Before, uvicorn's cancelling of the request was logged as an `Exception
    in ASGI application` with two tracebacks, as if the daemon had failed."""
    server = HttpDaemon(env).start()
    audio = DEMO.read_bytes()
    head = (
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="demo.flac"\r\n'
        b"Content-Type: audio/flac\r\n\r\n"
    )
    length = len(head) + len(audio) + len(b"\r\n--XX--\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(
            f"POST /api/v1/analysis/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
            f"\r\nContent-Type: multipart/form-data; boundary=XX\r\nContent-Length: {length}"
            "\r\n\r\n".encode()
            + head
            + audio[: len(audio) // 2]
        )
        uploads = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "uploads"
        wait_for(lambda: list(uploads.glob("*.part")), 30, "the upload to be received")
        asked_at = time.monotonic()
        code = stop_server(server)
    assert time.monotonic() - asked_at < 15
    log = server.log()
    assert code == 0 and "Traceback" not in log, log
    assert "request cancelled on stopping" in log, log
    assert not assert_store_whole(env)  # nothing stored of half an upload


def _upload_until_taken(env: dict[str, str], long: Path, config: str = "") -> HttpDaemon:
    """A daemon serving HTTP, given `long` as an upload, once the worker has taken its job."""
    server = HttpDaemon(env, config).start()
    with server.client() as client, long.open("rb") as audio:
        answer = client.post("/api/v1/analysis/upload", files={"file": ("long.flac", audio)})
    assert answer.status_code == 202, answer.text
    running = "SELECT id FROM jobs WHERE state='running'"
    wait_for(lambda: db_rows(env, running), 30, "the upload's job to be taken")
    return server


def test_run_stopped_while_it_transcribes_a_long_upload(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A 10-minute upload takes the worker a minute here (a Pi's, ten): before, SIGTERM
    waited for it whole, past the unit's TimeoutStopSec=30, so systemd SIGKILLed the daemon
    and each such stop counted a crash against the recording (three: failed for good).
    Audio longer than one Whisper window is now given back on a stop, no attempt counted."""
    long = tmp_path / "ten-minutes.flac"
    soundfile.write(long, np.tile(decode_file(DEMO), 17)[: 16000 * 600], 16000)
    server = _upload_until_taken(env, long)
    time.sleep(1.0)  # well into it
    asked_at = time.monotonic()
    code = stop_server(server)
    assert time.monotonic() - asked_at < 15
    assert code == 0 and "Traceback" not in server.log(), server.log()
    assert_store_whole(env)
    jobs = [dict(r) for r in db_rows(env, "SELECT state, attempts, crashes FROM jobs")]
    assert jobs == [{"state": "pending", "attempts": 0, "crashes": 0}], jobs


def _importing_numpy(pid: int) -> bool:
    """numpy's core is mapped: the command's modules are loading (the process has ended:
    nothing more to wait for)."""
    try:
        return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_ctrl_c_while_a_command_loads_is_one_line(env: dict[str, str]) -> None:
    """Ctrl-C while an admin command's modules are still loading (half a second here, more
    on a Pi). Before, a KeyboardInterrupt traceback through numpy's imports: click, which
    says `Aborted!`, was not running yet."""
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "meraudiod", "recordings", "list"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(partial(_importing_numpy, proc.pid), 30, "the import of numpy", poll_s=0.002)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=STOP_S)
        assert proc.returncode == 1 and "Traceback" not in stderr.decode(), stderr.decode()
        assert stderr.decode().strip() == "Aborted!", stderr.decode()


def test_signals_until_it_exits_never_kill_it(env: dict[str, str]) -> None:
    """SIGTERM, SIGINT and SIGHUP every 10 ms from the stop to the exit (an impatient admin,
    a reload asked for meanwhile). Before, one that came once the daemon had stopped, while
    the interpreter freed the models, met the default actions it had put back: killed, exit
    -15 (-2, -1) instead of 0."""
    storm = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for round_ in range(3):
        daemon = Process(run_daemon(env))
        daemon.wait_ready()
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        sent = 0
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            daemon.proc.send_signal(storm[sent % 3])
            sent += 1
            time.sleep(0.01)
        code, _ = daemon.stop()
        assert code == 0, (round_, sent, daemon.stderr)


def test_run_stopped_while_it_finds_the_speakers_of_a_long_upload(
    env: dict[str, str], speaker_models: Path, tmp_path: Path
) -> None:
    """With speakers and diarization on, the speaker analysis of a long upload takes three
    times its transcription here (a 10-minute one: 196 s after 30 s): before, a SIGTERM
    there waited it out, past TimeoutStopSec. It is given up too, its job given back."""
    long = tmp_path / "three-minutes.flac"
    soundfile.write(long, np.tile(decode_file(DEMO), 6)[: 16000 * 180], 16000)
    env = {
        **env,
        "MERAUDIOD_SPEAKERS__ENABLED": "true",
        "MERAUDIOD_DIARIZATION__ENABLED": "true",
    }
    server = _upload_until_taken(env, long, '[logging]\nlevel = "DEBUG"\n')
    # Its transcription done (9 s here), the speakers begun (60 s): a fixed wait once
    # stopped it while a loaded machine still transcribed, and tested that instead.
    wait_for(lambda: "its speakers next" in server.log(), 120, "the speaker analysis")
    time.sleep(1.0)
    asked_at = time.monotonic()
    code = stop_server(server)
    assert time.monotonic() - asked_at < 15
    assert code == 0 and "Traceback" not in server.log(), server.log()
    assert "given back: speaker analysis given up" in server.log(), server.log()
    jobs = [dict(r) for r in db_rows(env, "SELECT state, attempts, crashes FROM jobs")]
    assert jobs == [{"state": "pending", "attempts": 0, "crashes": 0}], jobs


def test_a_stop_during_a_wyoming_request_uses_up_no_attempt(
    env: dict[str, str], start_wyoming: StartWyoming
) -> None:
    """SIGTERM while the worker waits on a Wyoming server (stopped with SIGSTOP): the
    request is abandoned at once, as before, but it counted a failed attempt against the
    recording, so three restarts during requests left it `failed` for good."""
    from .test_wyoming import hung_server_daemon

    slow = {"MERAUDIOD_ASR__WYOMING__DEADLINE_BASE_S": "120"}
    with hung_server_daemon(env, start_wyoming, **slow) as (_, run_env, proc):
        running = "SELECT id FROM jobs WHERE state='running'"
        wait_for(lambda: db_rows(run_env, running), 120, "a request in flight")
        time.sleep(1.0)  # well inside the request, far from its deadline
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=STOP_S)
        assert proc.returncode == 0 and b"Traceback" not in stderr, stderr.decode()
    jobs = [dict(r) for r in db_rows(run_env, "SELECT state, attempts, error FROM jobs")]
    assert jobs and all(j["state"] == "pending" and j["attempts"] == 0 for j in jobs), jobs
