"""The configuration's sections for what the device talks to: the MQTT broker, Home
Assistant's discovery and the HTTP API (the others are in `config_sections.py`)."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .config_sections import ConfigError, Section


def _default_node_id() -> str:
    return sanitize_node_id(socket.gethostname())


def _plain_topic(value: str) -> str:
    """A topic prefix to publish under: no wildcard (a broker closes the connection of a
    client whose last will names one, so the link would never come up)."""
    if "+" in value or "#" in value:
        raise ValueError(f"{value!r} holds an MQTT wildcard (+ or #): use plain topic levels")
    return value


def sanitize_node_id(raw: str) -> str:
    """Lower-case and replace anything outside [a-z0-9_-] so the id is safe in MQTT topics."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "_", raw.lower()).strip("_")
    return cleaned or "meraudiod"


def is_loopback(host: str) -> bool:
    """Whether an address to bind is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: assume it is reachable from elsewhere


class MqttSettings(Section):
    """The MQTT connection."""

    enabled: bool = Field(False, description="Publish events and accept commands over MQTT")
    host: str = Field("localhost", description="Broker host")
    port: int = Field(1883, ge=1, le=65535, description="Broker port")
    node_id: str = Field(default_factory=_default_node_id, description="This device's id")
    area: str = Field("", description="Room name carried in events")
    base_topic: str = Field("meraudiod", description="Topic prefix; topics are base/node_id/...")
    protocol: Literal["3.1.1", "5"] = Field("5", description="MQTT protocol version")
    username: str | None = Field(None, description="Broker user")
    password: str | None = Field(None, description="Broker password (prefer the environment)")
    password_file: Path | None = Field(None, description="File holding the broker password")
    tls: bool = Field(False, description="Connect with TLS")
    tls_ca_file: Path | None = Field(None, description="CA certificate for the broker")
    tls_cert_file: Path | None = Field(None, description="Client certificate")
    tls_key_file: Path | None = Field(None, description="Client key")
    tls_insecure: bool = Field(False, description="Skip hostname checks (self-signed setups)")
    keepalive_s: int = Field(60, ge=5, description="MQTT keep-alive")
    allow_admin_commands: bool = Field(False, description="Allow destructive commands over MQTT")
    outbox_max_age_days: float = Field(7.0, gt=0, description="Undelivered events kept this long")
    outbox_max_rows: int = Field(10000, ge=10, description="Most undelivered events kept")

    @field_validator("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _no_empty_path(cls, value: object) -> object:
        if value == "":
            return None  # not ".", the current directory
        return Path(value) if isinstance(value, str) else value  # a Path: the file's is strict

    @field_validator("node_id")
    @classmethod
    def _sanitize(cls, value: str) -> str:
        return sanitize_node_id(value)

    @field_validator("base_topic")
    @classmethod
    def _plain_base(cls, value: str) -> str:
        return _plain_topic(value)

    @model_validator(mode="after")
    def _one_password_and_tls_files_need_tls(self) -> MqttSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("mqtt.password and mqtt.password_file are both set: keep one of them")
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(self, key) is not None and not self.tls:
                raise ValueError(
                    f"mqtt.{key} is set but mqtt.tls is false: set mqtt.tls = true or remove it"
                )
        return self


class HttpSettings(Section):
    """The HTTP API, the live sockets and the review page (needs the `http` extra)."""

    enabled: bool = Field(False, description="Serve the HTTP API and the review page")
    host: str = Field(
        "127.0.0.1", description="Address to bind; anything not loopback needs a token"
    )
    port: int = Field(8080, ge=1, le=65535, description="TCP port")
    token: str | None = Field(None, description="Bearer token (prefer the environment)")
    token_file: Path | None = Field(None, description="File holding the bearer token")
    allow_admin_commands: bool = Field(
        False, description="Allow destructive operations (delete, merge, enrol, ...) over HTTP"
    )
    max_upload_mb: float = Field(100.0, gt=0, description="Largest upload accepted")
    max_upload_audio_s: float = Field(
        1800.0,
        gt=0,
        description="Longest audio one upload holds (an enrolment: its clips together);"
        " a few MB of compressed silence can last hours, and what is kept is held in memory",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed cross-origin requests (empty = none)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time a client has to send a request's line and headers"
    )
    body_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Time a client has to send a request's body, however slowly (an upload"
        " of max_upload_mb needs max_upload_mb / body_timeout_s MB/s); then 408",
    )
    max_connections: int = Field(
        64,
        ge=1,
        description="Connections served at once; a request on one beyond gets 503 and the"
        " connection is closed, so a flood cannot take the daemon's file descriptors",
    )

    @field_validator("token_file", mode="before")
    @classmethod
    def _no_empty_path(cls, value: object) -> object:
        if value == "":
            return None
        return Path(value) if isinstance(value, str) else value  # a Path: the file's is strict

    @field_validator("token")
    @classmethod
    def _sendable_token(cls, value: str | None) -> str | None:
        if value:
            _check_token(value)
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        if self.enabled and not is_loopback(self.host) and not (self.token or self.token_file):
            raise ValueError(
                f"http.host {self.host} is reachable from other machines:"
                " set http.token or http.token_file (or bind 127.0.0.1)"
            )
        return self

    def resolved_token(self) -> str | None:
        """The token from `token` or `token_file` (None when neither is set)."""
        if self.token:
            return self.token
        if self.token_file is not None:
            try:
                text = self.token_file.read_text(encoding="utf-8-sig").strip()  # a BOM too
            except OSError as exc:
                raise ConfigError(f"http.token_file: cannot read {self.token_file}: {exc}") from exc
            if not text:
                raise ConfigError(f"http.token_file: {self.token_file} is empty")
            try:
                _check_token(text)
            except ValueError as exc:
                raise ConfigError(f"http.token_file: {self.token_file}: {exc}") from None
            return text
        return None


def _check_token(token: str) -> None:
    """A token a client can send: an Authorization header is Latin-1 and loses its ends'
    spaces, so spaces alone or a letter outside ASCII would match no request at all."""
    if not (token.isascii() and token.isprintable() and token.strip() == token):
        raise ValueError(
            "a bearer token is printable ASCII, without spaces at either end"
            " (it is sent in an Authorization header)"
        )


class HomeAssistantSettings(Section):
    """Home Assistant MQTT discovery."""

    discovery: bool = Field(True, description="Publish device discovery when MQTT is enabled")
    discovery_prefix: str = Field("homeassistant", description="Discovery topic prefix")

    @field_validator("discovery_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        return _plain_topic(value)
