"""`meraudiod models`: list, install and verify model files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from . import models as modelstore
from .cli_common import config_option, echo_json, json_option, refuse_unmounted, settings_from
from .mounts import models_dir


@click.group("models")
def models_group() -> None:
    """Model files: list, install, verify against the manifest's checksums.

    \b
    Examples:
      meraudiod models list
      meraudiod models install --default
    """


@models_group.command("list")
@config_option
@json_option
def models_list(config_path: Path | None, as_json: bool) -> None:
    """Supported models, whether each is installed, and the sha256 of each of its files.

    \b
    Examples:
      meraudiod models list                # * marks the models the configuration uses
      meraudiod models list --json | jq '.[] | select(.installed) | .files'
    """
    settings = settings_from(config_path)
    models_dir = settings.storage.resolved_models_dir
    used = set(modelstore.configured(settings))
    rows: list[dict[str, Any]] = [
        {
            "name": m.name,
            "role": m.role,
            "licence": m.licence,
            "source": m.source,
            "installed": modelstore.is_installed(m.name, models_dir),
            "configured": m.name in used,
            "description": m.description,
            "files": m.files,  # file name -> sha256, as the manifest has it
        }
        for m in modelstore.manifest().values()
    ]
    if as_json:
        echo_json(rows)
        return
    name_w = max((len(r["name"]) for r in rows), default=0)  # columns fit the longest
    role_w = max((len(r["role"]) for r in rows), default=0)
    for r in rows:
        mark = "installed" if r["installed"] else "-"
        used_mark = "*" if r["configured"] else " "
        click.echo(
            f"{used_mark} {r['name']:<{name_w}}  {r['role']:<{role_w}}  {mark:<10} "
            f"{r['description']}"
        )
        for file_name, sha256 in r["files"].items():
            click.echo(f"    sha256 {sha256}  {file_name}")
        if not r["files"]:
            click.echo("    (no checksums: recorded when installed from the hub)")


@models_group.command("install")
@config_option
@click.argument("names", nargs=-1)
@click.option("--default", "defaults", is_flag=True, help="The models the configuration uses.")
@click.option(
    "--from",
    "from_file",
    type=click.Path(path_type=Path),
    help="Install the one named model from this file (e.g. an ONNX exported on another machine).",
)
def models_install(
    config_path: Path | None, names: tuple[str, ...], defaults: bool, from_file: Path | None
) -> None:
    """Install models into the models directory and check their checksums (or parity).

    \b
    Examples:
      meraudiod models install --default
      meraudiod models install ecapa-voxceleb --from /media/usb/ecapa-voxceleb.onnx
    """
    settings = settings_from(config_path)
    refuse_unmounted(models_dir(settings))  # what it writes; not the data's disk
    if from_file is not None and (len(names) != 1 or defaults):
        raise click.UsageError("--from installs exactly one named model")
    wanted = list(names) + (modelstore.configured(settings) if defaults or not names else [])
    for name in dict.fromkeys(wanted):
        try:
            path = modelstore.install(name, settings.storage.resolved_models_dir, from_file)
        except modelstore.ModelError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{name}: {path}")


@models_group.command("verify")
@config_option
@click.argument("names", nargs=-1)
def models_verify(config_path: Path | None, names: tuple[str, ...]) -> None:
    """Check installed models against the manifest (default: the configured ones).

    \b
    Examples:
      meraudiod models verify
      meraudiod models verify ecapa-voxceleb
    """
    settings = settings_from(config_path)
    problems = []
    for name in names or modelstore.configured(settings):
        try:
            found = modelstore.verify(name, settings.storage.resolved_models_dir)
        except modelstore.ModelError as exc:
            found = [str(exc)]
        problems += found
        click.echo(f"{name}: {'ok' if not found else 'FAILED'}")
    if problems:
        raise click.ClickException("; ".join(problems))
