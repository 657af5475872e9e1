"""Listeners never share VAD state, a reopened microphone never gets a second listener beside
a stuck one, and a listener keeps no list that grows for the life of the daemon."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from meraudiod.config import Settings
from meraudiod.daemon import Daemon
from meraudiod.db import open_db
from meraudiod.mic_source import MicSource
from meraudiod.microphone import AudioSupervisor
from meraudiod.pipeline import Pipeline
from meraudiod.sources import FileSource

from .conftest import DEMO, DEMO_TRUTH, wait_for
from .wedged_mic import FailingHungStopMic, HungStopMic, WedgedMic


def spans(settings: Settings, rec_ids: list[str]) -> list[tuple[float, float]]:
    conn = open_db(settings.storage.db_path)
    marks = ",".join("?" * len(rec_ids))
    rows = conn.execute(
        f"SELECT start_s, end_s FROM recordings WHERE id IN ({marks}) ORDER BY start_s", rec_ids
    )
    return [(round(r[0], 3), round(r[1], 3)) for r in rows]


def supervised(settings: Settings, mic: MicSource) -> tuple[Pipeline, AudioSupervisor]:
    """An open pipeline (listening only) and a supervisor of `mic` feeding its listener."""
    settings.asr.enabled = False
    pipeline = Pipeline(settings, threading.Event())
    pipeline.open()
    return pipeline, AudioSupervisor(mic, lambda: pipeline.listener(mic), lambda: None)


def test_two_listeners_at_once_hear_what_each_hears_alone(settings: Settings) -> None:
    settings.asr.enabled = False  # only the listening side
    pipeline = Pipeline(settings, threading.Event())
    pipeline.open()
    sources = [FileSource(DEMO) for _ in range(3)]
    for source in sources:
        source.start()
    alone = pipeline.listener(sources[0], keep_ids=True)
    assert alone.finished.wait(120)
    together = [pipeline.listener(source, keep_ids=True) for source in sources[1:]]
    assert all(listener.finished.wait(120) for listener in together)
    expected = spans(settings, alone.recording_ids or [])
    assert len(expected) == len(DEMO_TRUTH)
    for listener in together:
        assert spans(settings, listener.recording_ids or []) == expected
    # A microphone's listener keeps a count, not a list of every recording it made.
    source = FileSource(DEMO)
    source.start()
    mic_like = pipeline.listener(source)
    assert mic_like.finished.wait(120)
    assert mic_like.recording_ids is None and mic_like.recordings_saved == len(DEMO_TRUTH)


def test_a_reopen_never_starts_a_second_listener_beside_a_stuck_one(settings: Settings) -> None:
    settings.asr.enabled = False
    mic = WedgedMic()
    daemon = Daemon(settings, mic, threading.Event())
    daemon.start()
    try:
        assert mic.reading.wait(30), "the listener never read"
        assert daemon.listener is not None and daemon.listener.is_alive()
        daemon.audio.check(time.monotonic() + 60)  # no frame for a minute: reopen
        listeners = [t for t in threading.enumerate() if t.name == "listener" and t.is_alive()]
        assert len(listeners) == 1
    finally:
        mic.released.set()
        daemon.stop()


def test_a_mute_and_unmute_with_a_wedged_listener(settings: Settings) -> None:
    """Muting closes the microphone: a listener hung in the driver held that close (the
    main loop, and so the daemon) for ever. Now it is left behind after a bounded wait, and
    the unmute starts no second listener beside it; once the driver lets go, one is."""
    mic = WedgedMic()
    pipeline, audio = supervised(settings, mic)
    audio.open(time.monotonic())
    assert mic.reading.wait(30), "the listener never read"
    closing = threading.Thread(target=audio.close, name="mute", daemon=True)
    closing.start()
    closing.join(20)
    assert not closing.is_alive(), "the mute hangs on the wedged listener"
    audio.open(time.monotonic())  # unmuted
    listeners = [t for t in threading.enumerate() if t.name == "listener" and t.is_alive()]
    assert len(listeners) == 1
    assert audio.problem is not None and "does not stop" in audio.problem
    mic.released.set()
    wait_for(
        lambda: (
            audio.check(time.monotonic() + 60)
            or (audio.listener is not None and audio.listener is not listeners[0])
        ),
        30,
        "a new listener once the driver lets go",
    )
    mic.released.set()
    audio.close()
    pipeline.close()


def test_a_wedged_listener_is_one_error_then_reminders_that_space_out(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by fault injection: a driver that hangs in read() logged "the listener of ...
    does not stop; not reopening yet" at ERROR (and "no audio ...; reopening it" at WARNING)
    at every backoff, every 60 s for as long as it hung. Now as a missing microphone: one
    ERROR, each retry at DEBUG, a WARNING reminder after 1 min, 2, 4 ... (at most hourly),
    one INFO when it lets go. Three hours of retries on a clock that ends now."""
    mic = WedgedMic()
    pipeline, audio = supervised(settings, mic)
    caplog.set_level(logging.DEBUG, logger="meraudiod.microphone")
    start = time.monotonic() - 3 * 3600
    audio.open(start)
    assert mic.reading.wait(30), "the listener never read"
    began = time.monotonic()
    for second in range(1, 3 * 3600):
        audio.check(start + second)
        # The main loop is not held 5 s at each retry (it was: 15 min for this loop).
        assert time.monotonic() - began < 30, f"held: {second} s in"
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meraudiod.microphone"]
    errors = [m for level, m in said if level >= logging.ERROR]
    assert len(errors) == 1 and "mic:wedged does not stop" in errors[0], errors
    retries = [m for level, m in said if level == logging.DEBUG]
    assert len(retries) > 150, len(retries)
    reminders = [m for level, m in said if level == logging.WARNING and "after" in m]
    assert len([m for level, m in said if level == logging.WARNING]) == len(reminders) + 1, said
    minutes = [int(m.split("after ")[1].split(" min")[0]) for m in reminders]
    gaps = [b - a for a, b in zip([0, *minutes], minutes, strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 32, 60], minutes  # then one an hour
    assert all("mic:wedged still does not stop" in m for m in reminders), reminders
    caplog.clear()

    mic.released.set()  # the driver lets go: the listener ends, a new one is started
    wait_for(
        lambda: (
            audio.check(time.monotonic())
            or (
                audio.listener is not None
                and audio.listener.is_alive()
                and "stopped" in caplog.text
            )
        ),
        30,
        "the listener to be replaced",
    )
    back = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert back[0][0] == "INFO" and "mic:wedged stopped" in back[0][1], back
    audio.close()
    pipeline.close()


def test_a_microphone_that_fails_to_open_and_hangs_in_its_stop(settings: Settings) -> None:
    """A device whose start fails (unplugged mid-open) and whose stop() then hangs in the
    driver: the failed open's clean-up called stop() with no limit and held the main loop
    (and so the daemon's stop) for ever. Now it is waited for a bounded time, like every
    other stop(), and not opened again until it returns."""
    mic = FailingHungStopMic()
    pipeline, audio = supervised(settings, mic)
    call = threading.Thread(target=audio.open, args=(time.monotonic(),), name="open", daemon=True)
    call.start()
    call.join(20)
    assert not call.is_alive(), "the failed open hangs in the source's stop()"
    assert mic.stopping.is_set() and mic.starts == 1
    audio.check(time.monotonic() + 60)  # its retry is due, but its stop() still hangs
    assert mic.starts == 1, "opened again while its stop() still runs"
    mic.released.set()
    audio.close()
    pipeline.close()


def test_a_reopen_and_a_mute_with_a_stream_stop_that_hangs(settings: Settings) -> None:
    """A driver hung in PortAudio's stream stop held the main loop for ever: in the reopen
    after a stall and in a mute. Now each waits for it a bounded time, says it, and opens the
    device again only once that stop() has returned."""
    mic = HungStopMic()
    pipeline, audio = supervised(settings, mic)
    audio.open(time.monotonic())
    for step in ("reopen", "mute"):
        if step == "reopen":  # no frame for a minute: closed and reopened
            call = threading.Thread(
                target=lambda: audio.check(time.monotonic() + 60), name=step, daemon=True
            )
        else:
            call = threading.Thread(target=audio.close, name=step, daemon=True)
        call.start()
        call.join(20)
        assert not call.is_alive(), f"the {step} hangs in the source's stop()"
        assert mic.stopping.is_set()
        assert mic.starts == 1, "opened again while its stop() still runs"
    audio.open(time.monotonic())  # unmuted while the stop() still hangs: not opened
    assert mic.starts == 1 and audio.problem == "mic:hung-stop does not close", audio.problem
    mic.released.set()  # the driver lets go: the next check opens it
    wait_for(
        lambda: audio.check(time.monotonic() + 60) or mic.starts == 2,
        30,
        "the microphone opened again once its stop() returned",
    )
    audio.close()
    pipeline.close()
