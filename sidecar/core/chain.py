"""The audit hash chain (pure): canonical frame bytes and the chain step.

chain_hash(step) = SHA-256(chain_hash(step - 1) || frame_bytes(step)), starting from
genesis(session_id). Frame bytes hold only deterministic fields (no timestamp), so the
same logits, config and seed give the same chain; the canonical encoding is written up
in proto/fse/v1/VERDICT.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from . import canonical as cb
from .guards import Trip


def genesis(session_id: str) -> bytes:
    return hashlib.sha256(b"fse.v1.genesis" + session_id.encode("utf-8")).digest()


def reasons_bytes(reasons: Iterable[Trip]) -> bytes:
    items = list(reasons)
    out = [cb.u32(len(items))]
    for r in items:
        out += [cb.string(r.code), cb.f64(r.value), cb.f64(r.threshold), cb.u32(int(r.sampler)), cb.string(r.detail)]
    return b"".join(out)


def frame_bytes(session_id: str, step: int, token: int, decision: int, sampler: int, reasons: Iterable[Trip]) -> bytes:
    return b"".join(
        [
            b"fse.v1.frame",
            cb.string(session_id),
            cb.u64(step),
            cb.i64(token),
            cb.u32(decision),
            cb.u32(sampler),
            hashlib.sha256(reasons_bytes(reasons)).digest(),
        ]
    )


def chain_next(prev: bytes, frame: bytes) -> bytes:
    if len(prev) != 32:
        raise ValueError(f"previous chain hash must be 32 bytes, got {len(prev)}")
    return hashlib.sha256(prev + frame).digest()
