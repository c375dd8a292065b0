"""The audit hash chain (pure): canonical frame bytes and the chain step.

chain_hash(step) = SHA-256(chain_hash(step - 1) || frame_bytes(step)), starting from
genesis(session_id, opening_nonce). Frame bytes hold only deterministic fields (no timestamp), so the
same logits, config and seed give the same chain; the canonical encoding is written up
in proto/fse/v1/VERDICT.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Protocol

from . import canonical as cb


class ReasonLike(Protocol):
    """A :class:`~sidecar.core.guards.Trip` or an ``fse.v1.Reason``: the same fields, read only."""

    @property
    def code(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    @property
    def sampler(self) -> int: ...
    @property
    def detail(self) -> str: ...
    @property
    def action(self) -> int: ...
    @property
    def token_id(self) -> int: ...
    @property
    def span_start(self) -> int: ...
    @property
    def span_end(self) -> int: ...


def genesis(session_id: str, opening_nonce: bytes) -> bytes:
    """SHA-256("fse.v1.genesis" | str session_id | blob opening_nonce): unique per opening,
    so a verdict of an earlier opening of the same id never links to this one."""
    return hashlib.sha256(b"fse.v1.genesis" + cb.string(session_id) + cb.blob(opening_nonce)).digest()


def reason_bytes(r: ReasonLike) -> bytes:
    """str code | f64 value | f64 threshold | u32 sampler | str detail | u32 action
    | i64 token_id | u64 span_start | u64 span_end (VERDICT.md)."""
    return b"".join(
        [
            cb.string(r.code),
            cb.f64(r.value),
            cb.f64(r.threshold),
            cb.u32(int(r.sampler)),
            cb.string(r.detail),
            cb.u32(int(r.action)),
            cb.i64(r.token_id),
            cb.u64(r.span_start),
            cb.u64(r.span_end),
        ]
    )


def reasons_bytes(reasons: Iterable[ReasonLike]) -> bytes:
    items = list(reasons)
    return cb.u32(len(items)) + b"".join(reason_bytes(r) for r in items)


def frame_bytes(session_id: str, step: int, token: int, decision: int, sampler: int, reasons: Iterable[ReasonLike]) -> bytes:
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
