from __future__ import annotations

import stat

import pytest

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core import chain
from sidecar.core.sampling import SamplingParams
from sidecar.errors import SigningKeyError
from sidecar.signing import HmacSigner, Signer, Verifier, generate_hmac_key, generate_keypair, verdict_bytes


def verdict() -> pb.Verdict:
    return pb.Verdict(
        session_id="s",
        step=4,
        decision=pb.DECISION_HEALED,
        token_id=17,
        sampler=pb.SAMPLER_STRICT,
        reasons=[
            pb.Reason(
                code="rank",
                value=120,
                threshold=100,
                sampler=pb.SAMPLER_NORMAL,
                detail="rank 120 > 100",
                action=pb.ACTION_REDO,
                token_id=33,
            ),
            pb.Reason(
                code="no-foo",
                value=1,
                sampler=pb.SAMPLER_NORMAL,
                detail="rule no-foo (block)",
                action=pb.ACTION_BLOCK,
                token_id=34,
                span_start=7,
                span_end=10,
            ),
        ],
        metrics=pb.TokenMetrics(entropy_nats=1.5, neg_logprob_nats=0.2, rank=0, running_ppl=3.0),
        band=pb.HEALTH_BAND_HEALTHY,
        prev_chain_hash=b"\x01" * 32,
        chain_hash=b"\x02" * 32,
        policy_digest="ab" * 32,
        stream=pb.StreamState(
            band=pb.GATE_BAND_STRICT,
            pending=pb.GATE_BAND_DRIFTING,
            risk=0.625,
            window_neg_logprob_nats=4.5,
            window_entropy_nats=3.25,
            window_ppl=90.0,
            e_value=7.5,
        ),
    )


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path) -> None:
    priv, pub = generate_keypair(tmp_path)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert Signer.from_file(priv).key_id == Verifier.from_file(pub).key_id
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(tmp_path)


def test_signed_verdict_verifies_and_any_change_breaks_it(keys) -> None:
    signer, verifier = Signer.from_file(keys.private), Verifier.from_file(keys.public)
    v = verdict()
    signer.sign(v)
    assert verifier.verify(v)
    for mutate in (
        lambda x: setattr(x, "token_id", 18),
        lambda x: setattr(x, "step", 5),
        lambda x: setattr(x, "session_id", "t"),
        lambda x: setattr(x, "decision", pb.DECISION_ACCEPT),
        lambda x: setattr(x.metrics, "entropy_nats", 1.5000001),
        lambda x: setattr(x.reasons[0], "value", 99),
        lambda x: x.reasons.add(code="extra"),
        lambda x: setattr(x, "chain_hash", b"\x03" * 32),
    ):
        t = pb.Verdict()
        t.CopyFrom(v)
        mutate(t)
        assert not verifier.verify(t)


def test_another_keys_signature_does_not_verify(keys, other_keys) -> None:
    v = verdict()
    Signer.from_file(other_keys.private).sign(v)
    assert not Verifier.from_file(keys.public).verify(v)


def test_canonical_bytes_ignore_protobuf_encoding_details() -> None:
    a = verdict()
    b = pb.Verdict()
    b.ParseFromString(a.SerializeToString())
    assert verdict_bytes(a) == verdict_bytes(b)
    assert verdict_bytes(a) != verdict_bytes(verdict().__class__())


def test_missing_or_wrong_key_files_say_how_to_make_one(tmp_path) -> None:
    with pytest.raises(SigningKeyError, match="fse-sidecar keygen"):
        Signer.from_file(None)
    with pytest.raises(SigningKeyError, match="cannot read signing key"):
        Signer.from_file(tmp_path / "nope.key")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(SigningKeyError, match="neither an unencrypted PEM private key nor an fse HMAC key"):
        Signer.from_file(tmp_path / "junk.key")


def test_genesis_follows_the_documented_bytes_and_binds_every_field_of_the_opening() -> None:
    import dataclasses
    import hashlib
    import struct

    def s(v: bytes) -> bytes:
        return struct.pack("<I", len(v)) + v

    nonce = bytes(range(16))
    sampling = SamplingParams(temperature=0.7, top_k=40, seed=3).canonical_bytes()
    assert sampling == struct.pack("<dIdddIQ", 0.7, 40, 1.0, 0.0, 1.0, 64, 3)
    o = chain.Opening("s", nonce, sampling, "p" * 64, "v" * 64, "llama.cpp:m.gguf", "k1")
    expected = hashlib.sha256(
        b"fse.v1.genesis" + s(b"s") + s(nonce) + s(sampling) + s(b"p" * 64) + s(b"v" * 64) + s(b"llama.cpp:m.gguf") + s(b"k1")
    ).digest()
    assert o.genesis() == expected
    other_sampling = SamplingParams(temperature=0.7, top_k=41, seed=3).canonical_bytes()
    for change in ({"opening_nonce": bytes(16)}, {"sampling": other_sampling}, {"policy_digest": "q"}, {"vocab_digest": "w"},
                   {"model_id": "other"}, {"key_id": "k2"}):  # fmt: skip
        assert dataclasses.replace(o, **change).genesis() != expected, change


def test_chain_links_each_frame_to_the_previous_hash_and_binds_the_proposals() -> None:
    from sidecar.core.guards import Sampler
    from sidecar.core.redo import ProposalRecord

    g = chain.Opening("s", bytes(16), b"", "", "", "", "").genesis()
    normal = [ProposalRecord(5, Sampler.NORMAL, 0)]
    f1 = chain.frame_bytes("s", 0, 5, 1, 1, normal, [])
    h1 = chain.chain_next(g, f1)
    h2 = chain.chain_next(h1, chain.frame_bytes("s", 1, 6, 1, 1, [ProposalRecord(6, Sampler.NORMAL, 0)], []))
    assert len({g, h1, h2}) == 3
    assert chain.chain_next(g, chain.frame_bytes("s", 0, 6, 1, 1, normal, [])) != h1
    redo = [ProposalRecord(9, Sampler.NORMAL, 0), ProposalRecord(5, Sampler.STRICT, 0)]
    assert chain.chain_next(g, chain.frame_bytes("s", 0, 5, 1, 1, redo, [])) != h1  # the same token after another proposal
    with pytest.raises(ValueError, match="32 bytes"):
        chain.chain_next(b"short", f1)


def test_hmac_key_signs_and_verifies_and_detects_changes(tmp_path) -> None:
    path = generate_hmac_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    signer, verifier = Signer.from_file(path), Verifier.from_file(path)
    assert isinstance(signer, HmacSigner) and signer.algorithm == "hmac-sha256"
    v = verdict()
    signer.sign(v)
    assert verifier.verify(v) and len(v.signature) == 32 and v.key_id == verifier.key_id
    v.token_id += 1
    assert not verifier.verify(v)


def test_hmac_with_another_secret_or_an_ed25519_key_does_not_verify(tmp_path, keys) -> None:
    a, b = generate_hmac_key(tmp_path / "a"), generate_hmac_key(tmp_path / "b")
    v = verdict()
    Signer.from_file(a).sign(v)
    assert not Verifier.from_file(b).verify(v)
    assert Verifier.from_file(a).key_id != Verifier.from_file(b).key_id
    assert not Verifier.from_file(keys.public).verify(v)  # an HMAC tag is no Ed25519 signature


def test_malformed_hmac_keys_are_refused(tmp_path) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"FSE-HMAC-SHA256 not-hex\n")
    with pytest.raises(SigningKeyError, match="<hex secret>"):
        Signer.from_file(p)
    p.write_bytes(b"FSE-HMAC-SHA256 " + b"ab" * 8 + b"\n")
    with pytest.raises(SigningKeyError, match="at least 32 bytes"):
        Verifier.from_file(p)


def test_verdict_bytes_follow_the_documented_layout() -> None:
    """Rebuilt field by field from proto/fse/v1/VERDICT.md, independently of the encoder."""
    import struct

    v = verdict()
    v.key_id = "00112233aabbccdd"
    v.metrics.margin = float("-nan")  # any NaN is written as the one canonical NaN
    le = lambda fmt, *a: struct.pack("<" + fmt, *a)  # noqa: E731
    s = lambda t: le("I", len(t.encode())) + t.encode()  # noqa: E731
    m = v.metrics
    expected = (
        b"fse.v1.verdict"
        + s("s")
        + le("QIqII", 4, pb.DECISION_HEALED, 17, pb.SAMPLER_STRICT, 2)
        + s("rank")
        + le("ddI", 120.0, 100.0, pb.SAMPLER_NORMAL)
        + s("rank 120 > 100")
        + le("IqQQ", pb.ACTION_REDO, 33, 0, 0)
        + s("no-foo")
        + le("ddI", 1.0, 0.0, pb.SAMPLER_NORMAL)
        + s("rule no-foo (block)")
        + le("IqQQ", pb.ACTION_BLOCK, 34, 7, 10)
        + le("dd", m.entropy_nats, m.neg_logprob_nats)
        + le("Q", 0)
        + bytes.fromhex("000000000000f87f")
        + le("dddddd", 0.0, 0.0, 0.0, 0.0, 0.0, 3.0)
        + le("I", pb.HEALTH_BAND_HEALTHY)
        + le("I", 32)
        + b"\x01" * 32
        + le("I", 32)
        + b"\x02" * 32
        + s("00112233aabbccdd")
        + s("ab" * 32)
        + le("II", pb.GATE_BAND_STRICT, pb.GATE_BAND_DRIFTING)
        + le("ddddd", 0.625, 4.5, 3.25, 90.0, 7.5)
        + le("I", 2)  # proposals: token, sampler, how many of the reasons it tripped
        + le("qII", 33, pb.SAMPLER_NORMAL, 1)
        + le("qII", 34, pb.SAMPLER_NORMAL, 1)
    )
    v.proposals.add(token_id=33, sampler=pb.SAMPLER_NORMAL, reasons=1)
    v.proposals.add(token_id=34, sampler=pb.SAMPLER_NORMAL, reasons=1)
    assert verdict_bytes(v) == expected
