"""`meraudiod config check`, `devices` and `mqtt test`: is the setup right before it runs?"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .checks import mqtt_file_problems, named_files, unmakeable_dirs, unreadable_files
from .cli_common import config_option, echo_json, json_option, settings_from
from .config import ConfigError
from .mic_source import input_devices
from .mounts import models_dir, storage_dirs, unmounted_paths
from .sources import FileSource, SourceError, file_path


@click.group("config")
def config_group() -> None:
    """Configuration.

    \b
    Example:
      meraudiod config check --config /etc/meraudiod/config.toml
    """


@config_group.command("check")
@config_option
@json_option
def config_check(config_path: Path | None, as_json: bool) -> None:
    """Validate the configuration (file and environment), check that every file it names is
    readable by this user, that every storage directory can be made (no part of its path is a
    file) and that none is on a disk fstab lists but nothing is mounted on, and say what is
    wrong.

    \b
    Examples:
      meraudiod config check --config /etc/meraudiod/config.toml
      MERAUDIOD_ASR__BEAM_SIZE=2 meraudiod config check --json
    """
    settings = settings_from(config_path)
    everything = storage_dirs(settings) | models_dir(settings) | named_files(settings)
    not_mounted = unmounted_paths(everything)
    if not_mounted:  # a file beneath the mount point is missing, or a stale copy
        raise click.ClickException(not_mounted)
    problems = unmakeable_dirs(settings) + (
        unreadable_files(settings) or mqtt_file_problems(settings)
    )
    if settings.audio.source.startswith("file:"):  # the file the daemon is to replay
        try:
            FileSource(file_path(settings.audio.source[5:])).check()
        except SourceError as exc:
            problems.append(f"audio.source: {exc}")
    if problems:
        raise click.ClickException("; ".join(problems))
    try:
        settings.http.resolved_token()  # an empty token file stops the start
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        echo_json(settings.without_secrets())
        return
    click.echo(f"configuration ok (data in {settings.storage.data_dir})")


@click.command()
@json_option
@click.option("--check", is_flag=True, help="Exit 1 when there is no input device.")
def devices(as_json: bool, check: bool) -> None:
    """List microphones (input devices).

    \b
    Examples:
      meraudiod devices
      meraudiod devices --check || echo "no microphone"
    """
    found = input_devices()
    if as_json:
        echo_json(found)
    else:
        for d in found:
            click.echo(f"{d['index']:3d}  {d['name']}  ({d['default_rate_hz']} Hz)")
        if not found:
            click.echo("no input devices", err=True)
    if check and not found:
        sys.exit(1)


@click.group("mqtt")
def mqtt_group() -> None:
    """The MQTT connection.

    \b
    Example:
      meraudiod mqtt test
    """


@mqtt_group.command("test")
@config_option
def mqtt_test(config_path: Path | None) -> None:
    """Check DNS, TCP, TLS, CONNECT and a publish/subscribe round trip; say which step failed.

    \b
    Example:
      MERAUDIOD_MQTT__ENABLED=true MERAUDIOD_MQTT__HOST=broker.lan meraudiod mqtt test
    """
    from .mqtt_check import check_connection

    settings = settings_from(config_path)
    mqtt_files = {k: v for k, v in named_files(settings).items() if k.startswith("mqtt.")}
    not_mounted = unmounted_paths(mqtt_files)
    if not_mounted:
        raise click.ClickException(not_mounted)
    problems = mqtt_file_problems(settings)
    if problems:
        click.echo(f"{'files':<10} FAIL {'; '.join(problems)}")
        raise click.ClickException("MQTT check failed at step files")
    if not settings.mqtt.enabled:  # the default: a failure below may be no surprise
        click.echo(
            "note: mqtt.enabled is false: the daemon does not connect; testing the configured"
            f" broker ({settings.mqtt.host}:{settings.mqtt.port}) all the same",
            err=True,
        )
    steps = check_connection(settings)
    for name, ok, detail in steps:
        click.echo(f"{name:<10} {'ok  ' if ok else 'FAIL'} {detail}")
    if not steps[-1][1] or steps[-1][0] != "roundtrip":
        failed = next(name for name, ok, _ in steps if not ok)
        raise click.ClickException(f"MQTT check failed at step {failed}")
