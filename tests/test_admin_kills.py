"""The admin commands killed (real SIGKILLs) at several moments on a data directory of real
recordings: nothing is lost, what is deleted is deleted, and what a kill interrupted is
either whole, not done at all, or finished by running the command again (or the next start
of the daemon), as the README promises."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import pytest

from .conftest import DEMO, SUITE_SETTINGS, TEST_DATA, cli, wait_for

CLIPS = [DEMO, *(TEST_DATA / f"ls_{n}.flac" for n in ("3080_0000", "2609_0000", "2609_0001"))]
SHORT = TEST_DATA / "ls_103_0000.flac"  # one utterance: a quick real start of the daemon
# A year of a room's transcripts in the index (filler segments beside the real ones): the
# full-text index then takes as long to merge after a delete as it does on a device.
FILLER_SEGMENTS = 60_000
FILLER_IDX = 1000  # filler segments' idx from here on: the real ones come before
Env = dict[str, str]


def _env(data_dir: Path, models_dir: Path) -> Env:
    config = data_dir.parent / "config.toml"
    config.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MERAUDIOD_")}
    return {
        **base,
        "MERAUDIOD_CONFIG": str(config),
        "MERAUDIOD_STORAGE__DATA_DIR": str(data_dir),
        "MERAUDIOD_STORAGE__MODELS_DIR": str(models_dir),
        "MERAUDIOD_SPEAKERS__ENABLED": "true",
        **SUITE_SETTINGS,
    }


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, speaker_models: Path) -> Path:
    """A data directory of real recordings: the demo's five (one reader, unknown-1) and three
    LibriSpeech clips (unknown-2, and unknown-3 twice), analysed with speakers on."""
    data_dir = tmp_path_factory.mktemp("stored") / "data"
    done = cli("analyze", *map(str, CLIPS), env=_env(data_dir, speaker_models))
    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(data_dir / "meraudiod.db")
    (holder,) = conn.execute(  # unknown-2's: the tests delete others
        "SELECT id FROM recordings WHERE source LIKE '%ls_3080_0000%'"
    ).fetchone()
    rng = random.Random(7)
    vocabulary = ["".join(rng.choices("bcdfghjklmnpqrstvwxz", k=7)) for _ in range(5000)]
    with conn:
        conn.executemany(
            "INSERT INTO segments (recording_id, idx, start_s, end_s, text) VALUES (?, ?, 0, 1, ?)",
            (
                (holder, FILLER_IDX + i, " ".join(rng.choices(vocabulary, k=10)))
                for i in range(FILLER_SEGMENTS)
            ),
        )
    with conn:
        conn.execute("INSERT INTO segments_fts(segments_fts) VALUES ('optimize')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return data_dir


@pytest.fixture
def fresh(stored: Path, tmp_path: Path, speaker_models: Path) -> Callable[[], Env]:
    """A new copy of the stored data directory per call (one per kill point)."""
    copies = iter(range(1000))

    def make() -> Env:
        data_dir = tmp_path / f"copy{next(copies)}" / "data"
        shutil.copytree(stored, data_dir)
        return _env(data_dir, speaker_models)

    return make


def rows(env: Env, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def audio_dir(env: Env) -> Path:
    return Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "audio"


def words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]{6,}", text)}


def spoken(env: Env, rec_ids: list[str]) -> set[str]:
    """Words only these recordings hold (in no other recording's text)."""
    texts = {r["id"]: r["text"] or "" for r in rows(env, "SELECT id, text FROM recordings")}
    theirs = set().union(*(words(texts[i]) for i in rec_ids))
    others = set().union(*(words(t) for i, t in texts.items() if i not in rec_ids))
    return theirs - others


def killed(env: Env, args: list[str], when: Callable[[], bool], what: str) -> int | None:
    """Run `meraudiod ARGS` and SIGKILL it once `when()` holds; 0 if it ended first (the
    moment came too late), None if it was killed. Ended first with another code, it fails
    with what the command said (its stderr goes to a file: a pipe nobody reads while it
    runs could fill and stall it)."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meraudiod", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            wait_for(lambda: proc.poll() is not None or when(), 60, what, poll_s=0.002)
            code = proc.poll()
        finally:
            proc.send_signal(signal.SIGKILL)  # no chance to finish or to clean up
            proc.wait(timeout=10)
        if code is None:
            return None
        stderr.seek(0)
        said = stderr.read().decode(errors="replace")
    assert code == 0, f"`meraudiod {' '.join(args)}` exited with {code} before {what}: {said}"
    return code


def after(delay_s: float) -> Callable[[], bool]:
    start = time.monotonic()
    return lambda: time.monotonic() - start >= delay_s


def count_is(env: Env, sql: str, test: Callable[[int], bool]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return test(int(rows(env, sql)[0][0]))
        except sqlite3.OperationalError:  # locked for a moment
            return False

    return check


def files_gone(env: Env, rec_ids: list[str], n: int) -> Callable[[], bool]:
    paths = [audio_dir(env) / r["audio_path"] for r in _audio_rows(env, rec_ids)]
    return lambda: sum(not p.exists() for p in paths) >= n


def _audio_rows(env: Env, rec_ids: list[str]) -> list[sqlite3.Row]:
    marks = ",".join("?" * len(rec_ids))
    return rows(env, f"SELECT id, audio_path FROM recordings WHERE id IN ({marks})", tuple(rec_ids))


def holds(env: Env, allow_missing_audio: Collection[str] = ()) -> None:
    """The invariants after any kill: a sound database whose full-text index agrees with the
    segments, no row pointing at a missing recording or speaker, no audio file without its
    recording, no recording whose audio is gone (but those allowed), and status works."""
    assert rows(env, "PRAGMA integrity_check")[0][0] == "ok"
    rows(env, "INSERT INTO segments_fts(segments_fts) VALUES ('integrity-check')")
    for seg in rows(env, f"SELECT id, text FROM segments WHERE idx < {FILLER_IDX}"):
        for word in words(seg["text"]):
            found = rows(env, "SELECT rowid FROM segments_fts WHERE segments_fts MATCH ?", (word,))
            assert seg["id"] in {r[0] for r in found}, (word, seg["text"])
    orphans = {
        "segments": "SELECT COUNT(*) FROM segments WHERE recording_id NOT IN"
        " (SELECT id FROM recordings) OR (speaker_id IS NOT NULL AND speaker_id NOT IN"
        " (SELECT id FROM speakers))",
        "mappings": "SELECT COUNT(*) FROM speaker_mappings WHERE recording_id NOT IN"
        " (SELECT id FROM recordings) OR (speaker_id IS NOT NULL AND speaker_id NOT IN"
        " (SELECT id FROM speakers))",
        "embeddings": "SELECT COUNT(*) FROM speaker_embeddings WHERE speaker_id NOT IN"
        " (SELECT id FROM speakers) OR (recording_id IS NOT NULL AND recording_id NOT IN"
        " (SELECT id FROM recordings))",
        "jobs": "SELECT COUNT(*) FROM jobs WHERE recording_id NOT IN (SELECT id FROM recordings)",
    }
    for table, sql in orphans.items():
        assert rows(env, sql)[0][0] == 0, f"{table} point at what is gone"
    named = {
        r["audio_path"]: r["id"]
        for r in rows(env, "SELECT id, audio_path FROM recordings WHERE audio_path IS NOT NULL")
    }
    on_disk = {p.relative_to(audio_dir(env)).as_posix() for p in audio_dir(env).rglob("*.flac")}
    assert on_disk <= set(named), f"audio without its recording: {on_disk - set(named)}"
    missing = {named[p] for p in set(named) - on_disk}
    assert missing <= set(allow_missing_audio), f"recordings whose audio is gone: {missing}"
    status = cli("status", env=env)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr


def forgotten(env: Env, gone_words: set[str], moment: str = "") -> None:
    """Deleted words are in neither the index nor the database's files (the README's
    "a test greps the database files for a deleted word")."""
    for word in gone_words:
        assert not rows(env, "SELECT rowid FROM segments_fts WHERE segments_fts MATCH ?", (word,))
    data_dir = Path(env["MERAUDIOD_STORAGE__DATA_DIR"])
    raw = b"".join(p.read_bytes() for p in data_dir.glob("meraudiod.db*")).lower()
    assert not {w for w in gone_words if w.encode() in raw}, (
        f"deleted words in the database file ({moment})"
    )


def demo_ids(env: Env) -> list[str]:
    return [r["id"] for r in rows(env, "SELECT id FROM recordings WHERE source LIKE '%demo%'")]


def moment(env: Env, rec_ids: list[str], name: str) -> Callable[[], bool]:
    """When to kill a delete of these recordings: half its audio files gone (inside its
    transaction), its rows gone (committed, the index not merged yet), or after a delay
    ("0.3 s": the process is starting, reading, or done)."""
    if name == "half the audio files gone":
        return files_gone(env, rec_ids, max(1, len(rec_ids) // 2))
    if name == "the rows gone":
        marks = ",".join(f"'{i}'" for i in rec_ids)  # ULIDs: letters and digits only
        sql = f"SELECT COUNT(*) FROM recordings WHERE id IN ({marks})"
        return count_is(env, sql, lambda n: n == 0)
    return after(float(name.split()[0]))


DELETE_MOMENTS = ("half the audio files gone", "the rows gone", "0.3 s", "0.45 s")


def killed_deletes(
    fresh: Callable[[], Env],
    ids_of: Callable[[Env], list[str]],
    args_of: Callable[[list[str]], list[str]],
    moments: tuple[str, ...] = DELETE_MOMENTS,
) -> Iterator[tuple[str, Env, list[str], set[str]]]:
    """For each moment: a fresh copy, the delete killed then, the invariants checked (the
    recordings being deleted may have lost their audio); yields (moment, env, the ids, the
    words only they held)."""
    for name in moments:
        env = fresh()
        rec_ids = ids_of(env)
        gone_words = spoken(env, rec_ids)
        assert rec_ids and gone_words
        killed(env, args_of(rec_ids), moment(env, rec_ids, name), name)
        holds(env, allow_missing_audio=set(rec_ids))
        yield name, env, rec_ids, gone_words


def test_recordings_delete_killed_anywhere_is_finished_by_running_it_again(
    fresh: Callable[[], Env],
) -> None:
    for name, env, rec_ids, gone_words in killed_deletes(
        fresh, lambda env: demo_ids(env)[:3], lambda ids: ["recordings", "delete", *ids]
    ):
        again = cli("recordings", "delete", *rec_ids, env=env)
        assert "Traceback" not in again.stderr, again.stderr
        assert not _audio_rows(env, rec_ids), name
        holds(env)
        forgotten(env, gone_words, name)


def test_a_delete_killed_before_its_words_left_the_index_is_finished_by_the_next_start(
    fresh: Callable[[], Env],
) -> None:
    """Found by killing `recordings delete` once its rows were committed: the full-text index
    is merged after the commit, so a kill in between (0.06 s with 60,000 segments) left
    the deleted words in the database file for good, since the same delete run again found
    no row and merged nothing. A mark committed with the rows now says the merge is due; the
    next delete, or the next start of the daemon, does it."""
    for name, env, _, gone_words in killed_deletes(
        fresh,
        lambda env: demo_ids(env)[3:],
        lambda ids: ["recordings", "delete", *ids],
        moments=("the rows gone",),
    ):
        quiet = {**env, "MERAUDIOD_ASR__ENABLED": "false", "MERAUDIOD_SPEAKERS__ENABLED": "false"}
        started = cli("run", "--source", f"file:{SHORT}", env=quiet)
        assert started.returncode == 0, started.stderr
        holds(env)
        forgotten(env, gone_words, name)


def speaker_ids(env: Env, name: str) -> list[str]:
    return [
        r[0]
        for r in rows(
            env,
            "SELECT DISTINCT m.recording_id FROM speaker_mappings m JOIN speakers p"
            " ON p.id = m.speaker_id WHERE p.name = ?",
            (name,),
        )
    ]


def test_speakers_delete_with_recordings_killed_anywhere_is_finished_by_running_it_again(
    fresh: Callable[[], Env],
) -> None:
    args = ["speakers", "delete", "unknown-1", "--recordings"]
    for name, env, rec_ids, gone_words in killed_deletes(
        fresh, lambda env: speaker_ids(env, "unknown-1"), lambda ids: args
    ):
        assert len(rec_ids) == 5
        again = cli(*args, env=env)
        assert "Traceback" not in again.stderr, again.stderr
        assert not _audio_rows(env, rec_ids), name
        assert not rows(env, "SELECT 1 FROM speakers WHERE name='unknown-1'"), name
        holds(env)
        forgotten(env, gone_words, name)


def aged(env: Env, rec_ids: list[str], days: float) -> None:
    conn = sqlite3.connect(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db")
    with conn:
        for rec_id in rec_ids:
            conn.execute(
                "UPDATE recordings SET started_at = started_at - ? WHERE id=?",
                (days * 86400, rec_id),
            )
    conn.close()


def old_demo(env: Env) -> list[str]:
    rec_ids = demo_ids(env)
    aged(env, rec_ids, 40)
    return rec_ids


def test_purge_killed_anywhere_is_finished_by_running_it_again(fresh: Callable[[], Env]) -> None:
    for args, ids_of in (
        (["purge", "--older-than", "30", "--yes"], old_demo),
        (["purge", "--speaker", "unknown-3", "--yes"], lambda env: speaker_ids(env, "unknown-3")),
    ):
        for name, env, rec_ids, gone_words in killed_deletes(
            fresh,
            ids_of,
            lambda _, a=args: a,
            moments=DELETE_MOMENTS[:3],
        ):
            again = cli(*args, env=env)
            assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
            assert not _audio_rows(env, rec_ids), (args, name)
            holds(env)
            forgotten(env, gone_words, name)


def test_purge_of_audio_killed_when_its_files_are_gone_is_finished_by_running_it_again(
    fresh: Callable[[], Env],
) -> None:
    args = ["purge", "--older-than", "30", "--audio-only", "--yes"]
    for name in ("all the audio files gone", "half the audio files gone", "0.4 s"):
        env = fresh()
        rec_ids = old_demo(env)
        texts = {r["id"]: r["text"] for r in _texts(env, rec_ids)}
        when = (
            files_gone(env, rec_ids, len(rec_ids))
            if name.startswith("all")
            else moment(env, rec_ids, name)
        )
        killed(env, args, when, name)
        holds(env, allow_missing_audio=set(rec_ids))
        again = cli(*args, env=env)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
        holds(env)  # no row names audio that is gone
        assert not [r for r in _audio_rows(env, rec_ids) if r["audio_path"]], name
        assert {r["id"]: r["text"] for r in _texts(env, rec_ids)} == texts  # the text stays


def _texts(env: Env, rec_ids: list[str]) -> list[sqlite3.Row]:
    marks = ",".join("?" * len(rec_ids))
    return rows(env, f"SELECT id, text FROM recordings WHERE id IN ({marks})", tuple(rec_ids))


def profiles(env: Env) -> dict[str, tuple[str, int, int]]:
    """name: (id, embeddings, recordings mapped to it)."""
    return {
        r["name"]: (r["id"], r["embeddings"], r["mapped"])
        for r in rows(
            env,
            "SELECT p.id, p.name,"
            " (SELECT COUNT(*) FROM speaker_embeddings e WHERE e.speaker_id = p.id) AS embeddings,"
            " (SELECT COUNT(*) FROM speaker_mappings m WHERE m.speaker_id = p.id) AS mapped"
            " FROM speakers p",
        )
    }


def test_speakers_merge_killed_anywhere_is_whole_or_not_done(fresh: Callable[[], Env]) -> None:
    args = ["speakers", "merge", "unknown-2", "unknown-3"]
    for name in ("0.3 s", "0.4 s", "0.5 s", "the source gone"):
        env = fresh()
        before = profiles(env)
        (_, src_embeddings, src_mapped) = before["unknown-2"]
        (dst_id, dst_embeddings, dst_mapped) = before["unknown-3"]
        src_gone = count_is(
            env, "SELECT COUNT(*) FROM speakers WHERE name='unknown-2'", lambda n: n == 0
        )
        killed(
            env,
            args,
            src_gone if name == "the source gone" else after(float(name.split()[0])),
            name,
        )
        holds(env)
        now = profiles(env)
        merged = {
            **before,
            "unknown-3": (dst_id, src_embeddings + dst_embeddings, src_mapped + dst_mapped),
        }
        del merged["unknown-2"]
        assert now in (before, merged), name  # whole or not at all
        if now == before:
            assert cli(*args, env=env).returncode == 0
        assert profiles(env) == merged, name
        holds(env)


def test_speakers_rename_killed_anywhere_is_whole_or_not_done(fresh: Callable[[], Env]) -> None:
    args = ["speakers", "rename", "unknown-3", "Carol"]
    for name in ("0.3 s", "0.4 s", "0.5 s"):
        env = fresh()
        before = profiles(env)
        killed(env, args, after(float(name.split()[0])), name)
        holds(env)
        renamed = {("Carol" if k == "unknown-3" else k): v for k, v in before.items()}
        assert profiles(env) in (before, renamed), name
        if profiles(env) == before:
            assert cli(*args, env=env).returncode == 0
        assert profiles(env) == renamed
        assert rows(env, "SELECT provisional FROM speakers WHERE name='Carol'")[0][0] == 0


def test_export_killed_anywhere_leaves_no_partial_file_under_its_name(
    fresh: Callable[[], Env], tmp_path: Path
) -> None:
    for name in ("the first file written", "0.35 s", "0.45 s"):
        env = fresh()
        out = tmp_path / f"out-{name}"
        rec_ids = demo_ids(env)
        sources = {
            Path(r["audio_path"]).name: (audio_dir(env) / r["audio_path"]).read_bytes()
            for r in _audio_rows(env, rec_ids)
        }
        args = ["recordings", "export", *rec_ids, "--out", str(out)]
        first = written(out) if name.startswith("the") else after(float(name.split()[0]))
        killed(env, args, first, name)
        complete(out, sources)
        assert cli(*args, env=env).returncode == 0
        complete(out, sources)
        assert {p.name for p in out.glob("*.flac")} == set(sources)
        assert {p.stem for p in out.glob("*.json")} == set(rec_ids)
        holds(env)


def test_an_export_removes_the_temporary_files_of_a_killed_one(
    fresh: Callable[[], Env], tmp_path: Path
) -> None:
    """An export killed while it copied left `.ID.flac.PID.part` in the folder for good (too
    quick to kill reliably here: the file of a process that is gone stands for it). The next
    export of that recording removes it, and leaves a live export's alone."""
    env = fresh()
    rec_id = demo_ids(env)[0]
    (row,) = _audio_rows(env, [rec_id])
    name = Path(row["audio_path"]).name
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    out = tmp_path / "out"
    out.mkdir()
    killed_part = out / f".{name}.{int(gone.stdout)}.part"
    live_part = out / f".{name}.{os.getpid()}.part"  # this process is alive
    for part in (killed_part, live_part):
        part.write_bytes(b"half a file")
    assert cli("recordings", "export", rec_id, "--out", str(out), env=env).returncode == 0
    assert not killed_part.exists() and live_part.exists()
    assert (out / name).read_bytes() == (audio_dir(env) / row["audio_path"]).read_bytes()


def written(out: Path) -> Callable[[], bool]:
    return lambda: out.is_dir() and any(out.iterdir())


def complete(out: Path, sources: dict[str, bytes]) -> None:
    """Every file under its final name is whole: the audio byte for byte, the JSON parses."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.name.startswith("."):
            continue  # a temporary file of a killed export, never under a final name
        if path.suffix == ".flac":
            assert path.read_bytes() == sources[path.name], path
        else:
            assert json.loads(path.read_text())["id"] == path.stem, path


def running_for(env: Env, delay_s: float) -> Callable[[], bool]:
    """True once a reprocess job has been running for delay_s, while it still runs."""
    running = count_is(
        env, "SELECT COUNT(*) FROM jobs WHERE state='running' AND kind='retranscribe'", bool
    )
    since: list[float] = []

    def check() -> bool:
        if not since and running():
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] >= delay_s and running()

    return check


def test_a_daemon_killed_while_it_transcribes_again_loses_nothing(fresh: Callable[[], Env]) -> None:
    for delay_s in (0.0, 0.4):
        env = fresh()
        rec_id = demo_ids(env)[0]
        text_sql = f"SELECT text FROM segments WHERE recording_id='{rec_id}' ORDER BY idx"
        said = [r[0] for r in rows(env, text_sql)]
        assert cli("reprocess", rec_id, env=env).returncode == 0
        mid_way = running_for(env, delay_s)
        # None: killed; 0: the job was done before the moment came (a fast machine)
        ended = killed(env, ["run", "--source", f"file:{SHORT}"], mid_way, "a reprocess running")
        assert ended in (None, 0), ended
        # Killed while the job ran, it is a crash; done in the moment between the look and
        # the kill (the test's process not run then, on a loaded machine), it is none.
        (at_kill,) = rows(env, f"SELECT state FROM jobs WHERE recording_id='{rec_id}'")
        assert at_kill["state"] in ("running", "done"), at_kill["state"]
        holds(env)
        assert [r[0] for r in rows(env, text_sql)] == said  # the old transcript stays meanwhile
        started = cli("run", "--source", f"file:{SHORT}", env=env)
        assert started.returncode == 0, started.stderr
        (job,) = rows(env, f"SELECT state, crashes FROM jobs WHERE recording_id='{rec_id}'")
        crashes = 1 if at_kill["state"] == "running" else 0
        assert (job["state"], job["crashes"]) == ("done", crashes)
        assert [r[0] for r in rows(env, text_sql)] == said
        holds(env)


def test_a_do_not_keep_voice_transcribed_again_by_a_killed_daemon_is_deleted_whole(
    fresh: Callable[[], Env],
) -> None:
    """A voice marked "do not keep" after it was transcribed, its recording reprocessed: the
    daemon killed while transcribing, or once the recording's rows are committed gone (its
    words not yet merged out of the index), and started again, has deleted it whole."""
    for name in ("a reprocess running", "the rows gone"):
        env = fresh()
        rec_id = speaker_ids(env, "unknown-3")[0]
        gone_words = spoken(env, [rec_id])
        assert gone_words
        assert cli("speakers", "opt-out", "unknown-3", env=env).returncode == 0
        assert cli("reprocess", rec_id, env=env).returncode == 0
        when = running_for(env, 0.0) if name.startswith("a ") else moment(env, [rec_id], name)
        ended = killed(env, ["run", "--source", f"file:{SHORT}"], when, name)
        assert ended is None, name
        holds(env, allow_missing_audio={rec_id})
        started = cli("run", "--source", f"file:{SHORT}", env=env)
        assert started.returncode == 0, started.stderr
        assert not _audio_rows(env, [rec_id]), name
        holds(env)
        forgotten(env, gone_words, name)
