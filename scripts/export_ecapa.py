"""Export SpeechBrain's ECAPA-TDNN (spkrec-ecapa-voxceleb) to ONNX and check it against speechbrain.

Runs only inside the export venv that `scripts/export-models` builds (torch + speechbrain);
never in the daemon's environment.

    python scripts/export_ecapa.py --ckpt embedding_model.ckpt --out ecapa.onnx a.flac b.wav

Graph: input `feats` float32 [1, frames, 80] (from `meraudiod.features.fbank`: log-mel +
sentence mean norm), output `embedding` float32 [1, 192], the raw ECAPA output that
`EncoderClassifier.encode_batch` returns (it leaves `mean_var_norm_emb` off by default).

Parity: the reference is speechbrain's own pipeline as in `encode_batch`, Fbank(n_mels=80) ->
InputNormalization(sentence, std_norm=False) -> ECAPA_TDNN; the candidate is our numpy
features + onnxruntime. Exit 1 if any file's cosine is below --min-cos or its features differ
by more than --max-feat-db. `--reference FILE.npz` also saves speechbrain's embeddings (and
the features of the first file), which tests/test_speakers.py compares against without torch.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import soundfile
import torch
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
from speechbrain.processing.features import InputNormalization

from meraudiod.features import fbank

OPSET = 17


class FeatsOnly(torch.nn.Module):  # type: ignore[misc]
    """ECAPA on precomputed features; lengths=None is all-ones lengths for batch 1."""

    def __init__(self, model: ECAPA_TDNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """[1, frames, 80] -> [1, 192]."""
        return self.model(feats).squeeze(1)


def load_ecapa(ckpt: Path) -> ECAPA_TDNN:
    """The architecture of spkrec-ecapa-voxceleb's hyperparams.yaml with the checkpoint."""
    model = ECAPA_TDNN(
        input_size=80,
        channels=[1024, 1024, 1024, 1024, 3072],
        kernel_sizes=[5, 3, 3, 3, 1],
        dilations=[1, 2, 3, 4, 1],
        attention_channels=128,
        lin_neurons=192,
    )
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def export(model: ECAPA_TDNN, out: Path) -> None:
    """TorchScript exporter (one self-contained file, opset 17), then fixed producer fields."""
    # The tracer warns about len() in speechbrain's length_to_mask: harmless for batch 1,
    # where lengths=None means the whole input.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(
        FeatsOnly(model).eval(),
        (torch.randn(1, 300, 80),),
        str(out),
        input_names=["feats"],
        output_names=["embedding"],
        dynamic_axes={"feats": {1: "frames"}},
        opset_version=OPSET,
        dynamo=False,
    )
    # The producer version is the only thing that differs between torch releases; fixing it
    # keeps the file's sha256 (checked by the manifest) the same on every machine.
    graph = onnx.load(str(out))
    graph.producer_name = "meraudiod scripts/export-models"
    graph.producer_version = "speechbrain-1.1.2"
    onnx.checker.check_model(graph)
    onnx.save(graph, str(out))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def parity(
    model: ECAPA_TDNN, onnx_path: Path, files: list[Path], min_cos: float, max_feat_db: float
) -> tuple[bool, dict[str, np.ndarray]]:
    """Speechbrain's pipeline against ours on every file; the reference arrays."""
    compute_features = Fbank(n_mels=80).eval()
    mean_norm = InputNormalization(norm_type="sentence", std_norm=False).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    ok, embeddings, names = True, [], []
    first_feats = np.zeros((0, 80), np.float32)
    for path in files:
        audio, rate_hz = soundfile.read(path, dtype="float32")
        if rate_hz != 16000 or audio.ndim != 1:
            raise SystemExit(f"{path}: the parity files must be 16 kHz mono")
        with torch.no_grad():  # exactly what EncoderClassifier.encode_batch does
            wav, lens = torch.from_numpy(audio)[None], torch.ones(1)
            ref_feats = mean_norm(compute_features(wav), lens)
            ref = model(ref_feats, lens).reshape(-1).numpy()
        feats = fbank(audio)
        ours = session.run(["embedding"], {"feats": feats[None]})[0].reshape(-1)
        feat_db = float(np.abs(feats - ref_feats[0].numpy()).max())
        cos = cosine(ref, ours)
        good = cos >= min_cos and feat_db <= max_feat_db
        ok &= good
        print(
            f"  {path.name}: {audio.size / 16000:.2f} s, features max diff {feat_db:.1e} dB,"
            f" cosine {cos:.7f}{'' if good else '  FAILED'}"
        )
        embeddings.append(ref)
        names.append(path.name)
        if not first_feats.size:
            first_feats = ref_feats[0].numpy()
    return ok, {"files": np.array(names), "embeddings": np.stack(embeddings), "feats0": first_feats}


def main() -> int:
    """Export, check, report the file's sha256."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-cos", type=float, default=0.999)
    parser.add_argument("--max-feat-db", type=float, default=0.01)
    parser.add_argument("--reference", type=Path, help="save speechbrain's embeddings here")
    parser.add_argument("files", type=Path, nargs="+", help="real speech for the parity check")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_ecapa(args.ckpt)
    export(model, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest})")
    print(f"parity against speechbrain on {len(args.files)} files:")
    ok, reference = parity(model, args.out, args.files, args.min_cos, args.max_feat_db)
    if args.reference is not None:
        np.savez_compressed(args.reference, **reference)
        print(f"wrote {args.reference}")
    print("parity ok" if ok else f"PARITY FAILED (cosine < {args.min_cos} or features differ)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
