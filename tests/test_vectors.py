"""The Python implementation against the conformance vectors (proto/fse/v1/vectors.json).

Where a test can restate the documented construction in a few lines (the primitives,
the vocabulary digest) it does so independently of the implementation; the rest holds
the implementation to the bytes the file freezes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine_adapters.client import Expected, check_verdict
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core import canonical as cb
from sidecar.core import chain
from sidecar.core.compact import CompactRow
from sidecar.core.sampling import SamplingParams
from sidecar.core.vocab import vocab_digest
from sidecar.errors import GuardAbort, RowError, TornFrameError, VerdictRejected
from sidecar.ring import RingReader, RingWriter
from sidecar.signing import Ed25519Verifier, HmacVerifier, TrustedKeys, receipt_signed_bytes, verdict_bytes

ROOT = Path(__file__).resolve().parents[1]
VECTORS: dict[str, Any] = json.loads((ROOT / "proto" / "fse" / "v1" / "vectors.json").read_text())


def test_the_vectors_file_is_what_the_generator_writes() -> None:
    r = subprocess.run([sys.executable, "scripts/gen_vectors.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", VECTORS["primitives"], ids=lambda c: f"{c['type']}:{c.get('value', c.get('value_hex'))}")
def test_primitive_encodings_match_the_documented_layout(case: dict[str, Any]) -> None:
    t, want = case["type"], bytes.fromhex(case["hex"])
    if t in ("u32", "u64", "i64"):
        fmt = {"u32": "<I", "u64": "<Q", "i64": "<q"}[t]
        assert struct.pack(fmt, case["value"]) == want == getattr(cb, t)(case["value"])
    elif t == "f64":
        v = {"NaN": math.nan, "Infinity": math.inf}.get(case["value"], None)
        v = float(case["value"]) if v is None else v
        independent = bytes.fromhex("000000000000f87f") if v != v else struct.pack("<d", v)
        assert independent == want == cb.f64(v)
    elif t == "str":
        raw = case["value"].encode()
        assert struct.pack("<I", len(raw)) + raw == want == cb.string(case["value"])
    else:
        raw = bytes.fromhex(case["value_hex"])
        assert struct.pack("<I", len(raw)) + raw == want == cb.blob(raw)


@pytest.mark.parametrize("case", VECTORS["vocabulary_digests"], ids=lambda c: c["digest"][:12])
def test_vocabulary_digest_is_sha256_of_the_count_then_each_length_prefixed_token(case: dict[str, Any]) -> None:
    tokens = [bytes.fromhex(t) for t in case["tokens_hex"]]
    body = struct.pack("<I", len(tokens)) + b"".join(struct.pack("<I", len(t)) + t for t in tokens)
    assert hashlib.sha256(body).hexdigest() == case["digest"] == vocab_digest(tokens)


@pytest.mark.parametrize("case", VECTORS["genesis"], ids=lambda c: c["key_id"])
def test_genesis_binds_the_opening(case: dict[str, Any]) -> None:
    s = case["sampling"]
    params = SamplingParams(
        temperature=s["temperature"], top_k=s["top_k"], min_p=s["min_p"], seed=s["seed"]
    )  # top_p, repetition_penalty, repetition_window unset: their effective defaults
    assert params.canonical_bytes().hex() == case["sampling_bytes_hex"]
    o = chain.Opening(
        case["session_id"],
        bytes.fromhex(case["opening_nonce_hex"]),
        bytes.fromhex(case["sampling_bytes_hex"]),
        case["policy_digest"],
        case["vocab_digest"],
        case["model_id"],
        case["key_id"],
    )
    assert o.genesis().hex() == case["genesis_hex"]


def _reason(r: dict[str, Any]) -> pb.Reason:
    num = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    return pb.Reason(
        code=r["code"],
        value=num.get(r["value"], r["value"]),
        threshold=num.get(r["threshold"], r["threshold"]),
        sampler=r["sampler"],
        detail=r["detail"],
        action=r["action"],
        token_id=r["token_id"],
        span_start=r["span_start"],
        span_end=r["span_end"],
    )


@pytest.mark.parametrize("case", VECTORS["frames"], ids=lambda c: f"step{c['step']}")
def test_frame_bytes_and_chain_hash(case: dict[str, Any]) -> None:
    reasons = [_reason(r) for r in case["reasons"]]
    for r, want in zip(reasons, case["reasons"], strict=True):
        assert chain.reason_bytes(r).hex() == want["reason_bytes_hex"]
    proposals = [pb.Proposal(**p) for p in case["proposals"]]
    assert chain.proposals_bytes(proposals).hex() == case["proposals_bytes_hex"]
    assert chain.reasons_bytes(reasons).hex() == case["reasons_bytes_hex"]
    assert hashlib.sha256(bytes.fromhex(case["reasons_bytes_hex"])).hexdigest() == case["reasons_digest_hex"]
    frame = chain.frame_bytes(
        case["session_id"], case["step"], case["token_id"], case["decision"], case["sampler"], proposals, reasons
    )
    assert frame.hex() == case["frame_bytes_hex"]
    prev = bytes.fromhex(case["prev_chain_hash_hex"])
    assert hashlib.sha256(prev + frame).hexdigest() == case["chain_hash_hex"] == chain.chain_next(prev, frame).hex()


def _trusted() -> TrustedKeys:
    keys = VECTORS["keys"]
    ed = Ed25519Verifier(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(keys["ed25519"]["private_seed_hex"])).public_key())
    hm = HmacVerifier(bytes.fromhex(keys["hmac_sha256"]["secret_hex"]))
    assert (ed.key_id, hm.key_id) == (keys["ed25519"]["key_id"], keys["hmac_sha256"]["key_id"])
    return TrustedKeys([ed, hm])


@pytest.mark.parametrize("case", VECTORS["verdicts"], ids=lambda c: c["name"])
def test_verdicts_are_accepted_stopped_or_rejected_by_the_named_check(case: dict[str, Any]) -> None:
    resp = pb.StepResponse.FromString(bytes.fromhex(case["step_response_hex"]))
    assert verdict_bytes(resp.verdict).hex() == case["signed_bytes_hex"]
    e = case["expect"]
    expect = Expected(e["session_id"], e["step"], bytes.fromhex(e["prev_chain_hash_hex"]), e["policy_digest"], e["vocab_size"])
    if case["outcome"] == "accept":
        assert check_verdict(resp, expect, _trusted()).token_id == case["token_id"]
    elif case["outcome"] == "abort":
        with pytest.raises(GuardAbort):
            check_verdict(resp, expect, _trusted())
    else:
        with pytest.raises(VerdictRejected) as err:
            check_verdict(resp, expect, _trusted())
        assert err.value.check == case["check"]


@pytest.mark.parametrize("case", VECTORS["receipts"], ids=lambda c: c["algorithm"])
def test_receipts_sign_their_canonical_bytes(case: dict[str, Any]) -> None:
    r = pb.Receipt.FromString(bytes.fromhex(case["receipt_hex"]))
    assert receipt_signed_bytes(r).hex() == case["receipt_bytes_hex"] and r.signature.hex() == case["signature_hex"]
    trusted = _trusted()
    assert trusted.verify_receipt(r)
    r.steps += 1
    r.accepted += 1
    assert not trusted.verify_receipt(r)  # any field changed after signing


@pytest.mark.parametrize("case", VECTORS["seals"], ids=lambda c: c["algorithm"])
def test_a_batch_seal_signs_each_rows_verdict_digest(case: dict[str, Any]) -> None:
    resp = pb.StepBatchResponse.FromString(bytes.fromhex(case["response_hex"]))
    seal, rows = resp.seal, len(resp.responses)
    # Restated from VERDICT.md: SHA-256 of each verdict's signed bytes, zeros for an error row.
    digests = b"".join(
        hashlib.sha256(verdict_bytes(r.verdict)).digest() if r.HasField("verdict") else bytes(32) for r in resp.responses
    )
    assert seal.digests == digests and all(not r.verdict.signature for r in resp.responses)
    signed = b"fse.v1.seal" + cb.string(seal.key_id) + cb.u32(rows) + cb.blob(digests)
    assert signed.hex() == case["seal_bytes_hex"] and seal.signature.hex() == case["signature_hex"]
    trusted = _trusted()
    assert trusted.verify_seal(seal, rows)
    assert not trusted.verify_seal(seal, rows - 1)  # the row count is bound
    forged = pb.BatchSeal()
    forged.CopyFrom(seal)
    forged.digests = digests[32:64] + digests[:32] + digests[64:]  # rows moved
    assert not trusted.verify_seal(forged, rows)


RING = VECTORS["ring"]
MASK = slice(*RING["masked_header_bytes"])


def _masked(b: bytes) -> bytes:
    out = bytearray(b)
    out[MASK] = bytes(MASK.stop - MASK.start)
    return bytes(out)


def test_the_ring_writer_produces_the_vector_segment() -> None:
    lay, fr = RING["layout"], RING["frame"]
    with RingWriter.create(slots=lay["slot_count"], rows=lay["row_capacity"], vocab_size=lay["vocab_size"], dtype="f32") as w:
        assert (w.layout.slot_stride, w.layout.heap_offset, w.layout.total_size) == (
            lay["slot_stride"],
            lay["heap_offset"],
            lay["total_size"],
        )
        with w.frame(fr["slot"]) as f:
            f.write_row(fr["session_tag"], fr["step"], np.asarray(fr["logits"], dtype=np.float32))
        assert f.seq == fr["seq"]
        assert w._shm is not None and w._shm.buf is not None
        assert _masked(bytes(w._shm.buf)).hex() == RING["cases"][0]["segment_hex"]
    ll = RING["lane_layout"]
    with RingWriter.create(slots=2, rows=1, vocab_size=8, dtype="f32", verdict_capacity=ll["verdict_capacity"]) as w:
        assert (w.layout.slot_stride, w.layout.lane_offset, w.layout.total_size) == (
            ll["slot_stride"],
            ll["lane_offset"],
            ll["total_size"],
        )
        assert w._shm is not None and w._shm.buf is not None
        assert _masked(bytes(w._shm.buf[:256])).hex() == ll["header_hex"]


@pytest.mark.parametrize("case", RING["cases"], ids=lambda c: c["name"])
def test_the_ring_reader_reads_or_refuses_each_vector_frame(case: dict[str, Any]) -> None:
    fr = RING["frame"]
    name = f"fse-vec-{os.getpid()}-{case['name']}"
    data = bytes.fromhex(case["segment_hex"])
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.write(fd, data)
        reader = RingReader(name)
        try:
            req = {**fr, **case.get("request", {})}  # the frame's request, unless the case asks otherwise
            ask = (req["slot"], req["row"], req["seq"], req["session_tag"], req["step"])
            if case["outcome"] == "row":
                assert reader.row(*ask).tolist() == case["row"]
            else:
                expected = TornFrameError if case["error"] == "torn" else RowError
                with pytest.raises(expected) as err:
                    reader.row(*ask)
                words = {"torn": "torn", "kind": "not implemented", "tag": "tagged", "layout": "breaks the layout"}
                words["seq"] = "must be even and non-zero"
                assert words[case["error"]] in str(err.value)
                assert err.value.grpc_code == RING["errors"][case["error"]].split(":")[0]
        finally:
            reader.close()
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm/{name}")


def test_the_ring_reader_reads_the_vector_compact_row() -> None:
    c = RING["compact"]
    fr = c["frame"]
    name = f"fse-vec-{os.getpid()}-compact"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.write(fd, bytes.fromhex(c["segment_hex"]))
        reader = RingReader(name)
        try:
            got = reader.row(fr["slot"], fr["row"], fr["seq"], fr["session_tag"], fr["step"])
        finally:
            reader.close()
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm/{name}")
    assert isinstance(got, CompactRow)
    order = np.argsort(c["top_ids"])
    assert got.ids.tolist() == np.asarray(c["top_ids"])[order].tolist()  # held in id order
    assert got.logits.tolist() == np.asarray(c["top_logits"], dtype=np.float32)[order].tolist()
    assert list(got.moments) == c["moments"][:7]
    assert RING["frame"]["logits"][got.stats().top1] == max(RING["frame"]["logits"])
