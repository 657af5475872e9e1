"""Who spoke is a fact about the voice (issue 14): a conversation whose transcript Whisper
distrusts still gets its turns named, in `analyze --json` and in MQTT speaker events, while
the distrusted words themselves are never published. Real voices (tests/data, LibriSpeech:
3080 is Alice, 2609 is Bob, enrolled from other clips), real models, a real Mosquitto.

`../shared/data` holds no speech in a language other than English, so the transcript is
made suspect the way a language tiny.en does not know makes it: an asr.logprob_threshold
no segment reaches flags every segment, and the recording's state is `suspect`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile

from .broker import Broker, Subscriber
from .conftest import TEST_DATA, cli
from .mqtt_daemon import BASE, mqtt_env

ENROL = {
    "Alice": ["ls_3080_0000.flac", "ls_3080_0003.flac"],
    "Bob": ["ls_2609_0000.flac", "ls_2609_0003.flac"],
}
TURNS = [
    ("Alice", "ls_3080_0001.flac"),
    ("Bob", "ls_2609_0001.flac"),
    ("Alice", "ls_3080_0004.flac"),
]
PAUSE_S = 0.5
RATE = 16000


def conversation(path: Path) -> list[tuple[str, float, float]]:
    """Three turns of two voices with short pauses in one file; (who, start, end) of each."""
    pieces, truth, t = [], [], 0.0
    for who, name in TURNS:
        audio, rate = soundfile.read(TEST_DATA / name, dtype="float32")
        assert rate == RATE
        pieces += [audio, np.zeros(int(PAUSE_S * RATE), np.float32)]
        truth.append((who, t, t + audio.size / RATE))
        t += audio.size / RATE + PAUSE_S
    soundfile.write(path, np.concatenate(pieces), RATE)
    return truth


def test_a_distrusted_conversation_gets_its_turns_named_and_published(
    env: dict[str, str], broker: Broker, speaker_models: Path, tmp_path: Path
) -> None:
    env = {
        **env,
        "MERAUDIOD_SPEAKERS__ENABLED": "true",
        "MERAUDIOD_DIARIZATION__ENABLED": "true",
    }
    for name, clips in ENROL.items():
        result = cli("speakers", "enroll", name, *(str(TEST_DATA / c) for c in clips), env=env)
        assert result.returncode == 0, result.stderr
    env["MERAUDIOD_ASR__LOGPROB_THRESHOLD"] = "5"  # every segment suspect
    talk = tmp_path / "conversation.wav"
    truth = conversation(talk)

    result = cli("analyze", "--json", str(talk), env=env, timeout_s=300)
    assert result.returncode == 0, result.stderr
    (item,) = [json.loads(line) for line in result.stdout.splitlines()]
    recordings = item["recordings"]
    assert recordings and all(r["state"] == "suspect" for r in recordings), recordings
    segments = [s for r in recordings for s in r["segments"]]
    assert segments and all(s["suspect"] for s in segments)
    for who, start, end in truth:  # each turn: its segments carry the speaker's name
        inside = [s for s in segments if start <= (s["start_s"] + s["end_s"]) / 2 <= end]
        assert inside and {s["speaker"]["name"] for s in inside} == {who}, (who, segments)

    sub = Subscriber(broker.port, [f"{BASE}/#"])
    try:
        result = cli("run", "--source", f"file:{talk}", env=mqtt_env(env, broker), timeout_s=300)
        assert result.returncode == 0, result.stderr
        sub.wait_for(lambda: sub.on(f"{BASE}/status")[-1].payload == b"offline", 30)
        named = [m.json() for m in sub.on("/event/speaker")]
        assert {e["name"] for e in named if e["event_type"] == "identified"} == {"Alice", "Bob"}
        assert all(e["recording_id"] for e in named)
        # The words Whisper distrusted are not published as speech.
        assert sub.on("/event/transcript") == []
        state = sub.on(f"{BASE}/state")[-1].json()
        assert state["last_speaker"] in {"Alice", "Bob"} and state["last_transcript"] is None
    finally:
        sub.close()
