"""Whisper's tokenizer without the `tokenizers` library: the same ids and text as the library
on the real tiny.en tokenizer.json, the same transcripts, and the library never loaded."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import tokenizers

from meraudiod.whisper_tokenizer import WhisperTokenizer

from .conftest import DEMO

# faster-whisper's non-speech symbols (tokenizer.py), and text of every kind GPT-2's
# pre-tokenizer splits: contractions, digits, underscores, runs of spaces, other scripts,
# an added token inside text, numerics the standard `re` counts as letters.
_TEXTS = [
    *'"#()*+/:;<=>@[\\]^_`{|}~「」『』♩♪♫♬♭♮♯',
    *[
        "<<",
        ">>",
        "<<<",
        ">>>",
        "--",
        "---",
        "-(",
        "-[",
        "('",
        '("',
        "((",
        "))",
        "(((",
        ")))",
        "[[",
        "]]",
        "{{",
        "}}",
        "♪♪",
        "♪♪♪",
    ],
    " -",
    " '",
    "Hello world, it's 3.14 o'clock!  Don't   stop__ now_ok",
    "naïve café über 東京 123abc  \t\n x",
    "I'm you'll we've they'd __init__ x_y",
    "a<|endoftext|>b",
    "½ Ⅻ ² x\x1cy",
]
_ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?'-_éü東京♪ \n\t"


def _pair(models_dir: Path) -> tuple[tokenizers.Tokenizer, WhisperTokenizer]:
    path = models_dir / "tiny.en" / "tokenizer.json"
    return tokenizers.Tokenizer.from_file(str(path)), WhisperTokenizer(path)


def test_decodes_every_token_and_sequence_as_the_tokenizers_library(models_dir: Path) -> None:
    real, ours = _pair(models_dir)
    size = real.get_vocab_size()
    assert size > 50000
    assert [ours.decode([i]) for i in range(size)] == [real.decode([i]) for i in range(size)]
    rng = random.Random(0)  # sequences that cut UTF-8 characters apart, specials among them
    for _ in range(5000):
        ids = [rng.randrange(size) for _ in range(rng.randint(1, 12))]
        assert ours.decode(ids) == real.decode(ids), ids
    vocab = json.loads((models_dir / "tiny.en" / "tokenizer.json").read_text())["model"]["vocab"]
    names = [*list(vocab)[::13], "<|en|>", "<|transcribe|>", "<|nospeech|>", "<|nocaptions|>", "?!"]
    assert [ours.token_to_id(t) for t in names] == [real.token_to_id(t) for t in names]


def test_encodes_text_as_the_tokenizers_library(models_dir: Path) -> None:
    real, ours = _pair(models_dir)
    rng = random.Random(1)
    texts = [*_TEXTS, *(" " + t for t in _TEXTS)]
    texts += [
        "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(2000)
    ]
    for text in texts:
        assert (
            ours.encode(text, add_special_tokens=False).ids
            == real.encode(text, add_special_tokens=False).ids
        ), repr(text)
    ours.forget_encoder()  # built again when needed
    assert ours.encode(" hello", add_special_tokens=False).ids == [23748]


_CHILD = """
import sys
from pathlib import Path

import soundfile

from meraudiod.asr import Transcriber
from meraudiod.audio import to_float32
from meraudiod.config import load_settings
from meraudiod.whisper_tokenizer import _real_module

def loaded() -> bool:
    return "tokenizers.abi3" in Path("/proc/self/maps").read_text()

def words(transcript):
    return [(w.text, w.start_s, w.end_s) for s in transcript.segments for w in s.words]

audio = to_float32(soundfile.read(sys.argv[1], dtype="int16")[0])
model = Transcriber(Path(sys.argv[2]), load_settings().asr, "tiny.en")
ours = [model.transcribe(audio[i * 16000 : (i + 8) * 16000]) for i in (0, 8, 16)]
print(loaded())
from faster_whisper.tokenizer import Tokenizer
model._model.hf_tokenizer = _real_module().Tokenizer.from_file(sys.argv[2] + "/tokenizer.json")
print(loaded())
print(list(Tokenizer(model._model.hf_tokenizer, False).non_speech_tokens) == model._suppress_tokens)
model._suppress_tokens = [-1]  # faster-whisper's default, worked out by the library
real = [model.transcribe(audio[i * 16000 : (i + 8) * 16000]) for i in (0, 8, 16)]
texts = [t.text for t in ours] == [t.text for t in real]
print(texts, list(map(words, ours)) == list(map(words, real)))
print(" | ".join(t.text for t in ours))
"""


def test_transcripts_are_the_same_and_the_library_is_never_loaded(models_dir: Path) -> None:
    """The daemon's Transcriber against the same model given the real tokenizer: the same
    text and word times, the same suppressed symbols; `tokenizers` loads only when asked."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(DEMO), str(models_dir / "tiny.en")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    before, after, same_suppressed, same, text = result.stdout.splitlines()
    assert (before, after) == ("False", "True")  # not loaded until the real one was asked for
    assert same_suppressed == "True"
    assert same == "True True", text
    assert "dashwood" in text.lower()
