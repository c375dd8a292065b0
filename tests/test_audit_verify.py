"""`audit verify` against whoever can write the audit directory (issue 28, items 10 and 12):
signed checkpoints make an unclosed file verifiable, nothing unchecked is called verified,
hostile files end in "BROKEN at line N", and directories or several files are checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine_adapters.client import GuardClient
from sidecar.cli import main
from sidecar.core import chain, ledger
from sidecar.core.guards import Sampler
from sidecar.core.redo import Decision, ProposalRecord
from sidecar.core.sampling import SamplingParams
from sidecar.launch import start_local_sidecar

V = 200
VOCAB = [f"t{i}".encode() for i in range(V)]
EVERY_4 = {"checkpoint_every_frames": 4, "checkpoint_interval_ms": 600_000}  # by count only: the same file on a slow machine


def peaked(top: int) -> np.ndarray:
    x = np.zeros(V, np.float32)
    x[top] = 12.0
    return x


def _session_file(tmp_path: Path, keys, steps: int, *, close: bool, kill: bool = False, **audit: object) -> Path:
    """A real sidecar's audit file of one session of ``steps`` steps."""
    d = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    d.mkdir()
    config = {"audit": {"dir": str(d / "audit"), "fsync": "every_frame", **audit}}
    sc = start_local_sidecar(d, config, (keys.private, keys.public))
    sc.wait_started()
    try:
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
        for i in range(steps):
            assert s.step(peaked(i % V)).token_id == i % V
        if close:
            s.close()
        if kill:
            time.sleep(0.3)  # the syncer gets to the last frames
            os.kill(sc.proc.pid, signal.SIGKILL)
            sc.proc.wait(10)
        c.close()
    finally:
        sc.stop()
    (f,) = (d / "audit").glob("*.audit")
    return f


def _records(f: Path) -> list[dict]:
    return [json.loads(x) for x in f.read_bytes().splitlines()]


def _write(f: Path, records: list[dict]) -> Path:
    f.write_bytes(b"".join(ledger.encode(r) for r in records))
    return f


def _forge(records: list[dict], step: int, token: int) -> list[dict]:
    """What a writer of the directory can do without the key: change frame ``step``'s
    token and recompute every later frame's chain, so the chain alone holds."""
    out = [dict(r) for r in records]
    session = out[0]["session"]
    prev = bytes.fromhex(out[0]["genesis_hash"])
    for r in out:
        if r["kind"] != "frame":
            continue
        if r["step"] == step:
            r["token_id"] = token
            r["proposals"] = [{**r["proposals"][0], "token_id": token}]
        reasons = [ledger.reason_from(t) for p in r["proposals"] for t in p["trips"]]
        reasons += [ledger.reason_from(t) for t in r["step_trips"]]
        proposals = [ProposalRecord(p["token_id"], Sampler[p["sampler"].upper()], len(p["trips"])) for p in r["proposals"]]
        sampler = int(Sampler[r["sampler"].upper()]) if r["sampler"] else 0
        frame = chain.frame_bytes(
            session, r["step"], r["token_id"], int(Decision[r["decision"].upper()]), sampler, proposals, reasons
        )
        r["prev_chain_hash"] = prev.hex()
        prev = chain.chain_next(prev, frame)
        r["chain_hash"] = prev.hex()
    return out


def _verify(capsys, *args: object) -> tuple[int, str]:
    rc = main(["audit", "verify", *map(str, args)])
    return rc, capsys.readouterr().out


@pytest.fixture(scope="module")
def closed_file(tmp_path_factory, keys) -> Path:
    """12 steps, a checkpoint every 4 frames, closed."""
    return _session_file(tmp_path_factory.mktemp("closed"), keys, 12, close=True, **EVERY_4)


def test_the_sidecar_signs_a_checkpoint_every_so_many_frames_and_the_file_verifies(closed_file, keys, capsys) -> None:
    kinds = [r["kind"] for r in _records(closed_file)]
    assert kinds == ["genesis", *(["frame"] * 4 + ["checkpoint"]) * 3, "close"]
    rc, out = _verify(capsys, closed_file, "--public-key", keys.public)
    assert rc == 0 and "VERIFIED: session" in out and "12 frames" in out and "closed (receipt)" in out, out


def test_a_forged_frame_of_a_file_without_its_close_record_is_caught_with_the_key(closed_file, tmp_path, keys, capsys) -> None:
    # the forgery: frame 2's token changed, the chain recomputed, the close record dropped
    forged = _write(tmp_path / "forged.audit", _forge(_records(closed_file), 2, 77)[:-1])
    rc, out = _verify(capsys, forged, "--public-key", keys.public)
    assert rc == 1 and "BROKEN at line 6: the checkpoint record's checkpoint says chain_hash" in out, out


def test_a_forged_tail_after_the_last_checkpoint_is_never_called_verified(closed_file, tmp_path, keys, capsys) -> None:
    records = _forge(_records(closed_file), 10, 77)[:-1]  # frames 8-11 follow the last checkpoint before the close
    records = [r for r in records if not (r["kind"] == "checkpoint" and r["checkpoint"]["steps"] == 12)]
    forged = _write(tmp_path / "tail.audit", records)
    rc, out = _verify(capsys, forged, "--public-key", keys.public)
    assert rc == 3 and "UNVERIFIED" in out and "signed and checked through frame 8" in out, out
    assert "frames 8-11 are chained but under no signature" in out and "VERIFIED:" not in out.replace("UNVERIFIED", "")


def test_without_a_key_nothing_is_called_verified_unless_asked_to_skip_signatures(closed_file, keys, capsys) -> None:
    rc, out = _verify(capsys, closed_file)
    assert rc == 3 and "UNVERIFIED" in out and "signatures are not checked" in out and "intact" not in out, out
    rc, out = _verify(capsys, closed_file, "--no-signatures")
    assert rc == 0 and "chain consistent, signatures not checked (--no-signatures)" in out, out
    assert main(["audit", "verify", str(closed_file), "--no-signatures", "--public-key", str(keys.public)]) == 2


def test_a_forged_receipt_signature_is_broken_with_the_key(closed_file, tmp_path, keys, capsys) -> None:
    records = _records(closed_file)
    records[-1]["receipt"]["signature"] = "00" * 64
    rc, out = _verify(capsys, _write(tmp_path / "sig.audit", records), "--public-key", keys.public)
    assert rc == 1 and f"BROKEN at line {len(records)}: close record: receipt signature does not verify" in out, out


def test_a_reaped_session_ends_with_a_signed_final_checkpoint_and_verifies(tmp_path, keys, capsys) -> None:
    d = tmp_path / "reaped"
    d.mkdir()
    sc = start_local_sidecar(d, {"audit": {"dir": str(d / "audit")}, "session_idle_timeout_s": 0.5}, (keys.private, keys.public))
    sc.wait_started()
    try:
        c = GuardClient(sc.target, keys.public)
        c.wait_ready()
        s = c.open_session(c.register_vocabulary(VOCAB), SamplingParams())
        for i in range(5):
            s.step(peaked(i))
        (f,) = (d / "audit").glob("*.audit")
        deadline = time.monotonic() + 20
        while _records(f)[-1].get("ended") != "reaped":
            assert time.monotonic() < deadline, _records(f)[-1]
            time.sleep(0.1)
        c.close()
    finally:
        sc.stop()
    rc, out = _verify(capsys, f, "--public-key", keys.public)
    assert rc == 0 and "VERIFIED" in out and "5 frames" in out and "ended by the sidecar (reaped)" in out, out


def test_a_killed_sidecar_leaves_a_file_signed_up_to_its_last_checkpoint(tmp_path, keys, capsys) -> None:
    f = _session_file(tmp_path, keys, 11, close=False, kill=True, **EVERY_4)
    rc, out = _verify(capsys, f, "--public-key", keys.public)
    assert rc == 3 and "11 frames" in out and "NOT CLOSED" in out and "signed and checked through frame 8" in out, out
    assert "frames 8-10 are chained but under no signature" in out


def _genesis_line(closed_file: Path) -> bytes:
    return closed_file.read_bytes().splitlines(keepends=True)[0]


@pytest.mark.parametrize(
    ("name", "make", "line", "message"),
    [
        ("no line end", lambda g, f: g.rstrip(b"\n"), 1, "the genesis record is incomplete"),
        ("deep JSON", lambda g, f: g + b"[" * 100_000 + b"]" * 100_000 + b"\n", 2, "not a JSON record (RecursionError"),
        ("a JSON list", lambda g, f: g + b"[1, 2]\n", 2, "not a JSON object but list"),
        (
            "non-string sampler",
            lambda g, f: g + f[1].replace(b'"sampler":"normal","session"', b'"sampler":7,"session"'),
            2,
            "a field is missing or malformed (AttributeError",
        ),
        (
            "top_k 2^70",
            lambda g, f: g.replace(b'"top_k":0', b'"top_k":' + str(2**70).encode()),
            1,
            "genesis sampling parameters are unreadable",
        ),
        ("a string step", lambda g, f: g + f[1].replace(b'"step":0', b'"step":"0"'), 2, "frame '0' where frame 0 should be"),
    ],
)
def test_hostile_files_end_in_broken_at_their_line_never_in_a_traceback(
    closed_file, tmp_path, capsys, name: str, make, line: int, message: str
) -> None:
    lines = closed_file.read_bytes().splitlines(keepends=True)
    bad = tmp_path / "hostile.audit"
    bad.write_bytes(make(lines[0], lines))
    rc, out = _verify(capsys, bad, "--no-signatures")
    assert rc == 1 and f"BROKEN at line {line}: {message}" in out, out


def test_a_deeply_nested_receipt_is_a_clear_error(closed_file, tmp_path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    r = subprocess.run(
        [sys.executable, "-m", "sidecar", "audit", "verify", str(closed_file), "--receipt", str(deep)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "is not a JSON receipt: RecursionError" in r.stderr and "Traceback" not in r.stderr


def test_a_directory_and_several_files_are_checked_each_and_the_worst_sets_the_exit(closed_file, tmp_path, keys, capsys) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.audit").write_bytes(closed_file.read_bytes())
    (d / "b.audit").write_bytes(closed_file.read_bytes())
    rc, out = _verify(capsys, d, "--public-key", keys.public)
    assert rc == 0 and out.count("VERIFIED: session") == 2 and "2 files: 2 verified, 0 unverified, 0 unreadable, 0 broken" in out
    _write(d / "c.audit", _forge(_records(closed_file), 1, 5))
    rc, out = _verify(capsys, d / "a.audit", d / "c.audit", "--public-key", keys.public)
    assert rc == 1 and "c.audit: BROKEN" in out and "1 verified, 0 unverified, 0 unreadable, 1 broken" in out, out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audit", "verify", str(empty)]) == 2


def test_a_frame_whose_prev_chain_hash_field_lies_is_broken_even_if_its_chain_hash_holds(closed_file, tmp_path, capsys) -> None:
    """Mutation audit: each record's prev_chain_hash link is checked, not only the chain
    hash recomputed from the frame before."""
    records = _records(closed_file)
    records[3]["prev_chain_hash"] = "ab" * 32  # frame 2: its own chain hash untouched
    rc, out = _verify(capsys, _write(tmp_path / "link.audit", records), "--no-signatures")
    assert rc == 1 and "BROKEN at line 4: frame 2 does not link to the previous chain hash" in out, out


def test_a_failed_audit_write_is_cut_back_to_the_last_whole_frame(tmp_path, monkeypatch) -> None:
    """Mutation audit: a short write (a full disk) leaves no half frame behind."""
    from sidecar import audit as audit_mod
    from sidecar.config import AuditConfig
    from sidecar.errors import AuditError

    cfg = AuditConfig(dir=tmp_path, fsync="close")
    syncer = audit_mod.Syncer(cfg)
    log = audit_mod.SessionAudit(tmp_path / "s.audit", syncer)
    log.append({"kind": "genesis", "n": 1})
    whole = (tmp_path / "s.audit").read_bytes()
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])  # the disk fills mid-frame

    monkeypatch.setattr(audit_mod.os, "write", half_write)
    with pytest.raises(AuditError, match="short write"):
        log.append({"kind": "frame", "padding": "x" * 200})
    monkeypatch.setattr(audit_mod.os, "write", real_write)
    assert (tmp_path / "s.audit").read_bytes() == whole
    with pytest.raises(AuditError, match="failed earlier"):  # and the file takes nothing more
        log.append({"kind": "frame"})
    log.close()
    syncer.stop()
