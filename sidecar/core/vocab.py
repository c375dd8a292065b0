"""Registered vocabularies: token id -> bytes, keyed by a content digest."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import VocabularyError


def vocab_digest(tokens: Sequence[bytes]) -> str:
    """Hex SHA-256 over u32-LE(count) then u32-LE(len) + bytes of each token, in id order
    (proto/fse/v1/PROTOCOL.md, "Vocabulary digest")."""
    h = hashlib.sha256(len(tokens).to_bytes(4, "little"))
    for t in tokens:
        h.update(len(t).to_bytes(4, "little"))
        h.update(t)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Vocabulary:
    digest: str
    tokens: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, tokens: Sequence[bytes], max_size: int) -> Vocabulary:
        if len(tokens) < 2:
            raise VocabularyError(f"a vocabulary needs at least 2 tokens, got {len(tokens)}")
        if len(tokens) > max_size:
            raise VocabularyError(f"vocabulary of {len(tokens)} tokens exceeds max_vocab_size {max_size}")
        return cls(vocab_digest(tokens), tuple(bytes(t) for t in tokens))
