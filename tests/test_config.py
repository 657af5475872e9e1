"""Configuration: the example documents every key, errors say which key or file."""

from __future__ import annotations

import json
import os
import pwd
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from meraudiod.compat import tomllib
from meraudiod.config import ConfigError, Settings, load_settings

from .conftest import REPO, SUITE_SETTINGS, TEST_DATA, cli


@pytest.fixture
def file_values(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The `env` fixture's environment less the suite's own settings (SUITE_SETTINGS), for
    tests of the values a configuration file gives."""
    for key in SUITE_SETTINGS:
        monkeypatch.delenv(key)


def test_example_parses_and_documents_every_key(file_values: None) -> None:
    example = REPO / "config.example.toml"
    settings = load_settings(example)
    assert settings.asr.model == "tiny.en"
    assert settings.mqtt.enabled is False and settings.speakers.enabled is False
    text = example.read_text()
    blocks = {b.split("]", 1)[0]: b for b in text.split("\n[")[1:]}
    sections = [(name, f.annotation) for name, f in Settings.model_fields.items()]
    for section, model in sections:
        block = blocks[section]
        for key, field in model.model_fields.items():  # type: ignore[union-attr]
            assert f"\n{key} =" in block or f"\n# {key} =" in block, f"{section}.{key}"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                sections.append((f"{section}.{key}", field.annotation))  # [asr.wyoming]
    # every key that is set in the example has the default's value
    defaults = Settings().model_dump()
    for section, values in tomllib.loads(text).items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"{section}.{key}"


def test_unknown_key_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[audio]\nsorce = "mic"\n')
    with pytest.raises(ConfigError, match=r"audio\.sorce: unknown key"):
        load_settings(path)


def test_unknown_section_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[audoi]\nsource = 'mic'\n")
    with pytest.raises(ConfigError, match=r"audoi: unknown key"):
        load_settings(path)


def test_bad_value_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[vad]\nstart_threshold = 0.2\nend_threshold = 0.4\n")
    with pytest.raises(ConfigError, match=r"end_threshold"):
        load_settings(path)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[mqtt]\nbase_topic = "home/#"\n', "mqtt.base_topic"),
        ('[mqtt]\nbase_topic = "home/+/audio"\n', "mqtt.base_topic"),
        ('[homeassistant]\ndiscovery_prefix = "ha/#"\n', "homeassistant.discovery_prefix"),
    ],
)
def test_a_topic_prefix_with_a_wildcard_is_named(
    tmp_path: Path, env: dict[str, str], toml: str, key: str
) -> None:
    # A wildcard is no topic to publish to: the broker closed every connection (the last
    # will's topic), and the log said only "closed before CONNACK; retrying", for ever.
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(key) + ".*wildcard"):
        load_settings(path)


@pytest.mark.parametrize("rate", ["-48000", "0", "5", "100000000"])
def test_a_device_rate_no_sound_card_has_is_named(
    tmp_path: Path, env: dict[str, str], rate: str
) -> None:
    # Accepted before: PortAudio then refused to open the card at that rate, and the daemon
    # waited for "the microphone" for ever, as if it were unplugged (0 meant the native rate).
    path = tmp_path / "c.toml"
    path.write_text(f"[audio]\ndevice_rate_hz = {rate}\n")
    with pytest.raises(ConfigError, match=r"audio\.device_rate_hz"):
        load_settings(path)


@pytest.mark.parametrize(
    ("section", "key"), [("asr", "cpu_threads"), ("vad", "threads"), ("speakers", "threads")]
)
def test_thousands_of_threads_are_named(
    tmp_path: Path, file_values: None, section: str, key: str
) -> None:
    # Found by hostile testing: asr.cpu_threads = 5000 was accepted and transcription ran about
    # twenty times slower than real time (threads fighting over a Pi's four cores).
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{key} = 5000\n")
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load_settings(path)


def test_missing_named_file_is_an_error(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"not found: .*absent.toml"):
        load_settings(tmp_path / "absent.toml")


def test_named_by_environment_must_exist(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERAUDIOD_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone.toml"):
        load_settings()


def test_a_data_dir_that_cannot_be_made_is_named_by_config_check_and_analyze(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """`storage.data_dir` under a regular file (a typo, a file where a mount point was
    meant): `config check` said `configuration ok`, and `analyze` failed with `[Errno 20]
    Not a directory: '.../data/audio'`, naming no key. Now both name it; `config check`
    makes nothing to find out."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a directory")
    bad = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(notes / "data")}
    checked = cli("config", "check", env=bad)
    assert checked.returncode == 1, checked.stdout
    assert checked.stderr.strip() == (
        f"Error: storage.data_dir: {notes}/data cannot be made: {notes} is not a directory"
    )
    analyzed = cli("analyze", str(TEST_DATA / "ls_103_0000.flac"), env=bad)
    assert analyzed.returncode == 1, analyzed.stdout
    assert analyzed.stderr.strip() == (
        f"Error: storage.data_dir: {notes}/data is not writable by user"
        f" {pwd.getpwuid(os.geteuid()).pw_name}: Not a directory"
    ), analyzed.stderr
    fine = cli("config", "check", env=env)  # nothing made by looking
    assert fine.returncode == 0 and not Path(env["MERAUDIOD_STORAGE__DATA_DIR"]).exists()


def test_broken_toml_names_the_file(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[audio\n")
    with pytest.raises(ConfigError, match=r"c.toml"):
        load_settings(path)


def test_environment_overrides_file(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[asr]\nbeam_size = 2\nmodel = 'base.en'\n[mqtt]\nnode_id = 'Living Room!'\n")
    monkeypatch.setenv("MERAUDIOD_ASR__BEAM_SIZE", "4")
    settings = load_settings(path)
    assert settings.asr.beam_size == 4
    assert settings.asr.model == "base.en"
    assert settings.mqtt.node_id == "living_room"


def test_unknown_environment_key_is_named(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERAUDIOD_ASR__BEEM_SIZE", "4")
    with pytest.raises(ConfigError, match=r"asr\.beem_size: unknown key"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        # A mistyped section, or one underscore for two: pydantic-settings skipped them, so
        # the secret or the setting was silently not used.
        ("MERAUDIOD_AUDOI__SOURCE", "stdin", "audoi: unknown key (from MERAUDIOD_AUDOI__SOURCE)"),
        (
            "MERAUDIOD_MQTT_PASSWORD",
            "secret",
            "MERAUDIOD_MQTT_PASSWORD: unknown key (a key is set as MERAUDIOD_MQTT__PASSWORD)",
        ),
        # A bad value from the environment was blamed on the file, which holds another one.
        (
            "MERAUDIOD_ASR__BEAM_SIZE",
            "two",
            "asr.beam_size: Input should be a valid integer, unable to parse string as an"
            " integer (from MERAUDIOD_ASR__BEAM_SIZE)",
        ),
    ],
)
def test_a_mistyped_or_bad_environment_variable_is_named(
    env: dict[str, str], variable: str, value: str, line: str
) -> None:
    config = env["MERAUDIOD_CONFIG"]
    Path(config).write_text("[asr]\nbeam_size = 2\n")
    result = cli("config", "check", env={**env, variable: value})
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == f"Error: invalid configuration ({config}): {line}"


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("MERAUDIOD_MQTT__AREA", "mqtt.area"),
        ("MERAUDIOD_MQTT__USERNAME", "mqtt.username"),
        ("MERAUDIOD_MQTT__BASE_TOPIC", "mqtt.base_topic"),
        ("MERAUDIOD_ASR__LANGUAGE", "asr.language"),
    ],
)
def test_a_setting_that_is_not_utf8_text_is_named(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, variable: str, key: str
) -> None:
    # "K\xfcche" written in Latin-1 into /etc/meraudiod/environment: systemd passes the byte
    # on, Python makes it a lone surrogate. As mqtt.area it failed every transcript (the event
    # could not be encoded) until each recording was left failed; as mqtt.username or
    # base_topic the MQTT stage died at connect, and the service restarted for ever.
    monkeypatch.setenv(variable, "K\udcfcche")
    with pytest.raises(ConfigError, match=re.escape(key) + ".*not valid UTF-8"):
        load_settings()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[http]\nenabled = true\nmax_upload_mb = inf\n", "http.max_upload_mb"),
        ("[retention]\nsweep_interval_s = inf\n", "retention.sweep_interval_s"),
        ("[retention]\nsweep_interval_s = 1e300\n", "retention.sweep_interval_s"),
    ],
)
def test_an_endless_number_is_named_not_a_crash(env: dict[str, str], toml: str, key: str) -> None:
    # TOML has inf, and a bound "greater than 0" lets it (and 1e300) through: config check
    # said "configuration ok", then the start died of it, exit 1, which systemd restarts
    # every 5 s for ever ("Error: OverflowError: cannot convert float infinity to integer";
    # the retention thread's traceback, "timestamp out of range for platform time_t").
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    check = cli("config", "check", env=env)
    assert check.returncode != 0 and key in check.stderr, check.stderr + check.stdout
    run = cli("run", "--source", "demo", env=env)
    assert run.returncode == 78, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: invalid configuration") and key in last, run.stderr


@pytest.mark.parametrize(
    "variable",
    [
        "MERAUDIOD_MQTT__PASSWORD_FILE",
        "MERAUDIOD_MQTT__TLS_CA_FILE",
        "MERAUDIOD_MQTT__TLS_CERT_FILE",
        "MERAUDIOD_MQTT__TLS_KEY_FILE",
    ],
)
def test_an_empty_mqtt_file_is_not_set(env: dict[str, str], variable: str) -> None:
    # "An empty path means not set, never the current directory" held for the storage
    # directories and http.token_file only: an empty MQTT file was "." ("mqtt.password_file:
    # cannot read . as user root: Is a directory"; "mqtt.tls_ca_file is set but mqtt.tls is
    # false"), and the daemon ran with MQTT off saying so.
    result = cli("config", "check", env={**env, variable: ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration ok"), result.stdout


def test_a_config_file_saved_with_a_byte_order_mark_is_read(env: dict[str, str]) -> None:
    # Notepad (and other Windows editors) save UTF-8 with a byte order mark, which no editor
    # shows: the file was refused as "Invalid statement (at line 1, column 1)".
    Path(env["MERAUDIOD_CONFIG"]).write_bytes(b"\xef\xbb\xbf[asr]\r\nbeam_size = 2\r\n")
    result = cli("config", "check", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["asr"]["beam_size"] == 2


@pytest.mark.parametrize(
    ("toml", "keys"),
    [
        # "cannot load ASR model . (damaged or incomplete?)", exit 78: no key named.
        ('[asr]\nmodel = ""\n', ["asr.model"]),
        ('[asr]\nmodel = "  "\n', ["asr.model"]),
        # Accepted: faster-whisper then warned at every transcript and transcribed in English.
        ('[asr]\nlanguage = "de"\n', ["asr.language", "asr.model", "tiny.en"]),
        (
            '[asr]\nlanguage = "fr"\nmodel = "base.en"\nbackend = "wyoming"\n'
            '[asr.wyoming]\nservers = ["tcp://127.0.0.1:1"]\n',
            ["asr.language", "asr.model", "base.en"],
        ),
        ('[asr]\nlanguage = "auto"\nlanguages = ["de"]\n', ["asr.languages", "asr.model"]),
    ],
)
def test_an_asr_model_that_cannot_serve_the_config_is_named(
    env: dict[str, str], toml: str, keys: list[str]
) -> None:
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    check = cli("config", "check", env=env)
    assert check.returncode != 0, check.stdout
    assert all(key in check.stderr for key in keys), check.stderr
    run = cli("run", "--source", "demo", env=env)
    assert run.returncode == 78, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: invalid configuration"), run.stderr
    assert all(key in last for key in keys), run.stderr


def test_a_home_directory_of_no_user_is_named(env: dict[str, str]) -> None:
    """`~nosuchuser/run` was a traceback (pathlib's RuntimeError) from `config check` and
    the start."""
    Path(env["MERAUDIOD_CONFIG"]).write_text('[storage]\nrun_dir = "~nosuchuser/run"\n')
    for args, code in ((("config", "check"), 1), (("run", "--source", "demo"), 78)):
        result = cli(*args, env=env)
        assert result.returncode == code, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "storage.run_dir" in lines[0], result.stderr
        assert "no home directory for ~nosuchuser" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("toml", "key", "value"),
    [
        # Accepted by `config check` and the start; every transcript then failed (or, a
        # server's, went out with a language no one knows).
        ('[asr]\nmodel = "tiny"\nlanguage = "englsh"\n', "asr.language", "englsh"),
        ('[asr]\nmodel = "tiny"\nlanguage = "xx"\n', "asr.language", "xx"),
        (
            '[asr]\nmodel = "tiny"\nlanguage = "auto"\nlanguages = ["de", "frnch"]\n',
            "asr.languages",
            "frnch",
        ),
        (
            '[asr]\nlanguage = "xx"\nbackend = "wyoming"\nfallback = "wait"\n'
            '[asr.wyoming]\nservers = ["tcp://127.0.0.1:1"]\n',
            "asr.language",
            "xx",
        ),
    ],
)
def test_an_asr_language_whisper_does_not_know_is_named(
    env: dict[str, str], toml: str, key: str, value: str
) -> None:
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    check = cli("config", "check", env=env)
    assert check.returncode != 0, check.stdout
    assert key in check.stderr and repr(value) in check.stderr, check.stderr
    run = cli("run", "--source", "demo", env=env)
    assert run.returncode == 78, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: invalid configuration"), run.stderr
    assert key in lines[0] and repr(value) in lines[0], lines


def test_the_languages_known_are_faster_whispers() -> None:
    """The list the config checks against is the one the model's tokenizer takes."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    from meraudiod.config_sections import WHISPER_LANGUAGES

    assert set(WHISPER_LANGUAGES) == set(_LANGUAGE_CODES)


@pytest.mark.parametrize(
    "toml",
    [
        '[asr]\nlanguage = "auto"\n',  # detection: English-only models take English
        '[asr]\nlanguage = ""\n',
        '[asr]\nlanguage = "en"\nmodel = "tiny.en"\n',
        '[asr]\nlanguage = "de"\nmodel = "tiny"\n',
        # the local model is never loaded: the servers take the language
        '[asr]\nlanguage = "de"\nbackend = "wyoming"\nfallback = "wait"\n'
        '[asr.wyoming]\nservers = ["tcp://127.0.0.1:1"]\n',
        '[asr]\nlanguage = "de"\nenabled = false\n',
        '[asr]\nlanguage = "auto"\nmodel = "tiny"\nlanguages = ["yue", "haw", "fr"]\n',
    ],
)
def test_an_asr_language_the_model_can_serve_is_taken(env: dict[str, str], toml: str) -> None:
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    check = cli("config", "check", "--json", env=env)
    assert check.returncode == 0, check.stderr
    language = json.loads(check.stdout)["asr"]["language"]
    # "auto" (or "") is detection: before, the file had no way to ask for it ("comment out
    # to detect it" gave the default, "en"), and "auto" failed every transcript.
    assert language == (
        "de" if '"de"' in toml else None if "auto" in toml or '""' in toml else "en"
    )


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        # Found by fault injection: taken silently ("yes" as true, true as 1 ms).
        ('[asr]\nenabled = "yes"\n', "asr.enabled"),
        ("[recorder]\nmin_speech_ms = true\n", "recorder.min_speech_ms"),
        ('[recorder]\nhangover_ms = "700"\n', "recorder.hangover_ms"),
        ('[retention]\nkeep_audio = "false"\n', "retention.keep_audio"),
        ("[vad]\nstart_threshold = true\n", "vad.start_threshold"),
        ('[asr.wyoming]\nconnect_timeout_s = "3"\n', "asr.wyoming.connect_timeout_s"),
    ],
)
def test_a_value_of_the_wrong_type_in_the_file_is_named(
    env: dict[str, str], toml: str, key: str
) -> None:
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    check = cli("config", "check", env=env)
    assert check.returncode != 0 and key in check.stderr, check.stderr + check.stdout
    run = cli("run", "--source", "demo", env=env)
    assert run.returncode == 78, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: invalid configuration") and key in last, run.stderr


def test_values_of_the_wrong_type_and_out_of_range_are_named_at_once(tmp_path: Path) -> None:
    """A file with a value of the wrong type and others out of range: one refusal names them
    all (it named the wrong type alone, and the admin learnt of the others one fix later)."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[recorder]\nmin_speech_ms = "abc"\nhangover_ms = -5\n[vad]\nstart_threshold = 7\n'
    )
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    said = str(refused.value)
    assert said.startswith(f"invalid configuration ({path}): recorder.min_speech_ms: "), said
    for key in ("recorder.hangover_ms: ", "vad.start_threshold: "):
        assert key in said, said
    assert said.count("recorder.min_speech_ms") == 1, said


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MERAUDIOD_ASR__WYOMING__SERVERS", "a:1"),
        ("MERAUDIOD_HTTP__CORS_ORIGINS", "https://x"),
        ("MERAUDIOD_ASR", "x"),
    ],
)
def test_a_list_or_section_from_the_environment_that_is_not_json_is_named(
    env: dict[str, str], variable: str, value: str
) -> None:
    """A list or a whole section from the environment is read as JSON; one that is not was a
    60-line traceback naming no variable, exit 1: a bad line in the service's environment file
    restarted it for ever (found by fault injection). Now one line naming the variable, the
    configuration's exit code."""
    env = {**env, variable: value}
    check = cli("config", "check", env=env)
    assert check.returncode == 1 and "Traceback" not in check.stderr, check.stderr
    (line,) = check.stderr.strip().splitlines()
    assert line.startswith("Error: invalid configuration") and f"{variable}: " in line, line
    assert "JSON" in line, line
    run = cli("run", "--source", "demo", env=env)
    assert run.returncode == 78 and run.stderr.strip().splitlines()[-1] == line, run.stderr


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[storage]\ndata_dir = "/tmp/a\\u0000b"\n', "storage.data_dir"),
        ('[audio]\nsource = "file:/tmp/a\\u0000b"\n', "audio.source"),
        ('[asr.wyoming]\nservers = ["a\\u0000:1"]\n', "asr.wyoming.servers"),
    ],
)
def test_a_nul_character_in_the_file_is_named(env: dict[str, str], toml: str, key: str) -> None:
    """TOML can write a NUL (\\u0000), which no path or name can hold: `config check` and
    `status` ended in a traceback (`embedded null byte`), `run` named no key, and in
    `audio.source` it was `configuration ok` (found by fault injection)."""
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    own = {k: v for k, v in env.items() if k != "MERAUDIOD_STORAGE__DATA_DIR"}  # the file's
    for args in (["config", "check"], ["status"]):
        said = cli(*args, env=own)
        assert said.returncode != 0 and "Traceback" not in said.stderr, said.stderr
        line = said.stderr.strip().splitlines()[-1]
        assert f"{key}: " in line and "NUL" in line, line


def test_config_check_names_an_audio_source_file_that_is_not_there(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`audio.source = "file:..."` naming no file was `configuration ok`, and `run` then
    failed (found by fault injection); now `config check` names the key and the file."""
    missing = tmp_path / "nope.flac"
    Path(env["MERAUDIOD_CONFIG"]).write_text(f'[audio]\nsource = "file:{missing}"\n')
    check = cli("config", "check", env=env)
    assert check.returncode == 1, check.stdout
    assert check.stderr.strip() == f"Error: audio.source: {missing}: audio file not found"
    Path(env["MERAUDIOD_CONFIG"]).write_text(
        f'[audio]\nsource = "file:{TEST_DATA / "ls_103_0000.flac"}"\n'
    )
    assert cli("config", "check", env=env).returncode == 0


def test_the_environment_stays_text_and_paths_in_the_file_are_text(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Environment variables are always text: "false" and "800" are still a boolean and a
    # number; a path in the file is text, and a whole number of seconds a float.
    path = Path(env["MERAUDIOD_CONFIG"])
    path.write_text(
        "[mqtt]\npassword_file = '/etc/meraudiod/pw'\n[http]\ntoken_file = '/etc/t'\n"
        "[recorder]\nmin_speech_ms = 100\nmax_utterance_s = 20\n"
    )
    monkeypatch.setenv("MERAUDIOD_RETENTION__KEEP_AUDIO", "false")
    monkeypatch.setenv("MERAUDIOD_RECORDER__HANGOVER_MS", "800")
    settings = load_settings(path)
    assert settings.retention.keep_audio is False and settings.recorder.hangover_ms == 800
    assert settings.recorder.max_utterance_s == 20.0
    assert settings.mqtt.password_file == Path("/etc/meraudiod/pw")
    assert settings.http.token_file == Path("/etc/t")


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        # Found by fault injection: taken from the working directory, / under systemd.
        ('[storage]\ndata_dir = "data"\n', "storage.data_dir"),
        ('[storage]\nrun_dir = "./run"\n', "storage.run_dir"),
        ('[mqtt]\npassword_file = "secrets/pw"\n', "mqtt.password_file"),
        ('[http]\ntoken_file = "token"\n', "http.token_file"),
    ],
)
def test_a_relative_path_in_the_file_is_named(
    env: dict[str, str], tmp_path: Path, toml: str, key: str
) -> None:
    Path(env["MERAUDIOD_CONFIG"]).write_text(toml)
    elsewhere = {**env}
    elsewhere.pop("MERAUDIOD_STORAGE__DATA_DIR")
    check = cli("config", "check", env=elsewhere)
    assert check.returncode != 0, check.stdout
    assert f"{key}: " in check.stderr and "absolute" in check.stderr, check.stderr
    run = cli("run", "--source", "demo", env=elsewhere)
    assert run.returncode == 78, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: invalid configuration") and key in last, run.stderr
    # An absolute path or one from the home directory is taken; the environment's as given.
    Path(env["MERAUDIOD_CONFIG"]).write_text(f'[storage]\ndata_dir = "{tmp_path}/d"\n')
    assert cli("config", "check", env=elsewhere).returncode == 0
    Path(env["MERAUDIOD_CONFIG"]).write_text('[storage]\nmodels_dir = "~/models"\n')
    assert cli("config", "check", env=env).returncode == 0
