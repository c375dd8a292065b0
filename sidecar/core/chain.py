"""The audit hash chain (pure): canonical genesis, frame and receipt bytes.

chain_hash(step) = SHA-256(chain_hash(step - 1) || frame_bytes(step)), starting from the
genesis hash, which binds everything the session was opened with. Frame bytes hold only
deterministic fields (no timestamp), so the same logits, config and seed give the same
chain; the canonical encoding is written up in proto/fse/v1/VERDICT.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from . import canonical as cb
from .values import Value


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


class ProposalLike(Protocol):
    """A :class:`~sidecar.core.redo.ProposalRecord` or an ``fse.v1.Proposal``."""

    @property
    def token_id(self) -> int: ...
    @property
    def sampler(self) -> int: ...
    @property
    def reasons(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Opening:
    """What a session was opened with: the genesis hash binds all of it."""

    session_id: str
    opening_nonce: bytes
    sampling: bytes  # SamplingParams.canonical_bytes() of the effective parameters
    policy_digest: str
    vocab_digest: str
    model_id: str
    key_id: str

    def genesis(self) -> bytes:
        """SHA-256("fse.v1.genesis" | str session_id | blob opening_nonce | blob sampling
        | str policy_digest | str vocab_digest | str model_id | str key_id): unique per
        opening, so a verdict of an earlier opening of the same id never links here."""
        return hashlib.sha256(
            b"fse.v1.genesis"
            + cb.string(self.session_id)
            + cb.blob(self.opening_nonce)
            + cb.blob(self.sampling)
            + cb.string(self.policy_digest)
            + cb.string(self.vocab_digest)
            + cb.string(self.model_id)
            + cb.string(self.key_id)
        ).digest()


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
    return cb.u32(len(items)) + b"".join([reason_bytes(r) for r in items])


_NO_REASONS = hashlib.sha256(cb.u32(0)).digest()  # most steps: computed once


def reasons_digest(reasons: Iterable[ReasonLike]) -> bytes:
    items = list(reasons)
    return hashlib.sha256(reasons_bytes(items)).digest() if items else _NO_REASONS


_PROPOSAL = struct.Struct("<qII")  # i64 token_id | u32 sampler | u32 reasons


def proposals_bytes(proposals: Iterable[ProposalLike]) -> bytes:
    """u32 count, then i64 token_id | u32 sampler | u32 reasons of each proposal in order."""
    items = list(proposals)
    return cb.u32(len(items)) + b"".join([_PROPOSAL.pack(p.token_id, int(p.sampler), p.reasons) for p in items])


_FRAME = struct.Struct("<QqII")  # u64 step | i64 token_id | u32 decision | u32 sampler


def frame_bytes(
    session_id: str,
    step: int,
    token: int,
    decision: int,
    sampler: int,
    proposals: Iterable[ProposalLike],
    reasons: Iterable[ReasonLike],
) -> bytes:
    """ "fse.v1.frame" | str session_id | u64 step | i64 token_id | u32 decision | u32 sampler
    | proposals_bytes | SHA-256(reasons_bytes) (VERDICT.md)."""
    return frame_bytes_after(frame_prefix(session_id), step, token, decision, sampler, proposals, reasons)


def frame_prefix(session_id: str) -> bytes:
    """The head of every frame of a session (a session computes it once)."""
    return b"fse.v1.frame" + cb.string(session_id)


def frame_bytes_after(
    prefix: bytes,
    step: int,
    token: int,
    decision: int,
    sampler: int,
    proposals: Iterable[ProposalLike],
    reasons: Iterable[ReasonLike],
) -> bytes:
    """:func:`frame_bytes` after the session's :func:`frame_prefix`."""
    return b"".join([prefix, _FRAME.pack(step, token, decision, sampler), proposals_bytes(proposals), reasons_digest(reasons)])


def chain_next(prev: bytes, frame: bytes) -> bytes:
    if len(prev) != 32:
        raise ValueError(f"previous chain hash must be 32 bytes, got {len(prev)}")
    return hashlib.sha256(prev + frame).digest()


class Tally(Value):
    """The decisions of a session's steps, and the wall-clock span they took."""

    _fields = ("accepted", "healed", "aborted", "first_timestamp_ns", "last_timestamp_ns")
    __slots__ = _fields

    def __init__(
        self,
        accepted: int = 0,
        healed: int = 0,
        aborted: int = 0,
        first_timestamp_ns: int = 0,
        last_timestamp_ns: int = 0,
    ) -> None:
        self.accepted: Final = accepted
        self.healed: Final = healed
        self.aborted: Final = aborted
        self.first_timestamp_ns: Final = first_timestamp_ns
        self.last_timestamp_ns: Final = last_timestamp_ns

    @property
    def steps(self) -> int:
        return self.accepted + self.healed + self.aborted

    def add(self, decision: int, timestamp_ns: int) -> Tally:
        # fse.v1.Decision: 1 ACCEPT, 2 HEALED, 3 ABORT
        return Tally(
            self.accepted + (decision == 1),
            self.healed + (decision == 2),
            self.aborted + (decision == 3),
            self.first_timestamp_ns or timestamp_ns,
            timestamp_ns,
        )


def receipt_bytes(
    session_id: str, genesis_hash: bytes, chain_hash: bytes, tally: Tally, policy_digest: str, key_id: str
) -> bytes:
    """ "fse.v1.receipt" | str session_id | blob genesis_hash | blob chain_hash | u64 steps
    | u64 accepted | u64 healed | u64 aborted | u64 first_timestamp_ns
    | u64 last_timestamp_ns | str policy_digest | str key_id (VERDICT.md)."""
    return _prefix_statement(b"fse.v1.receipt", session_id, genesis_hash, chain_hash, tally, policy_digest, key_id)


def checkpoint_bytes(
    session_id: str, genesis_hash: bytes, chain_hash: bytes, tally: Tally, policy_digest: str, key_id: str
) -> bytes:
    """ "fse.v1.checkpoint" then the receipt's fields (VERDICT.md "Checkpoint"): what the
    sidecar signs of an open session's file every so many frames, so a file whose close
    record never came (a crash, a reaped session) is still signed up to its last
    checkpoint. Its own domain: a checkpoint can never pass for a receipt."""
    return _prefix_statement(b"fse.v1.checkpoint", session_id, genesis_hash, chain_hash, tally, policy_digest, key_id)


def _prefix_statement(
    domain: bytes, session_id: str, genesis_hash: bytes, chain_hash: bytes, tally: Tally, policy_digest: str, key_id: str
) -> bytes:
    t = tally
    return b"".join(
        [
            domain,
            cb.string(session_id),
            cb.blob(genesis_hash),
            cb.blob(chain_hash),
            *[cb.u64(n) for n in (t.steps, t.accepted, t.healed, t.aborted, t.first_timestamp_ns, t.last_timestamp_ns)],
            cb.string(policy_digest),
            cb.string(key_id),
        ]
    )
