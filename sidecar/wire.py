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


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        b = raw[pos]  # IndexError past the end: truncated
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def count_field_upto(raw: bytes, field: int, limit: int) -> int:
    """How many times ``field`` occurs at the top level of the encoded message ``raw``,
    counting no further than ``limit + 1``: what a repeated field's length will be, known
    before the message is parsed. A walk of the wire format in Python, so a thread running
    it hands the GIL back every switch interval (a protobuf parse holds it for the whole
    message); it stops at the first malformed byte and returns what it counted, leaving
    the refusal of the malformed message to the parser."""
    count = pos = 0
    n = len(raw)
    try:
        while pos < n and count <= limit:
            key, pos = _varint(raw, pos)
            wire = key & 7
            if wire == 0:
                _, pos = _varint(raw, pos)
            elif wire == 1:
                pos += 8
            elif wire == 2:
                size, pos = _varint(raw, pos)
                pos += size
            elif wire == 5:
                pos += 4
            else:
                break
            if key >> 3 == field:
                count += 1
    except (IndexError, ValueError):
        pass
    return count
