"""The configuration's sections: one pydantic model each, unknown keys are errors, every
field with a default, a description and its unit in its name (`config.py` puts them together
into `Settings` and loads them)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .paths import NoHomeError, expand_home

# More threads than any board has cores only makes them fight (5000 CTranslate2 threads ran
# twenty times slower than real time).
MAX_THREADS: Final = 64
_YEAR_S: Final = 365 * 86400.0
# The language codes Whisper's tokenizer takes (faster-whisper's list, held to it by a test;
# importing it here would load CTranslate2 for `config check`). Anything else was accepted by
# `config check` and the start, and then failed every transcript.
_WHISPER_CODES: Final = (
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha"
    " haw he hi hr ht hu hy id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr"
    " ms mt my ne nl nn no oc pa pl ps pt ro ru sa sd si sk sl sn so sq sr su sv sw ta te tg"
    " th tk tl tr tt uk ur uz vi yi yo zh yue"
)
WHISPER_LANGUAGES: Final = frozenset(_WHISPER_CODES.split())


def _whisper_language(value: str, detect_hint: str = "") -> str:
    """A language code Whisper knows (case and spaces aside), else a ValueError naming it."""
    code = value.strip().lower()
    if code not in WHISPER_LANGUAGES:
        raise ValueError(
            f"{value!r} is not a language code Whisper knows (such as en, de, fr, es,"
            f" zh{detect_hint})"
        )
    return code


class ConfigError(Exception):
    """The configuration file or environment is invalid; the message says where."""


def _default_data_dir() -> Path:
    """systemd's StateDirectory, else the XDG data directory."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "meraudiod"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, text must be UTF-8, and numbers finite
    (TOML has inf and nan: an endless limit or interval passed "gt=0" and killed the start)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _utf8_text(cls, value: Any, info: ValidationInfo) -> Any:
        # A byte that is not UTF-8 in the environment (a Latin-1 "K\xfcche" in the unit's
        # EnvironmentFile) arrives as a lone surrogate: no event, topic or login can carry it.
        # A path may hold any bytes (audio.source's file:PATH; the others are Paths).
        if info.field_name == "source":
            return value
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{text!r} is not valid UTF-8 text") from None
        return value


class AudioSettings(Section):
    """Where audio comes from."""

    source: str = Field(
        "mic", description="mic, file:PATH, stdin (raw 16 kHz mono s16le) or demo (bundled sample)"
    )
    device: str | int | None = Field(
        None, description="Input device name (substring) or index; None = system default"
    )
    device_rate_hz: int | None = Field(
        None,
        ge=8000,
        le=384000,
        description="Rate to open the device at (8000-384000); None = its native default rate",
    )
    queue_frames: int = Field(
        256,
        ge=16,
        description="Frames (32 ms) buffered between the capture callback and the listener",
    )
    realtime: bool = Field(
        False, description="Pace file replay at real time instead of as fast as possible"
    )
    block_ms: int = Field(
        128,
        ge=32,
        le=1024,
        multiple_of=32,
        description="Audio the listener wakes up for, from the sound card (and a real-time file)"
        ": 32 ms frames taken a few at a time cost less CPU than one per wakeup, and speech"
        " is noticed up to block_ms - 32 ms later",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if value in ("mic", "stdin", "demo") or (value.startswith("file:") and len(value) > 5):
            return value
        raise ValueError("must be mic, stdin, demo or file:PATH")


class VadSettings(Section):
    """Silero VAD on onnxruntime."""

    model: str = Field("silero-vad-v6", description="Manifest name or path of the VAD ONNX file")
    threads: int = Field(
        1, ge=1, le=MAX_THREADS, description="onnxruntime intra-op threads (1 keeps idle CPU low)"
    )
    start_threshold: float = Field(
        0.5, gt=0, lt=1, description="Speech probability that opens an utterance"
    )
    end_threshold: float = Field(
        0.35, gt=0, lt=1, description="Probability below which a frame counts as silence"
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> VadSettings:
        if self.end_threshold > self.start_threshold:
            raise ValueError("vad.end_threshold must not exceed vad.start_threshold")
        return self


class RecorderSettings(Section):
    """Segmenter timing: how speech probabilities become recordings."""

    # Upper bounds too: a typo such as 1e9 would otherwise be taken, at start and on SIGHUP.
    min_speech_ms: int = Field(
        250, ge=0, le=10_000, description="Shorter bursts of speech are ignored"
    )
    hangover_ms: int = Field(
        700,
        ge=32,
        le=10_000,
        description="Silence that ends an utterance (end-of-speech hang-over)",
    )
    pre_roll_ms: int = Field(
        300, ge=0, le=5_000, description="Audio kept before the detected start"
    )
    post_roll_ms: int = Field(200, ge=0, description="Audio kept after the last speech frame")
    max_utterance_s: float = Field(
        28.0, ge=2.0, le=300.0, description="Longer speech is split cleanly at the quietest frame"
    )
    audio_format: Literal["flac", "wav"] = Field("flac", description="File format of recordings")

    @model_validator(mode="after")
    def _post_roll_fits(self) -> RecorderSettings:
        if self.post_roll_ms > self.hangover_ms:
            raise ValueError("recorder.post_roll_ms must not exceed recorder.hangover_ms")
        return self


# A host name, an IPv4 address or a bracketed IPv6 one (tcp://[::1]:10300), then the port.
_WYOMING_URI: Final = re.compile(r"^tcp://([^\s:/\[\]]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}$")


class WyomingSettings(Section):
    """Remote speech-to-text servers that speak the Wyoming protocol (asr.backend = wyoming)."""

    servers: list[str] = Field(
        default_factory=list, description="tcp://host:port of each server (see strategy)"
    )
    strategy: Literal["ordered", "spread"] = Field(
        "ordered",
        description="ordered: the first server that is up takes every request, the rest stand"
        " by; spread: each request goes to the next server that is up, in turn",
    )
    connect_timeout_s: float = Field(
        3.0,
        gt=0,
        description="Connecting within this; Describe answered within twice this, connecting"
        " included",
    )
    deadline_base_s: float = Field(
        10.0, gt=0, description="A request's deadline: this plus deadline_per_audio_s per second"
    )
    deadline_per_audio_s: float = Field(
        3.0, ge=0, description="Seconds added to a request's deadline per second of its audio"
    )
    split_silence_ms: int = Field(
        400, ge=100, description="A pause this long splits a recording into separate requests"
    )
    retry_max_s: float = Field(
        30.0, gt=0, description="A server that failed is asked again after 1 s, doubling to this"
    )

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        for uri in value:
            if not _WYOMING_URI.match(uri) or not 0 < int(uri.rsplit(":", 1)[1]) < 65536:
                raise ValueError(f"{uri!r} is not tcp://host:port")
        return value


class AsrSettings(Section):
    """Transcription (faster-whisper here, or Wyoming servers) and the job queue that feeds it."""

    enabled: bool = Field(True, description="Transcribe recordings (false: record only)")
    backend: Literal["local", "wyoming"] = Field(
        "local", description="local: faster-whisper on this device; wyoming: asr.wyoming.servers"
    )
    fallback: Literal["local", "wait"] = Field(
        "local",
        description="With wyoming, when every server is down: transcribe here (local) or keep"
        " the recordings waiting (wait: the local model is never loaded)",
    )
    wyoming: WyomingSettings = Field(default_factory=WyomingSettings)
    model: str = Field(
        "tiny.en", description="Manifest name, faster-whisper model name, or CTranslate2 dir"
    )
    compute_type: str = Field("int8", description="CTranslate2 compute type (int8 = quantized)")
    beam_size: int = Field(1, ge=1, le=10, description="Beam width (1 = greedy)")
    cpu_threads: int = Field(
        2,
        ge=0,
        le=MAX_THREADS,
        description="CTranslate2 threads (0 = library default); 2 measured fastest",
    )
    language: str | None = Field(
        "en", description='Fixed language; "auto" (or "") = detect, within `languages`'
    )
    languages: list[str] = Field(
        default_factory=list, description="With detection, the languages allowed (empty = any)"
    )
    word_timestamps: bool = Field(True, description="Store per-word times")
    temperature_fallback: bool = Field(
        False, description="Re-decode low-confidence audio at higher temperatures (slower)"
    )
    allow_download: bool = Field(
        False, description="Fetch a named faster-whisper model from the hub when not installed"
    )
    no_speech_threshold: float = Field(
        0.6, ge=0, le=1, description="Segments above this no-speech probability are suspect"
    )
    logprob_threshold: float = Field(
        -1.0, description="Segments below this average log-probability are low-confidence"
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Failed tries (and, counted apart, process deaths during it) before a job"
        " is left failed",
    )
    retry_delay_s: float = Field(
        30.0, ge=0, description="Wait before the second try; doubles for each later one"
    )
    job_lease_s: float = Field(600.0, gt=0, description="How long a claimed job stays claimed")

    @field_validator("model")
    @classmethod
    def _model_named(cls, value: str) -> str:
        # "" was taken as the current directory: "cannot load ASR model ." named no key.
        if not value.strip():
            raise ValueError(
                "names no model (a manifest name such as tiny.en, a faster-whisper model"
                " name or a CTranslate2 directory)"
            )
        return value

    @field_validator("language")
    @classmethod
    def _auto_is_detection(cls, value: str | None) -> str | None:
        # A TOML file cannot say None: "auto" (or "") asks for detection.
        if value is None or value.strip().lower() in ("", "auto"):
            return None
        return _whisper_language(value, '; "auto" or "" detects it')

    @field_validator("languages")
    @classmethod
    def _languages_known(cls, value: list[str]) -> list[str]:
        return [_whisper_language(lang) for lang in value]

    @model_validator(mode="after")
    def _servers_named(self) -> AsrSettings:
        if self.backend == "wyoming" and not self.wyoming.servers:
            raise ValueError("asr.backend = wyoming needs asr.wyoming.servers")
        return self

    @model_validator(mode="after")
    def _model_knows_the_language(self) -> AsrSettings:
        # An English-only model (tiny.en) transcribes anything as English: faster-whisper
        # only warned at every transcript. Refused where the local model is loaded.
        local = self.backend == "local" or self.fallback == "local"
        if not (self.enabled and local and self.model.rstrip("/").endswith(".en")):
            return self
        if self.language not in (None, "en"):
            raise ValueError(
                f"asr.language = {self.language!r} needs a multilingual asr.model, not the"
                f" English-only {self.model!r}: set asr.model to one without .en (such as"
                ' tiny or base) or asr.language = "en"'
            )
        others = [lang for lang in self.languages if lang != "en"]
        if self.language is None and others:
            raise ValueError(
                f"asr.languages = {self.languages!r} needs a multilingual asr.model, not the"
                f" English-only {self.model!r}: set asr.model to one without .en (such as"
                " tiny or base) or leave asr.languages empty"
            )
        return self


class SpeakersSettings(Section):
    """Speaker identification."""

    enabled: bool = Field(False, description="Identify enrolled speakers")
    model: str = Field("ecapa-voxceleb", description="Speaker-embedding model")
    threshold: float = Field(
        0.5,
        ge=-1,
        le=1,
        description="Confidence needed to name someone (0.5: the calibrated bar for that"
        " length of speech)",
    )
    margin: float = Field(
        0.5,
        ge=0,
        le=5,
        description="Lead needed over the runner-up, in the calibration's spread",
    )
    min_speech_s: float = Field(0.5, ge=0, description="Less speech than this stays unknown")
    threads: int = Field(
        1, ge=1, le=MAX_THREADS, description="onnxruntime intra-op threads for embeddings"
    )
    max_embedding_s: float = Field(
        20.0, ge=2.0, description="Most speech per speaker that is embedded (bounds the cost)"
    )
    group_unknown: bool = Field(
        True, description="Group unknown voices into provisional profiles an admin can name"
    )
    max_unknown_embeddings: int = Field(
        5, ge=1, description="Embeddings kept per provisional profile"
    )


class DiarizationSettings(Section):
    """Who spoke when, inside one recording."""

    enabled: bool = Field(False, description="Split recordings by speaker turn")
    max_speakers: int = Field(4, ge=1, le=10, description="Most speakers expected in a recording")
    model: str = Field(
        "pyannote-segmentation-3.0",
        description="Segmentation model (also finds the speech that identification embeds)",
    )
    cluster_threshold: float = Field(
        0.4, ge=-1, le=1, description="Cosine similarity at which two local speakers are one"
    )


class StorageSettings(Section):
    """Where the database, audio and models live."""

    @field_validator("data_dir", "models_dir", "tmp_audio_dir", "run_dir", mode="before")
    @classmethod
    def _no_empty_path(cls, value: object) -> object:
        # "" would become Path("."): the current directory, never what anyone meant; "~/x"
        # a directory named "~" in it.
        if value == "":
            return None
        if not isinstance(value, str | Path):
            return value
        try:
            return expand_home(value)
        except NoHomeError as exc:
            raise ValueError(f"{str(value)!r}: {exc}") from None

    data_dir: Path = Field(default_factory=_default_data_dir, description="Database and audio")
    models_dir: Path | None = Field(None, description="Installed models; None = data_dir/models")
    tmp_audio_dir: Path | None = Field(
        None,
        description="Write recordings' audio here instead (a tmpfs, with retention.keep_audio"
        " = false: no audio ever reaches the SD card); None = data_dir/audio",
    )
    run_dir: Path | None = Field(
        None,
        description="The daemon's heartbeat, rewritten every 5 s, which `status` reads, and a"
        " note per job it transcribes (a crash is told from a stop by it): a tmpfs such as"
        " /run/meraudiod spares the SD card, and is written when the data disk cannot be"
        " (full, read-only), and where audio held in memory at a stop is kept until the next"
        " start (without run_dir: $RUNTIME_DIRECTORY, else a folder per data_dir in"
        " $XDG_RUNTIME_DIR/meraudiod);"
        " None = data_dir",
    )

    @property
    def db_path(self) -> Path:
        """The SQLite database file."""
        return self.data_dir / "meraudiod.db"

    @property
    def runtime_dir(self) -> Path:
        """Where the running daemon's own files go: run_dir, or data_dir when none."""
        return self.run_dir or self.data_dir

    @property
    def audio_dir(self) -> Path:
        """Where recordings' audio is written."""
        return self.tmp_audio_dir or self.data_dir / "audio"

    @property
    def resolved_models_dir(self) -> Path:
        """Installed models."""
        return self.models_dir or self.data_dir / "models"


class RetentionSettings(Section):
    """How long things are kept."""

    audio_days: float | None = Field(None, gt=0, description="Delete audio older than this")
    text_days: float | None = Field(None, gt=0, description="Delete transcripts older than this")
    keep_audio: bool = Field(True, description="false: delete audio once it is transcribed")
    min_free_disk_mb: int = Field(500, ge=0, description="Below this, stop writing audio")
    sweep_interval_s: float = Field(
        3600.0,
        gt=0,
        le=_YEAR_S,  # the retention thread's wait takes no more (1e300: time_t overflows)
        description="How often retention runs",
    )


class LoggingSettings(Section):
    """Log output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Log level; INFO logs ids and timings, DEBUG also each transcript's words",
    )
    format: Literal["text", "json"] = Field(
        "text", description="text, or json: one object per line (ts, level, logger, message)"
    )
