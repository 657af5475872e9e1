"""The command table behind both remote surfaces, for real: one daemon with MQTT (a real
Mosquitto) and HTTP on. Speaker events come from the table whichever surface ran the
command, errors are typed (the same code over MQTT and HTTP), and no remote client can
make the daemon read a file of its choosing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.broker import Broker, Subscriber
from tests.conftest import TEST_DATA, db_rows
from tests.httpd import SPEAKERS_CONFIG, HttpDaemon, json_error, wait_task
from tests.mqtt_daemon import BASE, mqtt_env, request

SPEAKERS = "/api/v1/persistent-speakers"
_CHANGES = ("enrolled", "deleted")


@pytest.fixture
def both(
    env: dict[str, str], broker: Broker, speaker_models: Path
) -> Iterator[tuple[HttpDaemon, Subscriber]]:
    """The daemon with HTTP and MQTT (admin allowed on both, speakers on) and a subscriber."""
    sub = Subscriber(broker.port, [f"{BASE}/#"])
    conf = mqtt_env(env, broker, MERAUDIOD_MQTT__ALLOW_ADMIN_COMMANDS="true")
    server = HttpDaemon(conf, config=SPEAKERS_CONFIG).start()
    sub.wait_online(60)
    yield server, sub
    assert server.stop() == 0, server.log()
    sub.close()


def _speaker_events(sub: Subscriber) -> list[tuple[str, str]]:
    """The enrolled and deleted events received (not those of voices heard)."""
    events = (m.json() for m in sub.on("/event/speaker"))
    return [(e["event_type"], e["name"]) for e in events if e["event_type"] in _CHANGES]


def _recording(client: httpx.Client, clip: str) -> str:
    """A clip uploaded as a recording, transcribed."""
    response = client.post(
        "/api/v1/vad/upload_recording", files={"file": (clip, (TEST_DATA / clip).read_bytes())}
    )
    assert response.status_code == 202, response.text
    rec_id: str = response.json()["recording_id"]
    assert wait_task(client, rec_id, "completed")["status"] == "completed"
    return rec_id


def _wait_event(sub: Subscriber, event: tuple[str, str]) -> None:
    sub.wait_for(lambda: event in _speaker_events(sub), 60)


def test_enrol_and_delete_publish_one_speaker_event_over_http_and_over_mqtt(
    both: tuple[HttpDaemon, Subscriber],
) -> None:
    server, sub = both
    with server.client() as client:
        clips = [("files", (n, (TEST_DATA / n).read_bytes())) for n in ("ls_2609_0000.flac",)]
        assert client.post(f"{SPEAKERS}/upload", data={"name": "Bob"}, files=clips).is_success
        _wait_event(sub, ("enrolled", "Bob"))
        assert client.delete(f"{SPEAKERS}/Bob").is_success
        _wait_event(sub, ("deleted", "Bob"))

        carol = _recording(client, "ls_3080_0001.flac")
        body = json.dumps({"name": "Carol", "recording_ids": [carol]})
        assert request(sub, "speakers/enroll", body, timeout_s=120)["status"] == "ok"
        _wait_event(sub, ("enrolled", "Carol"))
        assert request(sub, "speakers/delete", json.dumps({"name": "Carol"}))["status"] == "ok"
        _wait_event(sub, ("deleted", "Carol"))
        # The outbox is delivered in order: once this last one is here, a second copy of any
        # earlier event would have arrived before it.
        dave = client.post(SPEAKERS, json={"name": "Dave", "recording_ids": [carol]})
        assert dave.status_code == 201, dave.text
        _wait_event(sub, ("enrolled", "Dave"))
    assert _speaker_events(sub) == [
        ("enrolled", "Bob"),
        ("deleted", "Bob"),
        ("enrolled", "Carol"),
        ("deleted", "Carol"),
        ("enrolled", "Dave"),
    ]


def test_errors_are_typed_the_same_over_mqtt_and_http(
    both: tuple[HttpDaemon, Subscriber],
) -> None:
    server, sub = both

    def mqtt_error(command: str, args: dict[str, Any]) -> dict[str, Any]:
        response: dict[str, Any] = request(sub, command, json.dumps(args), timeout_s=60)
        assert response["status"] == "error", response
        return response

    missing = "01M89AY2FTNHNGP6MBNKJA4H0J"
    assert mqtt_error("recordings/get", {"id": missing})["code"] == "not_found"
    assert mqtt_error("recordings/get", {"id": 5})["code"] == "invalid_request"
    assert mqtt_error("purge", {"start": "2000-01-01"})["code"] == "invalid_request"
    assert mqtt_error("nope", {})["code"] == "invalid_request"
    with server.client() as client:
        rec = _recording(client, "ls_3080_0001.flac")
        for name in ("Ann", "Ben"):
            enrolled = client.post(SPEAKERS, json={"name": name, "recording_ids": [rec]})
            assert enrolled.status_code == 201, enrolled.text
        taken = client.post(f"{SPEAKERS}/rename", json={"name": "Ann", "new_name": "Ben"})
        # The way to merge the two is the surface's own: the CLI's command was named to
        # clients of the HTTP API and of MQTT, which may not be on the device at all.
        merge = '{"source": "Ann", "target": "Ben"}'
        assert json_error(taken, 409, "conflict") == (
            f"'Ben' exists already: to make them one voice, POST {merge} to {SPEAKERS}/merge"
        )
        over_mqtt = mqtt_error("speakers/rename", {"name": "Ann", "new_name": "Ben"})
        assert over_mqtt["code"] == "conflict"
        assert over_mqtt["error"] == (
            f"'Ben' exists already: to make them one voice, publish {merge}"
            f" to {BASE}/request/speakers/merge"
        )
        # the code, not the wording: a name that reads like "not found" is still a conflict
        odd = "Ben no such"
        renamed = client.post(f"{SPEAKERS}/rename", json={"name": "Ben", "new_name": odd})
        assert renamed.is_success, renamed.text
        taken = client.post(f"{SPEAKERS}/rename", json={"name": "Ann", "new_name": odd})
        json_error(taken, 409, "conflict")
        json_error(client.delete(f"{SPEAKERS}/Nobody"), 404, "not_found")
    assert mqtt_error("speakers/delete", {"name": "Nobody"})["code"] == "not_found"


def test_no_remote_client_makes_the_daemon_read_a_file_it_names(
    both: tuple[HttpDaemon, Subscriber],
) -> None:
    server, sub = both
    on_device = str((TEST_DATA / "ls_2609_0000.flac").resolve())  # speech, readable by it
    with server.client() as client:
        by_path = client.post(SPEAKERS, json={"name": "Eve", "recording_ids": [on_device]})
        assert "no file can be named here" in json_error(by_path, 404, "not_found")
    response = request(
        sub,
        "speakers/enroll",
        json.dumps({"name": "Mallory", "recording_ids": [on_device]}),
        timeout_s=120,
    )
    assert response["status"] == "error" and response["code"] == "not_found", response
    assert db_rows(server.env, "SELECT name FROM speakers") == []
    assert ("enrolled", "Eve") not in _speaker_events(sub)
