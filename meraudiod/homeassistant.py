"""Home Assistant MQTT discovery: one retained device message that declares every entity
(sensors from the retained state, the listening switch, availability from the LWT).

Every component carries its own `qos`: Home Assistant up to 2026.5 ignores the device-level
one and would subscribe and command at QoS 0. A null in the state (no transcript yet)
renders as "None", which Home Assistant's MQTT sensor shows as unknown."""

from __future__ import annotations

import json
from typing import Any, Final

from . import __version__
from .config import Settings
from .mqtt import Outgoing
from .mqtt_client import base_topic

QOS: Final = 1


def discovery_topic(settings: Settings) -> str:
    """homeassistant/device/meraudiod_<node_id>/config."""
    prefix = settings.homeassistant.discovery_prefix
    return f"{prefix}/device/meraudiod_{settings.mqtt.node_id}/config"


def discovery_message(settings: Settings) -> Outgoing:
    """The retained discovery message, as the MQTT link publishes it on every connect."""
    return Outgoing(
        discovery_topic(settings),
        json.dumps(discovery_payload(settings)),
        qos=QOS,
        retain=True,
        absolute=True,
    )


def discovery_payload(settings: Settings) -> dict[str, Any]:
    """Home Assistant device-based discovery: one retained message for every entity."""
    node = settings.mqtt.node_id
    base = base_topic(settings)
    uid = f"meraudiod_{node}"
    components = _components(uid, base)
    return {
        "dev": {
            "ids": [uid],
            "name": f"meraudiod {node}",
            "mf": "meraudiod",
            "mdl": "meraudiod",
            "sw": __version__,
            **({"sa": settings.mqtt.area} if settings.mqtt.area else {}),
        },
        "o": {"name": "meraudiod", "sw": __version__},
        "avty_t": f"{base}/status",
        "pl_avail": "online",
        "pl_not_avail": "offline",
        "qos": QOS,
        "cmps": {name: {**component, "qos": QOS} for name, component in components.items()},
    }


def _components(uid: str, base: str) -> dict[str, dict[str, Any]]:
    """Every entity of the device, by key."""
    state = f"{base}/state"
    diagnostic = {"ent_cat": "diagnostic", "stat_t": state}

    def sensor(name: str, template: str, **extra: Any) -> dict[str, Any]:
        return {
            "p": "sensor",
            "name": name,
            "uniq_id": f"{uid}_{_slug(name)}",
            "stat_t": state,
            "val_tpl": template,
            **extra,
        }

    return {
        "listening": {
            "p": "switch",
            "name": "Listening",
            "uniq_id": f"{uid}_listening",
            "cmd_t": f"{base}/listening/set",
            "stat_t": f"{base}/listening/state",
            "pl_on": "ON",
            "pl_off": "OFF",
            "icon": "mdi:microphone",
        },
        "speaking": {
            "p": "binary_sensor",
            "name": "Speaking",
            "uniq_id": f"{uid}_speaking",
            "stat_t": state,
            "dev_cla": "sound",
            "val_tpl": "{{ 'ON' if value_json.recording else 'OFF' }}",
        },
        "last_speaker": sensor(
            "Last speaker", "{{ value_json.last_speaker }}", icon="mdi:account-voice"
        ),
        "last_transcript": sensor(
            "Last transcript",
            "{{ value_json.last_transcript }}",
            icon="mdi:text",
            json_attr_t=state,
            json_attr_tpl=(
                "{{ {'text': value_json.last_transcript_full,"
                " 'at': value_json.last_transcript_at} | tojson }}"
            ),
        ),
        "queue_depth": sensor(
            "Backlog",
            "{{ value_json.queue_depth }}",
            stat_cla="measurement",
            unit_of_meas="recordings",
            **diagnostic,
        ),
        "outbox": sensor(
            "Undelivered events",
            "{{ value_json.outbox_depth }}",
            stat_cla="measurement",
            **diagnostic,
        ),
        "audio_level": sensor(
            "Audio level",
            "{{ value_json.audio_level_dbfs }}",
            unit_of_meas="dBFS",
            stat_cla="measurement",
            **diagnostic,
        ),
        "disk_free": sensor(
            "Disk free",
            "{{ value_json.disk_free_mb | round(0) }}",
            unit_of_meas="MB",
            dev_cla="data_size",
            **diagnostic,
        ),
        "transcript": {
            "p": "event",
            "name": "Transcript",
            "uniq_id": f"{uid}_transcript",
            "stat_t": f"{base}/event/transcript",
            "evt_typ": ["transcript", "retranscribed"],
        },
        "speaker": {
            "p": "event",
            "name": "Speaker",
            "uniq_id": f"{uid}_speaker",
            "stat_t": f"{base}/event/speaker",
            "evt_typ": ["identified", "unknown", "enrolled", "deleted"],
        },
    }


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")
