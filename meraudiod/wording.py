"""How counts read in what the user sees: `1 recording`, `2 recordings`."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """`n` and the noun, plural unless n is 1 (the nouns used take an s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
