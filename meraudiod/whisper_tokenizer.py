"""Whisper's tokenizer without the `tokenizers` library, for the daemon's memory.

faster-whisper loads a model's tokenizer.json with Hugging Face `tokenizers` (its library
and the loaded tokenizer hold about 20 MB resident) and then needs little of it: token ids
back to text, the ids of the special tokens, and text to ids for the symbols it suppresses
(computed once, at load, by `Transcriber`). `WhisperTokenizer` does those from a compact
table of each token's bytes (under 1 MB); the byte-level BPE that turns text into ids is
built when first needed and can be dropped again (`forget_encoder`). Anything else, or text
the standard `re` module cannot split as GPT-2's pattern does (numbers outside the decimal
digits, such as "½"), goes to the real library, loaded then. `install()` puts this module's
stand-in for `tokenizers` in sys.modules before faster-whisper is imported.
"""

from __future__ import annotations

import bisect
import importlib
import importlib.util
import itertools
import json
import re
import sys
import types
import unicodedata
from array import array
from functools import cache
from pathlib import Path
from typing import Any, Final

# GPT-2's pre-tokenizer pattern with \p{L} as [^\W\d_] and \p{N} as \d: the same split for
# every text without numeric characters outside Nd (`_same_split` checks).
_SPLIT: Final = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)


class EncodingError(Exception):
    """The tokenizer.json is not a byte-level BPE as Whisper's is."""


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = dict(zip(kept, kept, strict=True))
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + extra
            extra += 1
    return {chr(char): byte for byte, char in chars.items()}


def _same_split(text: str) -> bool:
    """Whether `_SPLIT` splits `text` as GPT-2's pattern would: no numerics outside Nd (\\d
    in `re`, which counts them as letters), no U+001C-U+001F (spaces to `re` only)."""
    return not any(unicodedata.category(c) in ("Nl", "No") or "\x1c" <= c <= "\x1f" for c in text)


class _Encoding:
    """What `encode` returns: the ids, as tokenizers' Encoding has them."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class _Bpe:
    """Text to ids: GPT-2's byte-level BPE with the model's merges."""

    def __init__(self, data: dict[str, Any]) -> None:
        model = data["model"]
        self.vocab: dict[str, int] = model["vocab"]
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        self.ranks = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        self.char_of_byte = {byte: char for char, byte in _byte_of_char().items()}

    def word(self, word: str) -> list[int]:
        """The ids of one pre-tokenized word."""
        parts = [self.char_of_byte[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            none = len(self.ranks)
            rank, i = min(
                (self.ranks.get(p, none), i) for i, p in enumerate(itertools.pairwise(parts))
            )
            if rank == none:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab[p] for p in parts]


class WhisperTokenizer:
    """The part of `tokenizers.Tokenizer` that faster-whisper uses, for a Whisper
    tokenizer.json; anything else is answered by the real library."""

    def __init__(self, path: Path) -> None:
        self._path = path
        data = json.loads(path.read_bytes())
        model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
        if (
            model.get("type") != "BPE"
            or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space")
            or (data.get("decoder") or {}).get("type") != "ByteLevel"
            or data.get("normalizer")
        ):
            raise EncodingError(f"{path} is not a byte-level BPE tokenizer")
        added = data.get("added_tokens") or []
        self._added: dict[str, int] = {t["content"]: t["id"] for t in added}
        self._special = frozenset(t["id"] for t in added if t.get("special"))
        size = max([*model["vocab"].values(), *self._added.values()]) + 1
        pieces = [b""] * size
        byte_of = _byte_of_char()
        for token, index in model["vocab"].items():
            pieces[index] = bytes(byte_of[c] for c in token)
        for content, index in self._added.items():
            pieces[index] = content.encode("utf-8")
        self._blob = b"".join(pieces)
        self._ends = array("I")
        end = 0
        for piece in pieces:
            end += len(piece)
            self._ends.append(end)
        self._added_split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")"
        )
        self._bpe: _Bpe | None = None
        self._real: Any = None

    def _piece(self, index: int) -> bytes:
        start = self._ends[index - 1] if index else 0
        return self._blob[start : self._ends[index]]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (bytes that are not UTF-8 become U+FFFD, as in tokenizers)."""
        skip = self._special if skip_special_tokens else frozenset()
        data = b"".join(self._piece(i) for i in ids if i not in skip)
        return data.decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """The id of an added (special) token or of a vocabulary entry; None if none."""
        if token in self._added:
            return self._added[token]
        try:
            data = bytes(_byte_of_char()[c] for c in token)
        except KeyError:
            return None
        at = self._blob.find(data)
        while data and at >= 0:  # where a piece starts with it: is that piece all of it?
            index = bisect.bisect_right(self._ends, at)
            if self._piece(index) == data:
                return index
            at = self._blob.find(data, at + 1)
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        """The ids of `text` (an Encoding with `.ids`), added tokens matched whole."""
        if add_special_tokens or not _same_split(text):
            return self._real_tokenizer().encode(text, add_special_tokens=add_special_tokens)
        if self._bpe is None:
            self._bpe = _Bpe(json.loads(self._path.read_bytes()))
        ids: list[int] = []
        for part in self._added_split.split(text) if self._added else [text]:
            if part in self._added:
                ids.append(self._added[part])
            elif part:
                for word in _SPLIT.findall(part):
                    ids.extend(self._bpe.word(word))
        return _Encoding(ids)

    def forget_encoder(self) -> None:
        """Drop the BPE tables (about 10 MB) until `encode` needs them again."""
        self._bpe = None

    def _real_tokenizer(self) -> Any:
        if self._real is None:
            self._real = _real_module().Tokenizer.from_file(str(self._path))
        return self._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real_tokenizer(), name)


class _TokenizerFactory:
    """`tokenizers.Tokenizer` as faster-whisper calls it: a Whisper tokenizer.json gets a
    WhisperTokenizer, anything else the real class."""

    @staticmethod
    def from_file(path: str) -> Any:
        try:
            return WhisperTokenizer(Path(path))
        except (EncodingError, KeyError, ValueError, TypeError):
            return _real_module().Tokenizer.from_file(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(_real_module().Tokenizer, name)


class _StandIn(types.ModuleType):
    """`tokenizers` in sys.modules until something other than `Tokenizer` is used."""

    Tokenizer = _TokenizerFactory()

    def __getattr__(self, name: str) -> Any:
        return getattr(_real_module(), name)


def _real_module() -> Any:
    if isinstance(sys.modules.get("tokenizers"), _StandIn):
        del sys.modules["tokenizers"]
    return importlib.import_module("tokenizers")


def install() -> None:
    """Put the stand-in for `tokenizers` in sys.modules (before faster-whisper is imported);
    nothing when the real library is already loaded."""
    if "tokenizers" not in sys.modules and importlib.util.find_spec("tokenizers") is not None:
        sys.modules["tokenizers"] = _StandIn("tokenizers")
