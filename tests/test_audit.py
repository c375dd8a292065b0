"""The certified invoice (issue 9): audit files written by a real sidecar for a guarded
generation of the real model, checked by ``fse-sidecar audit verify``; tampering of every
kind caught at the right frame; a crash, a full disk and a key rotation."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from engine_adapters.client import GuardClient
from engine_adapters.llama_cpp import GuardedLlama
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.cli import main
from sidecar.core import ledger
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort, GuardUnavailable, VerdictRejected
from sidecar.launch import LocalSidecar
from sidecar.signing import TrustedKeys, generate_keypair
from sidecar.wire import receipt_json

from .conftest import CHAT

V = 1000
VOCAB = [f"t{i}".encode() for i in range(V)]
HOT = SamplingParams(temperature=1.3, top_k=60, seed=4, repetition_penalty=1.0)
# rank > 2 trips and heals to the strict sampler: frames with two proposals
HEALING = {"default": {"guards": {"rank": {"enabled": True, "threshold": 2}}, "drift": {"enabled": False}}}


def peaked(top: int) -> np.ndarray:
    x = np.random.default_rng(top).standard_normal(V).astype(np.float32)
    x[top] = 12.0
    return x


@pytest.fixture(scope="module")
def real_audit(llama, tmp_path_factory, keys):
    """One guarded generation of the real model, audited: (file, receipt file, keys)."""
    from sidecar.launch import start_local_sidecar

    tmp = tmp_path_factory.mktemp("audit")
    # checkpoints by count only, past this generation's length: the frames' line numbers are fixed
    audit = {"dir": str(tmp / "audit"), "checkpoint_every_frames": 1000, "checkpoint_interval_ms": 600_000}
    sc = start_local_sidecar(tmp, {"policies": HEALING, "audit": audit}, (keys.private, keys.public))
    sc.wait_started()
    try:
        client = GuardClient(sc.target, keys.public)
        client.wait_ready()
        with GuardedLlama(llama, client) as g:
            llama.reset()
            done = g.complete(CHAT.format("Write a short poem about the sea."), max_tokens=24, sampling=HOT)
        client.close()
    finally:
        sc.stop()
    assert done.error is None and done.receipt is not None
    assert any(t.verdict.decision == pb.DECISION_HEALED for t in done.tokens)  # redo frames are in the file
    (audit_file,) = (tmp / "audit").glob("*.audit")
    receipt = tmp / "receipt.json"
    receipt.write_text(json.dumps(receipt_json(done.receipt)))
    return audit_file, receipt, done


def _verify(path: Path, *extra: str, capsys) -> tuple[int, str]:
    rc = main(["audit", "verify", str(path), *extra])
    return rc, capsys.readouterr().out


@pytest.mark.slow  # the real model writes the file
def test_a_real_audit_file_verifies_with_its_receipt_and_key(real_audit, keys, capsys) -> None:
    path, receipt, done = real_audit
    rc, out = _verify(path, "--receipt", str(receipt), "--public-key", str(keys.public), capsys=capsys)
    assert rc == 0, out
    n = len(done.tokens)
    assert f"VERIFIED: session {done.receipt.session_id}, {n} frames" in out and "closed (receipt)" in out
    lines = path.read_bytes().splitlines()
    genesis, frames, close = json.loads(lines[0]), [json.loads(x) for x in lines[1:-1]], json.loads(lines[-1])
    assert genesis["kind"] == "genesis" and genesis["model_id"].startswith("llama.cpp:") and genesis["key_id"]
    assert genesis["sampling"]["temperature"] == 1.3 and genesis["vocab_digest"] and genesis["policy_digest"]
    assert [f["step"] for f in frames] == list(range(n))
    assert [f["token_id"] for f in frames] == done.token_ids
    assert [f["chain_hash"] for f in frames] == [t.verdict.chain_hash.hex() for t in done.tokens]
    healed = [f for f in frames if f["decision"] == "healed"]
    assert healed and all(len(f["proposals"]) == 2 and f["proposals"][1]["sampler"] == "strict" for f in healed)
    assert all(f["proposals"][0]["trips"] and not f["proposals"][1]["trips"] for f in healed)  # tripped, then passed
    assert any(t["code"] == "rank" for f in healed for t in f["proposals"][0]["trips"])
    assert close["kind"] == "close" and close["receipt"]["chain_hash"] == done.receipt.chain_hash.hex()
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def _edit_token(lines: list[bytes], i: int) -> list[bytes]:
    rec = json.loads(lines[i])
    rec["token_id"] += 1
    return [*lines[:i], ledger.encode(rec), *lines[i + 1 :]]


def _edit_trip(lines: list[bytes], i: int) -> list[bytes]:
    rec = json.loads(lines[i])
    rec["proposals"][0]["trips"][0]["value"] = 0.5  # the reason, not the chain fields
    return [*lines[:i], ledger.encode(rec), *lines[i + 1 :]]


@pytest.mark.slow  # the real model writes the file
@pytest.mark.parametrize(
    ("kind", "line", "message"),
    [
        ("modified", 6, "chain hash does not match the frame's contents"),
        ("reason edited", None, "its reasons do not match its reasons digest"),
        ("deleted", 6, "frame 5 where frame 4 should be"),
        ("inserted", 6, "frame 3 where frame 4 should be"),
        ("reordered", 6, "frame 5 where frame 4 should be"),
        ("close edited", -1, "receipt says steps"),
    ],
)
def test_every_kind_of_tampering_is_caught_at_the_right_frame(real_audit, tmp_path, capsys, kind, line, message) -> None:
    path, _, _ = real_audit
    lines = path.read_bytes().splitlines(keepends=True)
    if kind == "modified":
        bad = _edit_token(lines, 5)
    elif kind == "reason edited":
        i = next(n for n, x in enumerate(lines) if b'"decision":"healed"' in x)
        bad, line = _edit_trip(lines, i), i + 1
    elif kind == "deleted":
        bad = lines[:5] + lines[6:]
    elif kind == "inserted":
        bad = lines[:5] + [lines[4]] + lines[5:]
    elif kind == "reordered":
        bad = lines[:5] + [lines[6], lines[5]] + lines[7:]
    else:
        rec = json.loads(lines[-1])
        rec["receipt"]["steps"] -= 1
        bad = [*lines[:-1], ledger.encode(rec)]
        line = len(lines)
    f = tmp_path / "bad.audit"
    f.write_bytes(b"".join(bad))
    rc, out = _verify(f, capsys=capsys)
    assert rc == 1, out
    assert f"BROKEN at line {line}:" in out and message in out, out


@pytest.mark.slow  # the real model writes the file
def test_a_truncated_file_reads_as_not_closed_and_fails_against_its_receipt(real_audit, tmp_path, capsys) -> None:
    path, receipt, _ = real_audit
    lines = path.read_bytes().splitlines(keepends=True)
    f = tmp_path / "cut.audit"
    f.write_bytes(b"".join(lines[:8]) + lines[8][:40])  # 7 whole frames and half of the 8th
    rc, out = _verify(f, "--no-signatures", capsys=capsys)
    assert rc == 3 and "7 frames" in out and "NOT CLOSED" in out and "line 9 is a frame the sidecar was writing" in out
    rc, out = _verify(f, "--receipt", str(receipt), capsys=capsys)
    assert rc == 1 and "the receipt given says chain_hash" in out


@pytest.mark.slow  # the real model writes the file
def test_a_file_or_receipt_of_another_session_is_caught(real_audit, tmp_path, capsys, keys, other_keys) -> None:
    path, receipt, _ = real_audit
    lines = path.read_bytes().splitlines(keepends=True)
    other = json.loads(lines[0])
    other["session"] = "someone-else"
    f = tmp_path / "spliced.audit"
    f.write_bytes(ledger.encode(other) + b"".join(lines[1:]))
    rc, out = _verify(f, capsys=capsys)
    assert rc == 1 and "BROKEN at line 1: genesis hash does not match" in out
    r = json.loads(receipt.read_text())
    r["session_id"] = "someone-else"
    fake = tmp_path / "other-receipt.json"
    fake.write_text(json.dumps(r))
    rc, out = _verify(path, "--receipt", str(fake), capsys=capsys)
    assert rc == 1 and "the receipt given says session_id" in out
    rc, out = _verify(path, "--public-key", str(other_keys.public), capsys=capsys)  # signed by a key not given
    assert rc == 1 and "not among the keys given" in out


@pytest.mark.slow  # the real model writes the file
def test_audit_verify_the_command_exits_0_and_1(real_audit, tmp_path, keys) -> None:
    path, receipt, _ = real_audit
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "audit",
            "verify",
            str(path),
            "--receipt",
            str(receipt),
            "--public-key",
            str(keys.public),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "VERIFIED" in ok.stdout
    bad = tmp_path / "bad.audit"
    bad.write_bytes(b"".join(_edit_token(path.read_bytes().splitlines(keepends=True), 3)))
    r = subprocess.run([sys.executable, "-m", "sidecar", "audit", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "BROKEN at line 4" in r.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "sidecar", "audit", "verify", str(tmp_path / "nope.audit")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "nope.audit: UNREADABLE: No such file or directory" in missing.stdout


def _start(tmp_path: Path, keys, config: dict, rlimits=None) -> LocalSidecar:
    """``serve`` in its own process, as deployed (with ``rlimits`` set on it)."""
    from sidecar.launch import start_local_sidecar

    sc = start_local_sidecar(tmp_path, config, (keys.private, keys.public), rlimits)
    sc.wait_started()
    return sc


def test_a_sidecar_killed_mid_session_leaves_an_unclosed_prefix_whose_chain_holds(tmp_path, keys, capsys) -> None:
    audit = tmp_path / "audit"
    sc = _start(tmp_path, keys, {"audit": {"dir": str(audit), "fsync": "every_frame"}})
    try:
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
        for i in range(12):
            assert s.step(peaked(i)).token_id == i
        time.sleep(0.3)  # the syncer thread gets to the last frames
        os.kill(sc.proc.pid, signal.SIGKILL)
        sc.proc.wait(10)
    finally:
        sc.stop()
    (f,) = audit.glob("*.audit")
    rc, out = _verify(f, "--public-key", str(keys.public), capsys=capsys)
    assert rc == 3 and "12 frames" in out and "NOT CLOSED" in out and "BROKEN" not in out, out


FULL_DISK = {resource.RLIMIT_FSIZE: (24_000, 24_000)}  # no file of the sidecar grows past 24 kB


def test_a_full_audit_disk_aborts_the_step_and_no_token_goes_out_without_its_frame(tmp_path, keys, capsys) -> None:
    audit = tmp_path / "audit"
    sc = _start(tmp_path, keys, {"audit": {"dir": str(audit)}, "log_level": "error"}, rlimits=FULL_DISK)
    try:
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
        emitted = []
        with pytest.raises(GuardAbort) as err:
            for i in range(10_000):
                emitted.append(s.step(peaked(i % V)).token_id)
        assert [r.code for r in err.value.reasons][-1] == "audit" and "audit" in str(err.value)
        with pytest.raises(GuardUnavailable):  # the adapter steps no more
            s.step(peaked(1))
        stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sc.target))  # nor does the sidecar
        again = pb.StepRequest(
            session_id=s.session_id,
            session_secret=s._secret,
            step=len(emitted) + 1,
            inline=pb.InlineLogits(data=peaked(1).tobytes(), dtype=pb.DTYPE_F32),
        )
        assert stub.Step(again, timeout=5).HasField("error")
        assert sc.proc.poll() is None  # the sidecar itself serves on
    finally:
        sc.stop()
    (f,) = audit.glob("*.audit")
    assert f.stat().st_size <= 24_000
    rc, out = _verify(f, "--public-key", str(keys.public), capsys=capsys)
    # one whole frame per emitted token, none cut in half; the session ended on the audit abort, unclosed
    assert rc == 3 and f"{len(emitted)} frames" in out and "BROKEN" not in out, out


def test_an_unwritable_audit_directory_refuses_the_session(tmp_path, keys) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    sc = _start(tmp_path, keys, {"audit": {"dir": str(audit)}})
    try:
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        digest = c.register_vocabulary(VOCAB)
        audit.chmod(0o500)
        if os.access(audit, os.W_OK):  # root ignores the mode: make the directory unusable another way
            audit.chmod(0o700)
            os.rmdir(audit)
            audit.write_text("not a directory")
        with pytest.raises(GuardUnavailable, match="UNAVAILABLE: cannot create audit file"):
            c.open_session(digest, SamplingParams())  # no session runs unaudited
    finally:
        if audit.is_dir():
            audit.chmod(0o700)
        sc.stop()


def test_the_signing_key_rotates_without_dropping_the_session(tmp_path, keys) -> None:
    """A session opened under key A completes under key B while the adapter trusts both;
    an adapter that trusts only A rejects B's verdicts."""
    a_pub = keys.public
    b_priv, b_pub = generate_keypair(tmp_path / "b")
    sc = _start(tmp_path, keys, {})
    try:
        both = GuardClient(sc.target, [a_pub, b_pub])
        only_a = GuardClient(sc.target, a_pub)
        both.wait_ready()
        digest = both.register_vocabulary(VOCAB)
        s, old = both.open_session(digest, SamplingParams()), only_a.open_session(digest, SamplingParams())
        assert s.step(peaked(1)).key_id == old.step(peaked(1)).key_id == TrustedKeys.load(a_pub).key_ids[0]
        cfg = yaml.safe_load(sc.config.read_text())
        cfg["signing_key_file"] = str(b_priv)
        sc.config.write_text(yaml.safe_dump(cfg))
        both.reload_policy()  # ReloadPolicy (or SIGHUP) reads the key file again
        v = s.step(peaked(2))
        assert v.token_id == 2 and v.key_id == TrustedKeys.load(b_pub).key_ids[0]
        with pytest.raises(VerdictRejected, match="does not trust"):
            old.step(peaked(2))
        assert s.close() is not None and s.receipt is not None and s.receipt.key_id == v.key_id
    finally:
        sc.stop()


def test_the_adapter_refuses_a_receipt_that_does_not_match_its_verdicts(tmp_path, keys, other_keys) -> None:
    from sidecar.signing import Signer

    sc = _start(tmp_path, keys, {})
    try:
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
        for i in range(3):
            s.step(peaked(i))
        s.close()
        good = s.receipt
        assert good is not None and good.steps == 3 and good.accepted == 3 and good.chain_hash == s.chain_hash
        assert good.first_timestamp_ns <= good.last_timestamp_ns
        for change in ({"steps": 2, "accepted": 2}, {"chain_hash": bytes(32)}, {"session_id": "other"}):
            bad = pb.Receipt()
            bad.CopyFrom(good)
            for k, v in change.items():
                setattr(bad, k, v)
            Signer.from_file(keys.private).sign_receipt(bad)  # validly signed, but not this session's
            with pytest.raises(VerdictRejected, match="does not match the verdicts"):
                s._checked_receipt(bad)
        forged = pb.Receipt()
        forged.CopyFrom(good)
        Signer.from_file(other_keys.private).sign_receipt(forged)
        with pytest.raises(VerdictRejected, match="signature does not verify"):
            s._checked_receipt(forged)
    finally:
        sc.stop()
