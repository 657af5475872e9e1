"""Listeners never share VAD state, a reopened microphone never gets a second listener beside
a stuck one, and a listener keeps no list that grows for the life of the daemon."""

from __future__ import annotations

import threading
import time

from meraudiod.config import Settings
from meraudiod.daemon import Daemon
from meraudiod.db import open_db
from meraudiod.mic_source import MicSource
from meraudiod.pipeline import Pipeline
from meraudiod.sources import FileSource

from .conftest import DEMO, DEMO_TRUTH


def spans(settings: Settings, rec_ids: list[str]) -> list[tuple[float, float]]:
    conn = open_db(settings.storage.db_path)
    marks = ",".join("?" * len(rec_ids))
    rows = conn.execute(
        f"SELECT start_s, end_s FROM recordings WHERE id IN ({marks}) ORDER BY start_s", rec_ids
    )
    return [(round(r[0], 3), round(r[1], 3)) for r in rows]


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


class WedgedMic(MicSource):
    """A sound card whose driver hangs: read() never returns, whatever the timeout."""

    def __init__(self) -> None:
        super().__init__(device=None, rate_hz=None, queue_frames=8)
        self.released = threading.Event()
        self.reading = threading.Event()  # the listener is inside read()

    def start(self) -> None:
        self.name = "mic:wedged"

    def read(self, timeout_s: float) -> None:
        self.reading.set()
        self.released.wait()  # ignores timeout_s, as a hung driver call does

    def stop(self) -> None:
        pass


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
