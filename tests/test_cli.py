"""The `meraudiod` command as an admin and a script use it."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import click
import soundfile

from meraudiod.cli import main

from .conftest import DEMO, DEMO_TRUTH, TEST_DATA, cli, stored_audio


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
    return found


def test_every_command_has_help() -> None:
    for path in all_commands(main):
        command: click.Command = main
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        assert command.help and len(command.help) > 10, path


def test_analyze_json_one_object_per_file_and_bad_files_named(
    env: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "garbage.ogg"
    bad.write_bytes(b"OggS" + bytes(100))
    speech = TEST_DATA / "librivox_0880.wav"
    result = cli("analyze", "--json", str(DEMO), str(bad), str(speech), env=env)
    assert result.returncode == 1
    assert "garbage.ogg" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(DEMO), str(bad), str(speech)]
    demo, broken, short = lines
    assert "garbage.ogg" in broken["error"]
    assert abs(demo["duration_s"] - soundfile.info(DEMO).duration) < 0.05
    assert len(demo["recordings"]) == len(DEMO_TRUTH)
    for rec, truth in zip(demo["recordings"], DEMO_TRUTH, strict=True):
        assert set(rec) >= {"id", "start_s", "end_s", "text", "segments"}
        assert rec["start_s"] <= truth["start_s"] < truth["end_s"] <= rec["end_s"]
        for seg in rec["segments"]:
            assert set(seg) >= {"start_s", "end_s", "text", "speaker"}
            assert rec["start_s"] <= seg["start_s"] < seg["end_s"] <= rec["end_s"] + 0.1
            assert seg["speaker"] is None
    assert "young man" in short["recordings"][0]["text"].lower()


def test_recordings_browse_search_export_delete(env: dict[str, str], tmp_path: Path) -> None:
    assert cli("analyze", str(DEMO), env=env).returncode == 0
    analyzed_by = time.time()
    listed = json.loads(cli("recordings", "list", "--json", env=env).stdout)
    assert len(listed) == 5
    # A file read faster than real time: no recording ends after it was read (the last one
    # was dated 28 s ahead when the file's offsets were added to the time reading began).
    assert all(r["started_at"] + r["duration_s"] <= analyzed_by for r in listed), listed
    assert set(listed[0]) == {"id", "start_s", "end_s", "duration_s", "started_at", "text", "state"}
    assert all(r["state"] == "done" for r in listed)

    hits = json.loads(cli("recordings", "list", "--json", "--search", "amiable", env=env).stdout)
    assert len(hits) == 2 and all("amiable" in h["text"].lower() for h in hits)
    assert (
        json.loads(cli("recordings", "list", "--json", "--search", "zebra", env=env).stdout) == []
    )
    # FTS syntax in user input is not an error
    assert cli("recordings", "list", "--search", 'amiable" OR (', env=env).returncode == 0
    assert json.loads(cli("recordings", "list", "--json", "--since", "1h", env=env).stdout)

    rec_id = hits[0]["id"]
    shown = cli("recordings", "show", rec_id, env=env)
    assert shown.returncode == 0 and "amiable" in shown.stdout and "[" in shown.stdout
    exported = cli("recordings", "export", rec_id, "--out", str(tmp_path / "out"), env=env)
    assert exported.returncode == 0
    data = json.loads((tmp_path / "out" / f"{rec_id}.json").read_text())
    assert data["id"] == rec_id and data["segments"][0]["words"]
    assert soundfile.info(tmp_path / "out" / f"{rec_id}.flac").samplerate == 16000

    audio_path = Path(data["audio_path"])
    assert cli("recordings", "delete", rec_id, env=env).returncode == 0
    assert not audio_path.exists()
    assert (
        len(json.loads(cli("recordings", "list", "--json", "--search", "amiable", env=env).stdout))
        == 1
    )
    assert cli("recordings", "show", rec_id, env=env).returncode != 0
    assert cli("recordings", "delete", "01NOSUCHID", env=env).returncode != 0


def test_failed_job_is_reported_and_the_worker_goes_on(env: dict[str, str]) -> None:
    assert cli("analyze", str(DEMO), env=env).returncode == 0
    db = Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db"
    conn = sqlite3.connect(db)
    first, second = (r[0] for r in conn.execute("SELECT id FROM recordings ORDER BY id LIMIT 2"))
    path = conn.execute("SELECT audio_path FROM recordings WHERE id=?", (first,)).fetchone()[0]
    stored_audio(env, path).write_bytes(b"corrupted on disk")
    conn.execute("UPDATE jobs SET state='pending', attempts=0")
    conn.commit()
    conn.close()
    result = cli("run", "--source", f"file:{TEST_DATA / 'librivox_0880.wav'}", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(cli("jobs", "--json", env=env).stdout)
    (failed,) = [j for j in report["jobs"] if j["state"] == "failed"]
    assert failed["recording_id"] == first and failed["attempts"] == 3
    assert "Error" in failed["error"]
    assert report["counts"]["done"] == 5  # the four good ones again plus the new recording
    listed = {r["id"]: r for r in json.loads(cli("recordings", "list", "--json", env=env).stdout)}
    assert listed[first]["state"] == "failed" and listed[second]["state"] == "done"


def test_models_list_install_verify(env: dict[str, str], tmp_path: Path) -> None:
    listed = json.loads(cli("models", "list", "--json", env=env).stdout)
    names = {m["name"]: m for m in listed}
    assert names["tiny.en"]["installed"] and names["tiny.en"]["configured"]
    assert names["silero-vad-v6"]["role"] == "vad"
    assert cli("models", "verify", env=env).returncode == 0
    own = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(tmp_path / "models")}
    assert cli("models", "install", "silero-vad-v6", env=own).returncode == 0
    onnx = tmp_path / "models" / "silero-vad-v6" / "silero_vad_v6.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"x")  # one byte changed
    result = cli("models", "verify", "silero-vad-v6", env=own)
    assert result.returncode != 0 and "sha256" in result.stderr
    assert cli("models", "install", "silero-vad-v6", env=own).returncode == 0  # repaired
    assert cli("models", "verify", "silero-vad-v6", env=own).returncode == 0
    assert "unknown model" in cli("models", "install", "huge.xx", env=own).stderr


def test_config_check_reports_problems(env: dict[str, str], tmp_path: Path) -> None:
    assert cli("config", "check", env=env).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[recorder]\nhangover_ms = 'long'\n")
    result = cli("config", "check", "--config", str(bad), env=env)
    assert result.returncode != 0 and "recorder.hangover_ms" in result.stderr
