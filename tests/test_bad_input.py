"""Truncated and lying input: what can be decoded is used, the error says where and why, a
finished run leaves no job pending, and every input gets the same error contract."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from meraudiod.audio import decode_file

from .conftest import DEMO, TEST_DATA, cli, db_rows


@pytest.fixture
def bad(tmp_path: Path) -> dict[str, Path]:
    """Damaged copies of real recordings, and files that lie."""
    data = DEMO.read_bytes()
    wav = (TEST_DATA / "librivox_0880.wav").read_bytes()
    flipped = bytearray(data)
    rng = random.Random(1)
    for _ in range(200):
        flipped[rng.randrange(2000, len(flipped))] ^= 0xFF
    pcm = (np.random.default_rng(0).standard_normal(16000) * 3000).astype(np.int16).tobytes()
    one_hz = (  # 32 KB of samples whose header says 1 Hz: "16,000 s of audio"
        b"RIFF"
        + struct.pack("<I", 36 + len(pcm))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 1, 2, 2, 16)
        + b"data"
        + struct.pack("<I", len(pcm))
        + pcm
    )
    files = {
        "cut.flac": data[: len(data) // 2],
        "cut.wav": wav[: len(wav) // 2],
        "flipped.flac": bytes(flipped),
        "random.flac": rng.randbytes(50_000),
        "empty.flac": b"",
        "one_hz.wav": one_hz,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in files}


def test_analyze_of_a_cut_file_prints_its_recordings_and_where_it_was_cut(
    env: dict[str, str], bad: dict[str, Path]
) -> None:
    result = cli("analyze", str(bad["cut.flac"]), env=env)
    assert result.returncode == 1
    assert "cut.flac is cut at 17.4 s" in result.stderr and "Traceback" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  [")]
    assert len(lines) >= 2 and "dashwood" in result.stdout.lower()
    stored = db_rows(env, "SELECT status FROM recordings")
    assert len(stored) == len(lines) and all(r["status"] == "done" for r in stored)


def test_a_damaged_file_gives_what_it_can_and_says_so(
    env: dict[str, str], bad: dict[str, Path]
) -> None:
    result = cli("analyze", "--json", str(bad["flipped.flac"]), str(bad["cut.wav"]), env=env)
    assert result.returncode == 1
    flipped, cut = [json.loads(line) for line in result.stdout.splitlines()]
    assert flipped["recordings"] and "of the 35.7 s its header announces" in flipped["error"]
    assert "gave 1.5 s of the 3.0 s its header announces" in cut["error"]


def test_run_on_a_cut_file_transcribes_what_came_before_and_leaves_no_job_pending(
    env: dict[str, str], bad: dict[str, Path]
) -> None:
    result = cli("run", "--source", f"file:{bad['cut.flac']}", env=env)
    assert result.returncode == 1 and "cut at 17.4 s" in result.stderr
    jobs = db_rows(env, "SELECT state FROM jobs")
    assert jobs and all(j["state"] == "done" for j in jobs)


def encode(pcm: np.ndarray, path: Path, codec: str) -> None:
    """16 kHz int16 audio encoded by FFmpeg's libraries as PyAV ships them (the ones the
    daemon decodes with; no ffmpeg program needed). FFmpeg's own Vorbis encoder (PyAV has no
    libvorbis) is marked experimental and takes two channels only: the mono audio twice."""
    layout = "stereo" if codec == "vorbis" else "mono"
    samples = np.repeat(pcm[:, None], 2, axis=1) if layout == "stereo" else pcm[:, None]
    with av.open(str(path), "w") as out:
        rate = 48000 if codec == "libopus" else 16000  # Opus has no 16 kHz of its own
        stream = out.add_stream(codec, rate=rate, layout=layout, options={"strict": "experimental"})
        for start in range(0, len(samples), 1600):  # 0.1 s a frame, as a program feeds it
            block = np.ascontiguousarray(samples[start : start + 1600].reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
            frame.sample_rate, frame.pts = 16000, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_a_cut_mp3_or_ogg_is_said_naming_it(env: dict[str, str], tmp_path: Path) -> None:
    """MP3, Ogg Vorbis and Opus files made by FFmpeg (PyAV's), then cut: FFmpeg decodes them to the
    cut without a word, and `analyze` and `run` exited 0 with half the audio (one cut 1 s
    in: 0 recordings, exit 0). The MP3's Xing header counts its frames, an Ogg stream ends
    with an end-of-stream page: a cut is now one error line naming the file, what was
    decoded still used; the whole files are not taken for cut ones."""
    pcm = decode_file(DEMO)[: 12 * 16000]
    files = []
    for ext, codec in (("mp3", "libmp3lame"), ("ogg", "vorbis"), ("opus", "libopus")):
        whole = tmp_path / f"whole.{ext}"
        encode(pcm, whole, codec)
        data = whole.read_bytes()
        for name, size in ((f"half.{ext}", len(data) // 2), (f"head.{ext}", 3000)):
            (tmp_path / name).write_bytes(data[:size])
        files += [whole, tmp_path / f"half.{ext}", tmp_path / f"head.{ext}"]
    paged = tmp_path / "paged.ogg"  # cut between two pages: every page whole, no end page
    ogg = (tmp_path / "whole.ogg").read_bytes()
    paged.write_bytes(ogg[: ogg.rindex(b"OggS")])
    files.append(paged)
    quick = {**env, "MERAUDIOD_ASR__ENABLED": "false"}  # the audio is what is judged
    result = cli("analyze", "--json", *map(str, files), env=quick)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    found = {Path(r["file"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for name, report in found.items():
        if name.startswith("whole"):
            assert "error" not in report and report["recordings"], report
            continue
        assert "cut" in report["error"], report
        assert len([e for e in errors if name in e]) == 1, (name, result.stderr)
        if name.startswith("half"):
            assert report["recordings"] and 4 < report["duration_s"] < 8, report
    assert "no end-of-stream page" in found["paged.ogg"]["error"], found["paged.ogg"]
    assert len(errors) == 7, result.stderr
    run = cli("run", "--source", f"file:{tmp_path / 'half.ogg'}", env=quick)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "half.ogg" in last and "cut" in last, run.stderr


@pytest.mark.parametrize("name", ["random.flac", "empty.flac", "one_hz.wav"])
def test_files_with_no_real_audio_are_errors_naming_them(
    env: dict[str, str], bad: dict[str, Path], name: str
) -> None:
    analyzed = cli("analyze", str(bad[name]), env=env)
    assert analyzed.returncode == 1 and name in analyzed.stderr
    assert "Traceback" not in analyzed.stderr
    run = cli("run", "--source", f"file:{bad[name]}", env=env)
    assert run.returncode == 1 and name in run.stderr and "Traceback" not in run.stderr
    if name == "one_hz.wav":
        assert "1 Hz" in analyzed.stderr
    assert db_rows(env, "SELECT id FROM recordings") == []


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("missing", "audio file not found"),
        ("directory", "is a directory"),
        ("fifo", "is not a regular file"),
        ("device", "is not a regular file"),
    ],
)
def test_a_path_that_is_not_an_audio_file_says_what_it_is(
    env: dict[str, str], tmp_path: Path, kind: str, said: str
) -> None:
    """A directory, a pipe (reading it would block) or /dev/zero (it never ends) given as the
    file: one line saying what the path is, before anything is read from it."""
    path = {
        "missing": tmp_path / "absent.flac",
        "directory": tmp_path,
        "device": Path("/dev/zero"),
    }.get(kind, tmp_path / "pipe")
    if kind == "fifo":
        os.mkfifo(path)
    for args in (["analyze", str(path)], ["run", "--source", f"file:{path}"]):
        result = cli(*args, env=env)
        assert result.returncode == 1, result.stderr
        assert said in result.stderr and str(path) in result.stderr
        assert "Traceback" not in result.stderr


def test_analyze_of_files_none_of_which_can_be_read_says_so_before_loading_a_model(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A mistyped name: `analyze` made the data directory and loaded the models (a second
    and more of CPU on a small board) before it said the file was not there. Now the files
    are checked first: none readable, each is said at once and nothing is loaded or made;
    one readable among them, the rest are said in their turn as before."""
    absent, folder = tmp_path / "absent.flac", tmp_path
    done = cli("analyze", "--json", str(absent), str(folder), env=env)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {absent}: audio file not found",
        f"error: {folder}: is a directory, not an audio file",
    ]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["file"], x["recordings"], x["error"]) for x in lines] == [
        (str(absent), [], f"{absent}: audio file not found"),
        (str(folder), [], f"{folder}: is a directory, not an audio file"),
    ]
    assert not Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).exists()  # nothing made either
    mixed = cli("analyze", str(absent), str(TEST_DATA / "librivox_0880.wav"), env=env)
    assert mixed.returncode == 1 and "young man" in mixed.stdout.lower(), mixed.stderr
    assert mixed.stderr.splitlines()[-1] == f"error: {absent}: audio file not found"


def test_run_on_a_file_that_is_not_there_says_so_before_loading_a_model(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`run --source file:` with a mistyped name loaded Whisper, the VAD and made the data
    directory (two seconds of CPU on a small board) before it said the file was not there; with
    a model missing too it named only the model. Now the path is checked first."""
    absent = tmp_path / "absent.flac"
    no_model = {**env, "MERAUDIOD_ASR__MODEL": str(tmp_path / "no-such-model")}
    said = cli("run", "--source", f"file:{absent}", env=no_model)
    assert said.returncode == 1, said.stderr
    assert said.stderr.splitlines() == [f"Error: {absent}: audio file not found"], said.stderr
    assert not Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).exists()  # nothing made either


def test_a_relative_file_source_is_the_current_directorys(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`--source file:sub/a.flac` is read from the directory the command runs in, as any
    command's argument; the source is stored (and an error says it) by its whole path: the
    stored `file:sub/a.flac` said nothing of where that was. In the file, where it would be
    taken from / under systemd, it is refused as every relative path there is."""
    (tmp_path / "sub").mkdir()
    shutil.copy(TEST_DATA / "ls_103_0000.flac", tmp_path / "sub" / "a.flac")

    def run(spec: str) -> subprocess.CompletedProcess[str]:
        return cli("run", "--source", spec, env=env, cwd=tmp_path)

    done = run("file:sub/a.flac")
    assert done.returncode == 0, done.stderr
    sources = {r["source"] for r in db_rows(env, "SELECT source FROM recordings")}
    assert sources == {f"file:{tmp_path}/sub/a.flac"}, sources
    for spec, said in (
        ("file:sub/absent.flac", f"{tmp_path}/sub/absent.flac: audio file not found"),
        ("file:sub", f"{tmp_path}/sub: is a directory"),
        ("file:" + "a" * 300 + ".wav", f"{tmp_path}/{'a' * 300}.wav: file name too long"),
        ("file:~nosuchuser/a.wav", "~nosuchuser/a.wav: no home directory for ~nosuchuser"),
    ):
        refused = run(spec)
        assert refused.returncode == 1, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {said}"), refused.stderr
    # analyze FILE...: the same file the same way, in its output and in the store (they
    # said `sub/a.flac`, and the recording's source `file:sub/a.flac`).
    for leftover in Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).glob("meraudiod.db*"):
        leftover.unlink()
    analyzed = cli("analyze", "--json", "sub/a.flac", "sub/absent.flac", env=env, cwd=tmp_path)
    assert analyzed.returncode == 1, analyzed.stderr
    found = [json.loads(line) for line in analyzed.stdout.splitlines()]
    assert [f["file"] for f in found] == [f"{tmp_path}/sub/a.flac", f"{tmp_path}/sub/absent.flac"]
    assert found[0]["recordings"] and "error" not in found[0], found[0]
    assert found[1]["error"] == f"{tmp_path}/sub/absent.flac: audio file not found", found[1]
    assert analyzed.stderr.strip() == f"error: {found[1]['error']}", analyzed.stderr
    sources = {r["source"] for r in db_rows(env, "SELECT source FROM recordings")}
    assert sources == {f"file:{tmp_path}/sub/a.flac"}, sources
    shown = cli("analyze", "sub/a.flac", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{tmp_path}/sub/a.flac ("), shown.stdout
    Path(env["MERAUDIOD_CONFIG"]).write_text('[audio]\nsource = "file:sub/a.flac"\n')
    check = cli("config", "check", env=env)
    assert check.returncode != 0 and "audio.source" in check.stderr, check.stderr
    assert "must be an absolute path" in check.stderr, check.stderr


def wav_bytes(samples: np.ndarray, rate_hz: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate_hz, format="WAV", subtype="PCM_16")
    return out.getvalue()


def run_stdin(env: dict[str, str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    """`meraudiod run --source stdin` with these bytes piped in, unchanged."""
    return subprocess.run(
        [sys.executable, "-m", "meraudiod", "run", "--source", "stdin"],
        env=env,
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_a_wav_file_on_stdin_is_told_apart_from_raw_pcm(env: dict[str, str]) -> None:
    speech = decode_file(TEST_DATA / "librivox_0880.wav")
    wrong_rate = np.repeat(speech, 3)  # 48 kHz
    refused = run_stdin(env, wav_bytes(wrong_rate, 48000))
    assert refused.returncode == 1
    assert b"WAV file of 48000 Hz, 1 channel, 16-bit" in refused.stderr
    assert b"Traceback" not in refused.stderr
    assert db_rows(env, "SELECT id FROM recordings") == []
    fitting = run_stdin(env, wav_bytes(speech, 16000))
    assert fitting.returncode == 0, fitting.stderr.decode()
    (rec,) = db_rows(env, "SELECT text FROM recordings")
    assert "young man" in rec["text"].lower()


@pytest.mark.parametrize("original", [DEMO, TEST_DATA / "librivox_0880.wav"])
def test_a_file_named_in_latin1_is_transcribed(
    env: dict[str, str], tmp_path: Path, original: Path
) -> None:
    # "Küche.flac" copied from a Latin-1 system: libsndfile was handed the name as UTF-8
    # (a UnicodeEncodeError traceback for analyze), and the recording's source, "file:"
    # and the name, could not be stored (the listener failed, nothing was transcribed).
    path = tmp_path / os.fsdecode(b"K\xfcche" + original.suffix.encode())
    path.write_bytes(original.read_bytes())
    python = os.fsencode(sys.executable)
    for args in (
        [b"analyze", b"--json", os.fsencode(path)],
        [b"run", b"--source", b"file:" + os.fsencode(path)],
    ):
        done = subprocess.run(
            [python, b"-m", b"meraudiod", *args], env=env, capture_output=True, timeout=180
        )
        stderr = done.stderr.decode(errors="replace")
        assert done.returncode == 0 and "Traceback" not in stderr, stderr
    sources = {row["source"] for row in db_rows(env, "SELECT source FROM recordings")}
    assert sources == {f"file:{tmp_path}/K\\xfcche{original.suffix}"}, sources
    states = {row["status"] for row in db_rows(env, "SELECT status FROM recordings")}
    assert states == {"done"}, states


def test_run_on_a_closed_stdin_is_one_line(env: dict[str, str]) -> None:
    # Started with standard input closed (a supervisor's `<&-`): the reader thread died of an
    # AttributeError traceback and the daemon said "no audio from stdin for 5 s" for ever.
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -m meraudiod run --source stdin 0<&-', sys.executable],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    # One line, as the README says: it was the listener's ERROR, then "ready: listening on
    # stdin", then the same error again (two lines on a terminal too).
    assert done.stderr.strip() == "Error: cannot read stdin: standard input is closed", done.stderr


def test_a_cut_file_is_said_once(env: dict[str, str], bad: dict[str, Path]) -> None:
    # Found walking the README ("Errors are one line"): the listener logged the cut at ERROR
    # and `analyze` or `run` then said it again as their error line, so a person saw it twice.
    for args in (("analyze",), ("run", "--print", "--source")):
        target = str(bad["cut.wav"]) if args[0] == "analyze" else f"file:{bad['cut.wav']}"
        result = cli(*args, target, env=env)
        assert result.returncode == 1, result.stderr
        said = [line for line in result.stderr.splitlines() if "header announces" in line]
        assert len(said) == 1 and said[0].lower().startswith("error: "), result.stderr


def test_a_symbolic_link_loop_is_said_as_one(env: dict[str, str], tmp_path: Path) -> None:
    """`ln -s a a` given as the audio file was "audio file not found" (pathlib's is_file()
    swallows ELOOP): it is there, a link that never ends. Said so in one line naming its
    whole path, for `run --source file:` and `analyze` alike, exit 1; a loop further up its
    path says so too."""
    (tmp_path / "a").symlink_to("a")
    (tmp_path / "b").symlink_to("c")
    (tmp_path / "c").symlink_to("b")

    def meraudiod(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, env=env, cwd=tmp_path)

    for name, said in (
        ("a", "is a symbolic link loop"),
        ("b", "is a symbolic link loop"),
        ("b/x.wav", "is under a symbolic link loop"),
    ):
        line = f"{tmp_path}/{name}: {said}"
        ran = meraudiod("run", "--source", f"file:{name}")
        assert ran.returncode == 1, ran.stderr
        assert ran.stderr.strip().splitlines() == [f"Error: {line}"], ran.stderr
        analyzed = meraudiod("analyze", name)
        assert analyzed.returncode == 1, analyzed.stderr
        assert analyzed.stderr.strip().splitlines() == [f"error: {line}"], analyzed.stderr
    # The configuration file too ("config file not found" before).
    checked = meraudiod("config", "check", "--config", str(tmp_path / "a"))
    assert checked.returncode == 1, checked.stderr
    assert f"config file is a symbolic link loop: {tmp_path}/a" in checked.stderr, checked.stderr
    assert "Traceback" not in checked.stderr
