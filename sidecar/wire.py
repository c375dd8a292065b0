"""Conversions between fse.v1 messages and the pure core's types (both sides use them)."""

from __future__ import annotations

from typing import cast

from ._pb.fse.v1 import guard_pb2 as pb
from .core.chain import ReasonLike, Tally
from .core.ledger import receipt_record
from .core.sampling import SamplingParams


def params_from_pb(p: pb.SamplingParams) -> SamplingParams:
    """The effective sampling parameters of a request (unset fields take their defaults)."""
    return SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        repetition_window=p.repetition_window if p.HasField("repetition_window") else 64,
        seed=p.seed,
    )


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        repetition_window=p.repetition_window,
        seed=p.seed,
    )


def reason(t: ReasonLike) -> pb.Reason:
    return pb.Reason(
        code=t.code,
        value=t.value,
        threshold=t.threshold,
        sampler=cast(pb.Sampler, int(t.sampler)),
        detail=t.detail,
        action=cast(pb.Action, int(t.action)),
        token_id=t.token_id,
        span_start=t.span_start,
        span_end=t.span_end,
    )


def receipt_json(r: pb.Receipt) -> dict[str, object]:
    """A receipt as ``fse-sidecar audit verify --receipt`` reads it (and as the audit
    file's close record holds it): bytes in hex."""
    tally = Tally(r.accepted, r.healed, r.aborted, r.first_timestamp_ns, r.last_timestamp_ns)
    return receipt_record(r.session_id, r.genesis_hash, r.chain_hash, tally, r.policy_digest, r.key_id, r.signature)
