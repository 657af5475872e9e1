"""Audio held in memory (the audio directory could not be written) written to its file once it
can be: once, never for a recording deleted meanwhile, and a process killed at any moment of
it (a real SIGKILL) leaves no file that a row names and that is not whole, and no file of a
deleted recording."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from meraudiod.config import Settings
from meraudiod.db import open_db
from meraudiod.deletion import delete_recordings
from meraudiod.held_audio import (
    finish_held_writes,
    keep_held_on_stop,
    take_back_spilled,
    write_held,
)
from meraudiod.recordings import MemoryAudio, RecordingStore, remove_crashed_writes
from meraudiod.retention import purge

_AUDIO = (np.random.default_rng(0).standard_normal(16000 * 5) * 3000).astype(np.int16)

# Saves one recording with its audio held in memory and prints its id; argv[1] names the
# moment to die at (SIGKILL: no clean-up).
_SAVED_HELD = """
import os, signal, sys
from pathlib import Path
import numpy as np
from meraudiod import held_audio, recordings
from meraudiod.config import load_settings
from meraudiod.db import open_db
from meraudiod.recordings import MemoryAudio, RecordingStore

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

s = load_settings()
conn = open_db(s.storage.db_path)
memory = MemoryAudio()
audio = (np.random.default_rng(0).standard_normal(16000 * 5) * 3000).astype(np.int16)
rec = RecordingStore(conn, s.storage.audio_dir, "flac").save(
    audio, source="t", start_s=0.0, started_at=1.7e9, memory=memory
)
print(rec.id, flush=True)
moment = sys.argv[1]
"""


def _killed(env: dict[str, str], script: str, *args: str) -> str:
    """Runs one of the scripts below to its SIGKILL; the id of the recording it saved."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stdout.strip()


# Then writes it to its file, killing itself at that moment.
_WRITER = (
    _SAVED_HELD
    + """
if moment == "announced":  # its write announced, no file yet
    held_audio.write_audio_atomically = die
elif moment == "part-written":  # the temp file whole and fsynced, not renamed
    recordings.os.replace = die
elif moment == "renamed":  # the file in place, its row not yet naming it
    write = held_audio.write_audio_atomically
    held_audio.write_audio_atomically = lambda *a: (write(*a), die())
held_audio.write_held(conn, s, memory, rec.id)
"""
)


@pytest.mark.parametrize("after", ["kept", "deleted", "audio-purged"])
@pytest.mark.parametrize("moment", ["announced", "part-written", "renamed"])
def test_a_write_of_held_audio_killed_at_any_moment_leaves_no_half_file(
    settings: Settings, env: dict[str, str], moment: str, after: str
) -> None:
    """SIGKILLed while writing held audio, then the recording, or its audio, deleted by
    another process before the next start (or not). The start's recovery leaves no temp
    file, no file no row names, and a row names only a whole file: a file renamed into
    place is named by its recording (nothing lost), or removed with it, or with its audio
    (delete means delete)."""
    rec_id = _killed(env, _WRITER, moment)
    audio_dir = settings.storage.audio_dir
    conn = open_db(settings.storage.db_path)
    if after == "deleted":  # reads no audio path: the row names none yet
        assert delete_recordings(conn, audio_dir, [rec_id]).recordings == 1
    if after == "audio-purged":
        purge(conn, audio_dir, before=time.time(), audio_only=True)
    remove_crashed_writes(conn, audio_dir)
    finish_held_writes(conn, audio_dir)

    files = sorted(p for p in audio_dir.rglob("*") if p.is_file())
    named = [r["audio_path"] for r in conn.execute("SELECT audio_path FROM recordings")]
    if after == "deleted":
        assert files == [] and named == []
        return
    if moment == "renamed" and after == "kept":  # whole and in place: its recording names it
        assert named == [files[0].relative_to(audio_dir).as_posix()], (named, files)
        assert np.array_equal(soundfile.read(files[0], dtype="int16")[0], _AUDIO)
    else:
        assert files == [] and named == [None]
    assert conn.execute("SELECT COUNT(*) FROM kv WHERE key LIKE 'held_audio%'").fetchone()[0] == 0


def _held(settings: Settings, memory: MemoryAudio) -> tuple[RecordingStore, str]:
    store = RecordingStore(open_db(settings.storage.db_path), settings.storage.audio_dir, "flac")
    rec = store.save(_AUDIO, source="t", start_s=0.0, started_at=1.7e9, memory=memory)
    assert rec is not None and rec.audio_path is None
    return store, rec.id


def test_held_audio_is_written_once_as_any_recording_s(settings: Settings) -> None:
    """Written to the file a recording's audio has, named in its row, taken out of memory;
    held again (a second listener), it is not written twice."""
    memory = MemoryAudio()
    store, rec_id = _held(settings, memory)
    assert write_held(store.conn, settings, memory, rec_id)
    assert len(memory) == 0
    (stored,) = store.conn.execute("SELECT audio_path FROM recordings").fetchone()
    assert stored.endswith(f"/{rec_id}.flac")
    path = settings.storage.audio_dir / stored
    assert np.array_equal(soundfile.read(path, dtype="int16")[0], _AUDIO)
    written = path.stat().st_mtime_ns
    memory.put(rec_id, _AUDIO)
    assert not write_held(store.conn, settings, memory, rec_id)
    assert len(memory) == 0 and path.stat().st_mtime_ns == written
    assert [p.name for p in settings.storage.audio_dir.rglob("*") if p.is_file()] == [path.name]


def test_held_audio_of_a_recording_deleted_meanwhile_is_never_written(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted by another process while its file is being written: the file goes before the
    write is done with, and the row is not made again; deleted before, nothing is written."""
    from meraudiod import held_audio

    memory = MemoryAudio()
    store, first = _held(settings, memory)
    _, second = _held(settings, memory)
    other = open_db(settings.storage.db_path)
    write = held_audio.write_audio_atomically

    def deleted_meanwhile(path: Path, samples: np.ndarray, audio_format: str) -> None:
        write(path, samples, audio_format)
        assert path.is_file()
        delete_recordings(other, settings.storage.audio_dir, [first])

    monkeypatch.setattr(held_audio, "write_audio_atomically", deleted_meanwhile)
    assert not write_held(store.conn, settings, memory, first)
    monkeypatch.undo()
    delete_recordings(other, settings.storage.audio_dir, [second])
    assert not write_held(store.conn, settings, memory, second)
    assert len(memory) == 0
    assert [p for p in settings.storage.audio_dir.rglob("*") if p.is_file()] == []
    assert store.conn.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 0


def test_a_transcribed_recording_s_held_audio_follows_keep_audio(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_audio = false: audio of a transcribed recording is not written (it would be
    deleted at once); of one still to be transcribed it is, as any recording's is until its
    transcript is stored."""
    memory = MemoryAudio()
    store, done = _held(settings, memory)
    _, pending = _held(settings, memory)
    store.conn.execute("UPDATE recordings SET status='done' WHERE id=?", (done,))
    store.conn.execute("UPDATE jobs SET state='done' WHERE recording_id=?", (done,))
    monkeypatch.setattr(settings.retention, "keep_audio", False)
    assert not write_held(store.conn, settings, memory, done)
    assert write_held(store.conn, settings, memory, pending)
    rows = dict(store.conn.execute("SELECT id, audio_path FROM recordings").fetchall())
    assert rows[done] is None and rows[pending] is not None
    assert len(memory) == 0


def test_held_audio_deleted_by_an_audio_only_purge_is_never_written(settings: Settings) -> None:
    """`purge --audio-only` over a recording whose audio is held in memory deletes that audio
    too: it is never written (before a purge found no file and its audio came back)."""
    memory = MemoryAudio()
    store, purged = _held(settings, memory)
    other = open_db(settings.storage.db_path)  # another process's purge
    purge(other, settings.storage.audio_dir, before=time.time(), audio_only=True)
    _, kept = _held(settings, memory)
    assert not write_held(store.conn, settings, memory, purged)
    assert write_held(store.conn, settings, memory, kept)
    rows = dict(store.conn.execute("SELECT id, audio_path FROM recordings").fetchall())
    assert rows[purged] is None and rows[kept] is not None
    files = [p.name for p in settings.storage.audio_dir.rglob("*") if p.is_file()]
    assert files == [f"{kept}.flac"]
    assert store.conn.execute("SELECT COUNT(*) FROM kv WHERE key LIKE 'held%'").fetchone()[0] == 0


def test_held_audio_of_recordings_never_transcribed_makes_room_as_transcribed_audio_does(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asr.enabled = false: a recording is finished when saved, its held audio only waits to
    be written, as a transcribed recording's does. Memory full of it, a new recording's audio
    takes the oldest one's room (before, none was ever marked so: every new recording was
    dropped whole); and keep_audio = false, which deletes audio once transcribed, does not
    drop audio that never will be (before: never written, the recording left with nothing)."""
    monkeypatch.setattr(settings.retention, "keep_audio", False)
    memory = MemoryAudio(max_recordings=2)
    store = RecordingStore(open_db(settings.storage.db_path), settings.storage.audio_dir, "flac")
    saved = [
        store.save(
            _AUDIO, source="t", start_s=0.0, started_at=1.7e9, transcribe=False, memory=memory
        )
        for _ in range(3)
    ]
    assert all(rec is not None for rec in saved), memory.dropped
    first, second, third = (rec.id for rec in saved if rec is not None)
    assert memory.ids() == [second, third] and memory.dropped == 0
    marks = store.conn.execute("SELECT key FROM kv WHERE key LIKE 'held_audio:%'").fetchall()
    assert sorted(m[0] for m in marks) == sorted(f"held_audio:{i}" for i in (second, third))
    assert write_held(store.conn, settings, memory, second)
    assert write_held(store.conn, settings, memory, third)
    rows = dict(store.conn.execute("SELECT id, audio_path FROM recordings").fetchall())
    assert rows[first] is None and rows[second] and rows[third]


# Then keeps it in argv[2] as a stopping daemon does, killing itself at that moment.
_SPILLER = (
    _SAVED_HELD
    + """
if moment == "announced":
    held_audio.write_audio_atomically = die
elif moment == "part-written":
    recordings.os.replace = die
elif moment in ("renamed", "kept"):
    write = held_audio.write_audio_atomically
    held_audio.write_audio_atomically = lambda *a: (write(*a), moment == "renamed" and die())
held_audio.spill_held(conn, s, memory, rec.id, Path(sys.argv[2]))
die()
"""
)


@pytest.mark.parametrize(
    ("moment", "after"),
    [
        *(
            (m, a)
            for a in ("kept", "deleted")
            for m in ("announced", "part-written", "renamed", "kept")
        ),
        ("kept", "audio-purged"),
        ("kept", "rebooted"),
    ],
)
def test_audio_kept_over_a_stop_is_taken_back_whole_or_not_at_all(
    settings: Settings,
    env: dict[str, str],
    tmp_path: Path,
    moment: str,
    after: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGKILLed while keeping held audio in the runtime directory (or once it is kept),
    then the recording, or its audio, deleted by another process while it is down (or not).
    The next start takes back into memory only a whole file of a recording that still wants
    it, leaves no file in that directory, and nothing in kv but the mark of what it holds;
    the delete itself removes a kept file (delete means delete). One a reboot took, or
    the kill, is said gone."""
    folder = tmp_path / "run" / "held-audio"
    rec_id = _killed(env, _SPILLER, moment, str(folder))
    audio_dir = settings.storage.audio_dir
    conn = open_db(settings.storage.db_path)
    if moment == "kept":
        assert [p.name for p in folder.iterdir()] == [f"{rec_id}.flac"]
    if after == "deleted":
        assert delete_recordings(conn, audio_dir, [rec_id]).recordings == 1
    if after == "audio-purged":
        purge(conn, audio_dir, before=time.time(), audio_only=True)
    if after == "rebooted":  # the tmpfs emptied
        shutil.rmtree(folder)
    if after != "kept":
        assert not (folder / f"{rec_id}.flac").exists()
    memory = MemoryAudio()
    finish_held_writes(conn, audio_dir)
    taken = take_back_spilled(conn, settings, memory)

    assert not folder.exists() or list(folder.iterdir()) == []
    kv = [r[0] for r in conn.execute("SELECT key FROM kv WHERE key LIKE 'held_audio%'")]
    if moment in ("renamed", "kept") and after == "kept":  # whole: taken back
        assert taken == 1 and memory.ids() == [rec_id]
        assert np.array_equal(memory.get(rec_id), _AUDIO)
        assert kv == [f"held_audio:{rec_id}"]
        assert write_held(conn, settings, memory, rec_id)  # and written as any held audio
        assert [p.name for p in audio_dir.rglob("*") if p.is_file()] == [f"{rec_id}.flac"]
    else:
        assert taken == 0 and memory.ids() == [] and kv == []
    gone = "audio of 1 recording kept over the last stop is gone"
    said = after == "rebooted" or (after == "kept" and moment in ("announced", "part-written"))
    assert (gone in caplog.text) is said, caplog.text


def test_held_audio_that_cannot_be_kept_over_a_stop_is_said_lost_in_one_line(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No runtime directory, or one that cannot be written: the one line of before, saying
    why, and nothing left announced."""
    memory = MemoryAudio()
    store, _ = _held(settings, memory)
    _held(settings, memory)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(blocked))
    keep_held_on_stop(settings, memory)
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    keep_held_on_stop(settings, memory)
    lines = [r.getMessage() for r in caplog.records if "lost on stopping" in r.message]
    assert lines == [
        "audio of 2 recordings held in memory lost on stopping: the audio directory could"
        f" not be written, nor {blocked / 'held-audio'} (Not a directory)",
        "audio of 2 recordings held in memory lost on stopping: the audio directory could"
        " not be written",
    ]
    assert (
        store.conn.execute(
            "SELECT COUNT(*) FROM kv WHERE key GLOB 'held_audio_spilled:*'"
        ).fetchone()[0]
        == 0
    )


def test_a_save_the_locked_database_refused_takes_no_held_audio_s_room(
    settings: Settings,
) -> None:
    """Memory full of held audio only waiting to be written, and another process holding the
    database's write lock: each save that fails (and is tried again, as a live listener does)
    left one more recording's audio dropped from memory, its mark kept by the rollback. A
    failed save now changes nothing; the save that succeeds takes one recording's room,
    whose mark goes with it."""
    memory = MemoryAudio(max_recordings=2)
    store = RecordingStore(open_db(settings.storage.db_path), settings.storage.audio_dir, "flac")
    held = []
    for _ in range(2):
        rec = store.save(
            _AUDIO, source="t", start_s=0.0, started_at=1.7e9, transcribe=False, memory=memory
        )
        assert rec is not None
        held.append(rec.id)
    holder = open_db(settings.storage.db_path)
    holder.execute("BEGIN IMMEDIATE")
    store.conn.execute("PRAGMA busy_timeout=50")
    for _ in range(3):
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.save(_AUDIO, source="t", start_s=0.0, started_at=1.7e9, memory=memory)
        assert memory.ids() == held and memory.dropped == 0
    holder.rollback()
    rec = store.save(_AUDIO, source="t", start_s=0.0, started_at=1.7e9, memory=memory)
    assert rec is not None and memory.ids() == [held[1], rec.id]
    marks = store.conn.execute("SELECT key FROM kv WHERE key LIKE 'held_audio:%'").fetchall()
    assert sorted(m[0] for m in marks) == sorted(f"held_audio:{i}" for i in (held[1], rec.id))
