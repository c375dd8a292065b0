"""Write proto/fse/v1/vectors.json: the conformance vectors of PROTOCOL.md, VERDICT.md and
RING.md (``python scripts/gen_vectors.py``; ``--check`` exits 1 when the file is stale).

Every value comes from the sidecar's own code run on fixed inputs: a fixed Ed25519 seed
and HMAC secret (test keys, published here on purpose), a fixed opening nonce, fixed
logits. ``tests/test_vectors.py`` holds the Python implementation to the file, and the
Node.js client (clients/node) checks its own implementation against it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar._pb.fse.v1 import guard_pb2 as pb  # noqa: E402
from sidecar.config import parse_config  # noqa: E402
from sidecar.core import canonical as cb  # noqa: E402
from sidecar.core import chain, ledger  # noqa: E402
from sidecar.core.compact import CompactRow, moments_and_top  # noqa: E402
from sidecar.core.sampling import SamplingParams  # noqa: E402
from sidecar.core.vocab import vocab_digest  # noqa: E402
from sidecar.generated import write_or_check  # noqa: E402
from sidecar.ring import HEADER_SIZE, RingReader, RingWriter  # noqa: E402
from sidecar.service import GuardService  # noqa: E402
from sidecar.signing import Ed25519Signer, HmacSigner, receipt_signed_bytes, seal_bytes, verdict_bytes  # noqa: E402
from sidecar.wire import params_to_pb  # noqa: E402

OUT = ROOT / "proto" / "fse" / "v1" / "vectors.json"
ED_SEED = bytes(range(1, 33))  # a published test key: never use it for anything else
HMAC_SECRET = bytes(range(101, 133))
NONCE = bytes.fromhex("00112233445566778899aabbccddeeff")
VOCAB = [b"<eos>", b" the", b" cat", b" sat", b" on", b" mat", b".", b" dog"]
# The informational header bytes a writer fills from its own process (RING.md): owner_pid
# and ring_id, zeroed here; a checker compares everything else.
MASK = [76, 96]


def _hex(b: bytes) -> str:
    return b.hex()


def primitives() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for v in (0, 1, 0xDEADBEEF):
        out.append({"type": "u32", "value": v, "hex": _hex(cb.u32(v))})
    for v in (0, 2**40 + 5):
        out.append({"type": "u64", "value": v, "hex": _hex(cb.u64(v))})
    for v in (-1, 42):
        out.append({"type": "i64", "value": v, "hex": _hex(cb.i64(v))})
    for v, text in ((1.5, "1.5"), (-0.0, "-0.0"), (float("nan"), "NaN"), (float("inf"), "Infinity")):
        out.append({"type": "f64", "value": text, "hex": _hex(cb.f64(v))})
    for s in ("", "fse", "é"):
        out.append({"type": "str", "value": s, "hex": _hex(cb.string(s))})
    out.append({"type": "blob", "value_hex": "00ff", "hex": _hex(cb.blob(b"\x00\xff"))})
    return out


def vocabularies() -> list[dict[str, Any]]:
    cases = [VOCAB, [b"a", b""], [bytes([0xFF, 0x00]), b"\xe2\x96\x81x"]]
    return [{"tokens_hex": [_hex(t) for t in toks], "digest": vocab_digest(toks)} for toks in cases]


def service(signer: Any) -> GuardService:
    config = parse_config(
        {
            "policies": {
                "default": {
                    # rank > 0 trips: a sampled token that is not the top choice heals to it
                    "guards": {"rank": {"enabled": True, "threshold": 0}},
                    "gate": {"enabled": False},
                    "loop_guard": {"enabled": False},
                    "drift": {"enabled": False},
                    "rules": [{"id": "no-dog", "kind": "literal", "patterns": [" dog"], "action": "block"}],
                }
            }
        }
    )
    return GuardService(config, signer, nonces=lambda: NONCE)


ROWS = [
    [0.0, 1.0, 6.0, 0.5, 0.2, 0.1, 0.3, 0.0],  # " cat": accepted
    [0.0, 0.2, 0.1, 2.0, 1.9, 1.8, 0.3, 1.95],  # temperature 1, seed 7: a heal
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 9.0],  # " dog" blocked, then the next best
    [float("nan")] * 8,  # non-finite: ABORT
]
SAMPLING = SamplingParams(temperature=1.0, seed=7)


def session_verdicts(signer: Any) -> tuple[pb.OpenSessionResponse, list[pb.Verdict], str]:
    svc = service(signer)
    digest = svc.register_vocabulary(VOCAB).digest
    s = svc.open_session(
        pb.OpenSessionRequest(session_id="vec-1", vocab_digest=digest, sampling=params_to_pb(SAMPLING), model_id="vectors")
    )
    opened = pb.OpenSessionResponse(
        session_id=s.session_id,
        opening_nonce=NONCE,
        policy_digest=s.policy.digest,
        genesis_hash=s.chain_hash,
        key_id=signer.key_id,
    )
    out = []
    for i, row in enumerate(ROWS):
        data = np.asarray(row, dtype="<f4").tobytes()
        req = pb.StepRequest(
            session_id=s.session_id, session_secret=s.secret, step=i, inline=pb.InlineLogits(data=data, dtype=pb.DTYPE_F32)
        )
        out.append(svc.step(req))
    return opened, out, digest


def genesis(opened: pb.OpenSessionResponse, digest: str) -> dict[str, Any]:
    o = chain.Opening("vec-1", NONCE, SAMPLING.canonical_bytes(), opened.policy_digest, digest, "vectors", opened.key_id)
    assert o.genesis() == opened.genesis_hash
    return {
        "session_id": o.session_id,
        "opening_nonce_hex": _hex(o.opening_nonce),
        "sampling": {
            "temperature": 1.0,
            "top_k": 0,
            "top_p": None,
            "min_p": 0.0,
            "repetition_penalty": None,
            "repetition_window": None,
            "seed": 7,
        },
        "sampling_bytes_hex": _hex(o.sampling),
        "policy_digest": o.policy_digest,
        "vocab_digest": o.vocab_digest,
        "model_id": o.model_id,
        "key_id": o.key_id,
        "genesis_hex": _hex(o.genesis()),
    }


def _reason(r: pb.Reason) -> dict[str, Any]:
    return {
        "code": r.code,
        "value": ledger._num(r.value),
        "threshold": ledger._num(r.threshold),
        "sampler": int(r.sampler),
        "detail": r.detail,
        "action": int(r.action),
        "token_id": r.token_id,
        "span_start": r.span_start,
        "span_end": r.span_end,
        "reason_bytes_hex": _hex(chain.reason_bytes(r)),
    }


def frames(verdicts: list[pb.Verdict]) -> list[dict[str, Any]]:
    out = []
    for v in verdicts:
        frame = chain.frame_bytes(v.session_id, v.step, v.token_id, v.decision, v.sampler, v.proposals, v.reasons)
        out.append(
            {
                "session_id": v.session_id,
                "step": v.step,
                "token_id": v.token_id,
                "decision": int(v.decision),
                "sampler": int(v.sampler),
                "proposals": [{"token_id": p.token_id, "sampler": int(p.sampler), "reasons": p.reasons} for p in v.proposals],
                "proposals_bytes_hex": _hex(chain.proposals_bytes(v.proposals)),
                "reasons": [_reason(r) for r in v.reasons],
                "reasons_bytes_hex": _hex(chain.reasons_bytes(v.reasons)),
                "reasons_digest_hex": _hex(chain.reasons_digest(v.reasons)),
                "frame_bytes_hex": _hex(frame),
                "prev_chain_hash_hex": _hex(v.prev_chain_hash),
                "chain_hash_hex": _hex(v.chain_hash),
            }
        )
        assert chain.chain_next(v.prev_chain_hash, frame) == v.chain_hash
    return out


def _resign(v: pb.Verdict, signer: Any) -> pb.Verdict:
    signer.sign(v)
    return v


def _rechain(v: pb.Verdict) -> None:
    frame = chain.frame_bytes(v.session_id, v.step, v.token_id, v.decision, v.sampler, v.proposals, v.reasons)
    v.chain_hash = chain.chain_next(v.prev_chain_hash, frame)


def verdict_cases(
    opened: pb.OpenSessionResponse, verdicts: list[pb.Verdict], signer: Any, other: Any, algorithm: str
) -> list[dict[str, Any]]:
    """Each verdict of the session as the adapter meets it, and tampered copies that must be refused."""
    cases: list[dict[str, Any]] = []

    def add(name: str, v: pb.Verdict, expect_from: pb.Verdict, outcome: str, check: str = "") -> None:
        cases.append(
            {
                "name": f"{algorithm}/{name}",
                "algorithm": algorithm,
                "step_response_hex": _hex(pb.StepResponse(verdict=v).SerializeToString(deterministic=True)),
                "signed_bytes_hex": _hex(verdict_bytes(v)),
                "expect": {
                    "session_id": expect_from.session_id,
                    "step": expect_from.step,
                    "prev_chain_hash_hex": _hex(expect_from.prev_chain_hash),
                    "policy_digest": opened.policy_digest,
                    "vocab_size": len(VOCAB),
                },
                "outcome": outcome,  # accept: force token_id; abort: stop, the verdict is genuine; reject: stop, it is not
                "check": check,  # the check of VERDICT.md "What an adapter checks" that refuses it
                "token_id": v.token_id if outcome == "accept" else None,
            }
        )

    for v in verdicts:
        add(
            f"step{v.step}-{pb.Decision.Name(v.decision).lower()}", v, v, "abort" if v.decision == pb.DECISION_ABORT else "accept"
        )
    base = verdicts[0]

    def copy() -> pb.Verdict:
        c = pb.Verdict()
        c.CopyFrom(base)
        return c

    t = copy()
    t.signature = bytes([t.signature[0] ^ 1]) + t.signature[1:]
    add("flipped-signature-bit", t, base, "reject", "signature")
    t = copy()
    t.token_id = 7
    _rechain(t)
    add("token-changed-after-signing", t, base, "reject", "signature")
    add("signed-by-an-untrusted-key", _resign(copy(), other), base, "reject", "key")
    t = copy()
    t.session_id = "vec-2"
    _rechain(t)
    add("another-session", _resign(t, signer), base, "reject", "session")
    add("replayed-at-the-next-step", verdicts[0], verdicts[1], "reject", "step")
    t = copy()
    t.policy_digest = "0" * 64
    add("another-policy", _resign(t, signer), base, "reject", "policy")
    t = pb.Verdict()
    t.CopyFrom(verdicts[1])
    t.prev_chain_hash = bytes(32)
    _rechain(t)
    add("does-not-link", _resign(t, signer), verdicts[1], "reject", "link")
    t = copy()
    t.chain_hash = bytes(32)
    add("chain-hash-not-of-its-frame", _resign(t, signer), base, "reject", "chain")
    t = copy()
    t.token_id = len(VOCAB)
    _rechain(t)
    add("token-outside-the-vocabulary", _resign(t, signer), base, "reject", "token")
    t = copy()
    t.decision = 7  # type: ignore[assignment]
    _rechain(t)
    add("undefined-decision", _resign(t, signer), base, "reject", "decision")
    return cases


def receipts(signer: Any, opened: pb.OpenSessionResponse, verdicts: list[pb.Verdict]) -> list[dict[str, Any]]:
    r = pb.Receipt(
        session_id="vec-1",
        genesis_hash=opened.genesis_hash,
        chain_hash=verdicts[-1].chain_hash,
        steps=4,
        accepted=2,
        healed=1,
        aborted=1,
        first_timestamp_ns=1_700_000_000_000_000_000,
        last_timestamp_ns=1_700_000_000_123_456_789,
        policy_digest=opened.policy_digest,
    )
    signer.sign_receipt(r)
    return [
        {
            "algorithm": signer.algorithm,
            "receipt_hex": _hex(r.SerializeToString(deterministic=True)),
            "receipt_bytes_hex": _hex(receipt_signed_bytes(r)),
            "signature_hex": _hex(r.signature),
        }
    ]


def seals(signer: Any, verdicts: list[pb.Verdict]) -> list[dict[str, Any]]:
    """A sealed batch of three rows (VERDICT.md "Batch seal"): two verdicts, unsigned, and
    between them a row answered with an error (its digest is 32 zero bytes)."""
    resp = pb.StepBatchResponse()
    for v in (verdicts[0], None, verdicts[1]):
        r = resp.responses.add()
        if v is None:
            r.error.session_id, r.error.step, r.error.code, r.error.message = "vec-2", 0, 5, "session 'vec-2' is not open"
        else:
            r.verdict.CopyFrom(v)
            r.verdict.ClearField("signature")
    rows = [r.verdict if r.HasField("verdict") else None for r in resp.responses]
    resp.seal.CopyFrom(signer.seal(rows))
    return [
        {
            "algorithm": signer.algorithm,
            "response_hex": _hex(resp.SerializeToString(deterministic=True)),
            "seal_bytes_hex": _hex(seal_bytes(resp.seal.key_id, len(rows), resp.seal.digests)),
            "signature_hex": _hex(resp.seal.signature),
        }
    ]


def ring_cases() -> dict[str, Any]:
    """A 2-slot FULL ring of 8 f32 logits: the bytes after one frame, and the frames a reader refuses."""
    row = np.asarray([0.5, -1.0, 2.25, 0.0, 3.5, -0.125, 1.0, 8.0], dtype=np.float32)
    name = f"fse-vectors-{os.getpid()}"
    with RingWriter.create(name, slots=2, rows=1, vocab_size=8, dtype="f32") as ring:
        with ring.frame(1) as f:
            f.write_row(5, 3, row)
        seq = f.seq
        shm = ring._shm
        assert shm is not None and shm.buf is not None
        buf = shm.buf

        def segment() -> str:
            b = bytearray(buf)
            b[MASK[0] : MASK[1]] = bytes(MASK[1] - MASK[0])
            return _hex(bytes(b))

        good = segment()
        reader = RingReader(name)
        assert np.array_equal(reader.row(1, 0, seq, 5, 3), row)
        lay = ring.layout
        slot = HEADER_SIZE + lay.slot_stride
        cases: list[dict[str, Any]] = [{"name": "good", "segment_hex": good, "outcome": "row", "row": row.tolist()}]
        # torn: the slot's seqlock odd (a writer mid-frame)
        buf[slot : slot + 8] = (seq + 1).to_bytes(8, "little")
        cases.append({"name": "torn", "segment_hex": segment(), "outcome": "refused", "error": "torn"})
        # stale: a newer frame replaced the one the request names
        buf[slot : slot + 8] = (seq + 2).to_bytes(8, "little")
        cases.append({"name": "stale", "segment_hex": segment(), "outcome": "refused", "error": "torn"})
        buf[slot : slot + 8] = seq.to_bytes(8, "little")
        desc = slot + 16
        buf[desc + 16 : desc + 20] = (2).to_bytes(4, "little")  # kind COMPACT in a ring with no COMPACT room
        cases.append({"name": "compact-in-a-full-ring", "segment_hex": segment(), "outcome": "refused", "error": "layout"})
        buf[desc + 16 : desc + 20] = (7).to_bytes(4, "little")  # an unknown kind
        cases.append({"name": "unknown-kind", "segment_hex": segment(), "outcome": "refused", "error": "kind"})
        buf[desc + 16 : desc + 20] = (1).to_bytes(4, "little")
        buf[desc : desc + 8] = (6).to_bytes(8, "little")  # another session's tag
        cases.append({"name": "other-session-tag", "segment_hex": segment(), "outcome": "refused", "error": "tag"})
        # the good segment, asked for with a seq no published frame can have (odd: a writer's
        # mid-frame value; zero: never published)
        for label, bad in (("odd-seq", seq + 1), ("zero-seq", 0)):
            cases.append({"name": label, "segment_hex": good, "request": {"seq": bad}, "outcome": "refused", "error": "seq"})
        reader.close()
    compact = compact_case(f"{name}-compact", row)
    with RingWriter.create(f"{name}-lane", slots=2, rows=1, vocab_size=8, dtype="f32", verdict_capacity=512) as lane:
        lane_header = bytearray(lane._shm.buf[:HEADER_SIZE])  # type: ignore[union-attr,index]
        lane_header[MASK[0] : MASK[1]] = bytes(MASK[1] - MASK[0])
        lane_layout = lane.layout
    return {
        "layout": {
            "slot_count": 2,
            "row_capacity": 1,
            "vocab_size": 8,
            "dtype": "f32",
            "topk_capacity": 0,
            "verdict_capacity": 0,
            "slot_stride": lay.slot_stride,
            "heap_offset": lay.heap_offset,
            "heap_size": lay.heap_size,
            "total_size": lay.total_size,
        },
        "masked_header_bytes": MASK,
        "frame": {"slot": 1, "row": 0, "seq": seq, "session_tag": 5, "step": 3, "logits": row.tolist()},
        "cases": cases,
        # What each case's "error" means: the status a step naming that row is refused with.
        "errors": {
            "torn": "ABORTED: the slot's seqlock is odd (a frame being written) or not the request's seq (replaced)",
            "layout": "INVALID_ARGUMENT: the row's descriptor breaks the layout (a kind the ring has no room for, "
            "an offset or size outside the slot)",
            "kind": "INVALID_ARGUMENT: a row kind this reader does not implement",
            "tag": "INVALID_ARGUMENT: the row is tagged for another session (or step)",
            "seq": "INVALID_ARGUMENT: the request's seq is odd or zero: no published frame has it",
        },
        "compact": compact,
        "lane_layout": {
            "verdict_capacity": 512,
            "slot_stride": lane_layout.slot_stride,
            "lane_offset": lane_layout.lane_offset,
            "total_size": lane_layout.total_size,
            "header_hex": _hex(bytes(lane_header)),
        },
    }


def compact_case(name: str, row: np.ndarray) -> dict[str, Any]:
    """The same 8 logits as a COMPACT row of k = 3 (slot 0, row 0, tag 5, step 3) in a ring
    with topk_capacity 4: the segment's bytes and what a reader must make of them."""
    moments, vals, ids = moments_and_top(row, 3)
    with RingWriter.create(name, slots=1, rows=1, vocab_size=8, dtype="f32", topk=4) as ring:
        with ring.frame(0) as f:
            f.write_compact(5, 3, moments, vals, ids)
        shm = ring._shm
        assert shm is not None and shm.buf is not None
        b = bytearray(shm.buf)
        b[MASK[0] : MASK[1]] = bytes(MASK[1] - MASK[0])
        reader = RingReader(name)
        got = reader.row(0, 0, f.seq, 5, 3)
        reader.close()
    assert isinstance(got, CompactRow)
    return {
        "topk_capacity": 4,
        "frame": {"slot": 0, "row": 0, "seq": f.seq, "session_tag": 5, "step": 3},
        "segment_hex": _hex(bytes(b)),
        "moments": moments.tolist(),
        "top_logits": vals.tolist(),
        "top_ids": ids.tolist(),
    }


def build() -> dict[str, Any]:
    ed = Ed25519Signer(Ed25519PrivateKey.from_private_bytes(ED_SEED))
    hm = HmacSigner(HMAC_SECRET)
    other = Ed25519Signer(Ed25519PrivateKey.from_private_bytes(bytes(32)))
    public = ed._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    opened, verdicts, digest = session_verdicts(ed)
    hm_opened, hm_verdicts, _ = session_verdicts(hm)
    return {
        "format": "fse.v1.vectors/1",
        "about": "Conformance vectors for proto/fse/v1 (PROTOCOL.md, VERDICT.md, RING.md). Test keys only.",
        "keys": {
            "ed25519": {"private_seed_hex": _hex(ED_SEED), "public_hex": _hex(public), "key_id": ed.key_id},
            "ed25519_untrusted": {"key_id": other.key_id},
            "hmac_sha256": {"secret_hex": _hex(HMAC_SECRET), "key_id": hm.key_id},
        },
        "primitives": primitives(),
        "vocabulary_digests": vocabularies(),
        "vocabulary": [_hex(t) for t in VOCAB],
        "genesis": [genesis(opened, digest), genesis(hm_opened, digest)],
        "frames": frames(verdicts),
        "verdicts": verdict_cases(opened, verdicts, ed, other, "ed25519")
        + verdict_cases(hm_opened, hm_verdicts, hm, other, "hmac-sha256"),
        "receipts": receipts(ed, opened, verdicts) + receipts(hm, hm_opened, hm_verdicts),
        "seals": seals(ed, verdicts) + seals(hm, hm_verdicts),
        "ring": ring_cases(),
    }


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=False) + "\n"


def main() -> int:
    return write_or_check(OUT, render(), "python scripts/gen_vectors.py")


if __name__ == "__main__":
    raise SystemExit(main())
