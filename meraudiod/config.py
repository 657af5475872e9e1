"""Configuration: one pydantic model per section, loaded from TOML, overridden by environment.

Precedence: `MERAUDIOD_<SECTION>__<KEY>` environment variables, then the TOML file
(`--config`, `$MERAUDIOD_CONFIG`, `/etc/meraudiod/config.toml`), then the defaults (the
sections, in `config_sections.py` and `config_network.py`).
Unknown keys and a named file that does not exist are errors that say which key or file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from .compat import tomllib
from .config_network import HomeAssistantSettings, HttpSettings, MqttSettings
from .config_sections import (
    AsrSettings,
    AudioSettings,
    DiarizationSettings,
    LoggingSettings,
    RecorderSettings,
    RetentionSettings,
    SpeakersSettings,
    StorageSettings,
    VadSettings,
)
from .config_sections import (
    ConfigError as ConfigError,  # raised by load_settings: importers take it from here
)
from .paths import link_loop

DEFAULT_CONFIG_PATH: Final = Path("/etc/meraudiod/config.toml")
ENV_CONFIG: Final = "MERAUDIOD_CONFIG"
_ENV_PREFIX: Final = "MERAUDIOD_"  # MERAUDIOD_<SECTION>__<KEY>
_ENV_DELIMITER: Final = "__"
# The example configuration is 10 kB. A bigger file is a mistake (a log or a recording saved
# over it): parsed, 50 MB held a reload's main loop for a minute, past systemd's watchdog.
_MAX_FILE_BYTES: Final = 1_000_000
# An error names this many problems, then counts the rest: one readable line.
_MAX_ERRORS_SHOWN: Final = 20


# Keys no output shows: a `config/get` reply goes to every subscriber of the broker.
_SECRETS: Final = {"mqtt": {"password"}, "http": {"token"}}


class Settings(BaseSettings):
    """All settings; the environment overrides the file."""

    model_config = SettingsConfigDict(
        env_prefix=_ENV_PREFIX, env_nested_delimiter=_ENV_DELIMITER, extra="forbid"
    )

    audio: AudioSettings = Field(default_factory=AudioSettings)
    vad: VadSettings = Field(default_factory=VadSettings)
    recorder: RecorderSettings = Field(default_factory=RecorderSettings)
    asr: AsrSettings = Field(default_factory=AsrSettings)
    speakers: SpeakersSettings = Field(default_factory=SpeakersSettings)
    diarization: DiarizationSettings = Field(default_factory=DiarizationSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _speakers_need_asr(self) -> Settings:
        # Speakers and diarization run in the transcription worker: without it they would
        # be silently off.
        for section in ("speakers", "diarization"):
            if getattr(self, section).enabled and not self.asr.enabled:
                raise ValueError(
                    f"{section}.enabled = true needs asr.enabled = true (they run on"
                    " transcribed recordings): enable asr or disable"
                    f" {section}"
                )
        return self

    def without_secrets(self) -> dict[str, Any]:
        """The settings as JSON-ready data, less the secrets (the broker's password, the HTTP
        token): what `config/get` answers on the broker and `config check --json` prints."""
        return self.model_dump(mode="json", exclude=_SECRETS)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then what was read from the TOML file."""
        return (env_settings, init_settings)


def resolve_config_path(explicit: str | Path | None) -> tuple[Path | None, bool]:
    """The file to read and whether it was named (a named file must exist)."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env), True
    return (DEFAULT_CONFIG_PATH, False) if DEFAULT_CONFIG_PATH.exists() else (None, False)


def _environment_names() -> dict[str, str]:
    """The variables that may hold settings, by their name in upper case (pydantic-settings
    reads them in any case)."""
    return {name.upper(): name for name in os.environ if name.upper().startswith(_ENV_PREFIX)}


def _variable_for(loc: tuple[int | str, ...], names: dict[str, str]) -> str | None:
    """The environment variable a value at `loc` came from, if any (the environment wins over
    the file, so a bad value found there is the variable's)."""
    for end in range(len(loc), 0, -1):
        if all(isinstance(part, str) for part in loc[:end]):
            name = _ENV_PREFIX + _ENV_DELIMITER.join(str(p) for p in loc[:end]).upper()
            if name in names:
                return names[name]
    return None


def _nul_characters(value: Any, key: str = "") -> list[str]:
    """The file's texts holding a NUL character (TOML writes one as \\u0000), which no path,
    name or address can hold: each named, not a traceback ("embedded null byte")."""
    if isinstance(value, str):
        return [f"{key}: holds a NUL character (\\u0000)"] if "\0" in value else []
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _nul_characters(v, f"{key}.{k}".strip("."))]
    if isinstance(value, list):
        return [e for v in value for e in _nul_characters(v, key)][:1]
    return []


def _not_json() -> list[str]:
    """Variables for a list or a whole section whose value is not the JSON that
    pydantic-settings reads them as (it says only which section, in a traceback)."""
    errors = []
    for upper, name in sorted(_environment_names().items()):
        model: Any = Settings
        annotation: Any = None
        for part in upper.removeprefix(_ENV_PREFIX).lower().split(_ENV_DELIMITER):
            fields = getattr(model, "model_fields", {}) if isinstance(model, type) else {}
            field = fields.get(part)
            if field is None:
                break
            annotation = model = field.annotation
        else:
            if _scalar(annotation):
                continue
            try:
                json.loads(os.environ[name])
            except ValueError:
                errors.append(
                    f"{name}: not JSON, as a list or a section from the environment must be"
                    ' (["a", "b"]; a section is set key by key, MERAUDIOD_ASR__MODEL)'
                )
    return errors


def _scalar(annotation: Any) -> bool:
    """A setting the environment gives as plain text (a number, a path, a name)."""
    if isinstance(annotation, type):
        return not issubclass(annotation, BaseModel | list | dict | tuple | set)
    args = [a for a in get_args(annotation) if a is not type(None)]
    origin = get_origin(annotation)
    if origin in (list, dict, tuple, set, frozenset):
        return False
    return all(_scalar(a) for a in args) if args else True


def _misnamed_variables() -> list[str]:
    """Variables meant as settings that no setting reads, which pydantic-settings skips
    without a word: an unknown section (MERAUDIOD_AUDOI__SOURCE), or one underscore where
    two belong (MERAUDIOD_MQTT_PASSWORD: the password silently not used)."""
    errors = []
    for upper, name in sorted(_environment_names().items()):
        rest = upper.removeprefix(_ENV_PREFIX)
        section = rest.split(_ENV_DELIMITER, 1)[0].lower()
        if _ENV_DELIMITER in rest:
            if section not in Settings.model_fields:
                errors.append(f"{section}: unknown key (from {name})")
            continue
        for known in Settings.model_fields:
            if section.startswith(f"{known}_"):
                meant = f"{_ENV_PREFIX}{known.upper()}{_ENV_DELIMITER}{rest[len(known) + 1 :]}"
                errors.append(f"{name}: unknown key (a key is set as {meant})")
    return errors


def _error_lines(error: ValidationError) -> list[str]:
    """Each of a validation's errors, `key: what is wrong` (and the variable it came from)."""
    lines = []
    names = _environment_names()
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        # A cross-field rule names its keys itself.
        line = f"{key}: {message}" if key and f"{key}." not in message else message
        variable = _variable_for(tuple(item["loc"]), names)
        lines.append(f"{line} (from {variable})" if variable else line)
    return lines


def _refusal(lines: list[str], source: str) -> str:
    more = len(lines) - _MAX_ERRORS_SHOWN
    shown = lines[:_MAX_ERRORS_SHOWN] + ([f"and {more} more"] if more > 0 else [])
    return f"invalid configuration ({source}): " + "; ".join(shown)


# What strict validation refuses that lax validation takes: "yes" for a boolean, true for a
# number, "700" for a number of milliseconds.
_STRICT_TYPES: Final = frozenset({"bool_type", "int_type", "float_type", "string_type"})


def _as_toml(value: object) -> str:
    """A value as the file wrote it, with its TOML type."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"{type(value).__name__} {value!r}"


def _relative_paths(section: str, model: type[BaseModel], values: dict[str, Any]) -> list[str]:
    """The file's paths that are relative: taken from the working directory (/ under
    systemd), never from the file's folder, they were not what the admin meant."""
    errors = []
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None or not isinstance(value, str) or not value:
            continue
        is_path = Path in (field.annotation, *get_args(field.annotation))
        path = value
        if section == "audio" and key == "source" and value.startswith("file:"):
            is_path, path = True, value[5:]  # file:PATH: on the command line, the shell's
        if is_path and not path.startswith("~") and not Path(path).is_absolute():
            errors.append(
                f"{section}.{key}: {value!r} must be an absolute path (a relative one would"
                " be taken from the working directory, / under systemd)"
            )
    return errors


def _wrong_types(data: dict[str, Any]) -> list[str]:
    """The file's values of the wrong type, and its relative paths. TOML has booleans and
    numbers, so the file's values are validated strictly; the environment's, always text,
    stay lax (and a relative path there is the shell's directory, as given)."""
    errors = []
    for section, values in data.items():
        field = Settings.model_fields.get(section)
        if field is None or not isinstance(values, dict):
            continue  # an unknown section or a value for a table: the validation names it
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        errors += _relative_paths(section, model, values)
        try:
            model.model_validate(values, strict=True)
        except ValidationError as exc:
            for item in exc.errors():
                if item["type"] in _STRICT_TYPES:
                    key = ".".join(str(part) for part in (section, *item["loc"]))
                    errors.append(f"{key}: {item['msg']}, not {_as_toml(item['input'])}")
    return errors


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the TOML file (if any), apply the environment, validate everything."""
    data, source = _read_file(path)
    refused = _misnamed_variables() + _nul_characters(data) + _wrong_types(data)
    try:
        settings = Settings(**data)
    except SettingsError as exc:  # a list or a section from the environment, not JSON
        refused += _not_json() or [str(exc)]
    except ValidationError as exc:
        # Every mistake at once: the validation's, but for keys already named above.
        named = {line.split(":", 1)[0] for line in refused}
        refused += [line for line in _error_lines(exc) if line.split(":", 1)[0] not in named]
    if refused:
        raise ConfigError(_refusal(refused, source))
    return settings


def load_storage_settings(path: str | Path | None = None) -> Settings | None:
    """Settings of the file's `storage` section alone (the rest defaults), for `status` to
    find the daemon's database and heartbeat while another section is broken (the running
    daemon refused it on SIGHUP and says why); None when that does not load either."""
    try:
        try:
            storage = _read_file(path)[0].get("storage", {})
        except _NotToml as exc:  # a key given twice, say: that section read by itself
            storage = _storage_section(exc.text)
        if not isinstance(storage, dict) or _nul_characters(storage):
            return None
        return Settings(storage=storage)
    except (ConfigError, ValidationError, SettingsError):
        return None


class _NotToml(ConfigError):
    """A regular file of a sane size that is no TOML as a whole (its text in `text`)."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


def _storage_section(text: str) -> dict[str, Any] | None:
    """The `[storage]` table of a text that is no TOML as a whole, read by itself ({}: none,
    the defaults and the environment)."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("["):
            inside = line.split("#", 1)[0].strip() == "[storage]"
        elif inside:
            lines.append(line)
    try:
        table: dict[str, Any] = tomllib.loads("\n".join(lines))
    except (tomllib.TOMLDecodeError, RecursionError):
        return None
    return table


def _not_a_file(path: Path) -> str:
    """Why the configuration file cannot be read as one."""
    if path.exists():
        return "is not a regular file"
    return link_loop(path) or "not found"


def _read_file(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """The configuration file's tables (none without a file) and how to name their source."""
    config_path, _named = resolve_config_path(path)
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if config_path is not None:
        try:
            # is_file() raises, rather than say False, when a directory on the way is unreadable.
            if not config_path.is_file():
                raise ConfigError(f"config file {_not_a_file(config_path)}: {config_path}")
            size_bytes = config_path.stat().st_size
            if size_bytes > _MAX_FILE_BYTES:
                raise ConfigError(
                    f"config file {config_path} is {size_bytes / 1e6:.1f} MB: not a"
                    f" configuration (at most {_MAX_FILE_BYTES / 1e6:.0f} MB are read)"
                )
            # -sig: a byte order mark (Notepad's UTF-8) is no "invalid statement"
            text = config_path.read_text(encoding="utf-8-sig")
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _NotToml(f"cannot read config file {config_path}: {exc}", text) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from exc
        except RecursionError as exc:  # the parser recurses per nested array or table
            raise ConfigError(
                f"cannot read config file {config_path}: arrays or tables nested too deeply"
            ) from exc
        source = str(config_path)
    return data, source


# What SIGHUP can change while running; everything else is reported as needing a restart.
_LIVE_SECTIONS: Final = frozenset({"recorder", "retention", "logging"})
_LIVE_KEYS: Final = frozenset(
    {
        "vad.start_threshold",
        "vad.end_threshold",
        "asr.no_speech_threshold",
        "asr.logprob_threshold",
        "asr.max_attempts",
        "asr.retry_delay_s",
        "speakers.enabled",  # the daemon loads or frees the speaker models (pipeline.py)
        "speakers.threshold",
        "speakers.margin",
        "diarization.enabled",
        "mqtt.allow_admin_commands",
        "mqtt.outbox_max_age_days",
        "mqtt.outbox_max_rows",
    }
)


def apply_live(running: Settings, fresh: Settings) -> tuple[list[str], list[str]]:
    """Copy into `running` what may change while the daemon runs (in place: stages hold
    these section objects); returns the keys applied and the changed keys that need a
    restart."""
    old, new = running.model_dump(), fresh.model_dump()
    applied, needs_restart = [], []
    for section, values in new.items():
        for key, value in values.items():
            if old[section][key] == value:
                continue
            name = f"{section}.{key}"
            if section in _LIVE_SECTIONS or name in _LIVE_KEYS:
                # `fresh` validated the values together; assigning one key at a time through
                # validation could trip a cross-field rule halfway.
                value = getattr(getattr(fresh, section), key)
                object.__setattr__(getattr(running, section), key, value)
                applied.append(name)
            else:
                needs_restart.append(name)
    return applied, needs_restart
