"""The fault matrix (docs/reliability.md): every fault on every lane it applies to, each
held to the four checks of tests/faults.py. ``scripts/gen_reliability.py`` runs it and
writes the table in docs/reliability.md from what it recorded; test_reliability.py keeps that current."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.errors import GuardAbort, GuardUnavailable, StepRefused, VerdictRejected
from sidecar.launch import LocalSidecar, start_local_sidecar
from sidecar.ring import RingWriter
from tests.faults import Guarded, Mitm, Rig, fault, row
from tests.test_audit import FULL_DISK  # an audit file that cannot grow
from tests.test_trust import _foreign_segment

STEP_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def shared(tmp_path_factory, keys) -> Iterator[tuple[LocalSidecar, Path]]:
    """One sidecar for the faults that leave it serving (each case has its own sessions)."""
    d = tmp_path_factory.mktemp("matrix")
    sc = start_local_sidecar(d, {"audit": {"dir": str(d / "audit")}, "log_level": "error"}, (keys.private, keys.public))
    sc.wait_started()
    yield sc, d / "audit"
    assert sc.proc.poll() is None, "a fault took the shared sidecar down"
    sc.stop()


@pytest.fixture
def rig(shared, keys, lane: str) -> Iterator[Rig]:
    sc, audit = shared
    r = Rig(sc.target, keys.public, audit, lane, STEP_TIMEOUT)
    yield r
    r.close()


@pytest.fixture
def own(tmp_path, keys, lane: str) -> Iterator[Callable[..., tuple[LocalSidecar, Rig]]]:
    """A sidecar of the case's own, for faults that stop, kill or reconfigure it."""
    made: list[tuple[LocalSidecar, Rig]] = []

    def start(rlimits: dict[int, tuple[int, int]] | None = None, **config: object) -> tuple[LocalSidecar, Rig]:
        d = tmp_path / f"own{len(made)}"
        d.mkdir()
        cfg = {"audit": {"dir": str(d / "audit")}, "log_level": "error", **config}
        sc = start_local_sidecar(d, cfg, (keys.private, keys.public), rlimits=rlimits)
        sc.wait_started()
        r = Rig(sc.target, keys.public, d / "audit", lane, STEP_TIMEOUT)
        made.append((sc, r))
        return sc, r

    yield start
    for sc, r in made:
        with contextlib.suppress(Exception):
            os.kill(sc.proc.pid, signal.SIGCONT)
        r.client.close()
        for ring in r.rings:
            ring.close()
        sc.stop()


def _refused_at_open(rig: Rig, ring: RingWriter, match: str) -> None:
    """A ring fault found at OpenSession: refused naming it, no session, no audit file;
    the bystander opened before serves on."""
    bystander = rig.open()
    bystander.run(2)
    sid = f"victim-{uuid.uuid4().hex[:8]}"
    with pytest.raises(GuardUnavailable, match=match):
        rig.open(session_id=sid, ring=ring)
    assert rig.audit_dir is not None and not list(rig.audit_dir.glob(f"{sid}.*"))
    rig.unaffected(bystander)


# -- the sidecar process ---------------------------------------------------------------------


@fault("sidecar-killed", "sidecar", "sidecar SIGKILLed mid-stream", "every session fails at once; audit prefixes intact")
def test_a_killed_sidecar_fails_every_session_at_once(own, lane: str) -> None:
    sc, rig = own()
    victim, other = rig.pair()
    sc.kill()
    t0 = time.monotonic()
    for g in (victim, other):
        with pytest.raises(GuardUnavailable, match=r"unavailable|hung up|closed|UNAVAILABLE"):
            g.step(row(9))
        rig.failed_closed(g)
        rig.audit_intact(g, closed=False)
    assert time.monotonic() - t0 < STEP_TIMEOUT, "noticed at the deadline, not at once"


@fault("sidecar-stopped", "sidecar", "sidecar SIGSTOPped past the step deadline", "the step fails at its deadline; others go on")
def test_a_stopped_sidecar_fails_the_step_at_its_deadline(own, lane: str) -> None:
    sc, rig = own()
    victim, bystander = rig.pair()
    os.kill(sc.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(GuardUnavailable, match=r"within|deadline|DEADLINE_EXCEEDED"):
            victim.step(row(9))
        assert time.monotonic() - t0 < STEP_TIMEOUT + 1.0
    finally:
        os.kill(sc.proc.pid, signal.SIGCONT)
    rig.held(victim, bystander)


@fault(
    "sidecar-restarted",
    "sidecar",
    "sidecar restarted during a session",
    "the old session never resumes; a new one starts under a new genesis",
)
def test_a_restarted_sidecar_resumes_nothing_without_a_new_genesis(own, keys, lane: str) -> None:
    sc, rig = own()
    victim = rig.open()
    victim.run(3)
    sc.kill()
    again = start_local_sidecar(sc.config.parent, yaml.safe_load(sc.config.read_text()), (keys.private, keys.public))
    try:
        again.wait_started()
        with pytest.raises(GuardUnavailable, match=r"unavailable|hung up|closed|NOT_FOUND|UNAVAILABLE"):
            victim.step(row(9))
        rig.failed_closed(victim)
        rig.audit_intact(victim, closed=False)
        fresh = Rig(again.target, keys.public, rig.audit_dir, lane, STEP_TIMEOUT)
        try:
            g = fresh.open(session_id=victim.s.session_id)  # the same id: another opening
            assert g.s.genesis != victim.s.genesis
            fresh.unaffected(g)
            assert len(list(rig.audit_dir.glob(f"{victim.s.session_id}.*.audit"))) == 2  # type: ignore[union-attr]
        finally:
            fresh.close()
    finally:
        again.stop()


# -- the ring --------------------------------------------------------------------------------


def _hooked(g: Guarded, after: Callable[[RingWriter, int], None]) -> None:
    """Make the victim's next frame go wrong: ``after(ring, slot)`` runs once the engine
    has published it, before the sidecar is asked to read it."""
    ring, original = g.ring, g.ring.frame

    @contextlib.contextmanager
    def frame(slot: int) -> Iterator:
        with original(slot) as f:
            yield f
        ring.frame = original  # type: ignore[method-assign]
        after(ring, slot)

    ring.frame = frame  # type: ignore[method-assign]


@fault("ring-torn", "ring", "frame torn (seqlock left odd)", "refused as torn")
def test_a_torn_frame_gets_no_verdict(rig: Rig, lane: str) -> None:
    victim, bystander = rig.pair()
    _hooked(victim, lambda ring, slot: ring.begin_raw(slot))
    with pytest.raises(StepRefused, match="torn"):
        victim.step(row(9))
    rig.held(victim, bystander)


def _overwrite(ring: RingWriter, slot: int) -> None:
    with ring.frame(slot) as f:  # a newer frame in the same slot: the request names a stale one
        f.write_row(0, 0, row(5))


@fault("ring-stale", "ring", "frame overwritten after it was named (stale)", "refused; the newer row is not judged")
def test_a_stale_frame_gets_no_verdict(rig: Rig, lane: str) -> None:
    victim, bystander = rig.pair()
    _hooked(victim, _overwrite)
    with pytest.raises(StepRefused, match=r"frame|seq|stale"):
        victim.step(row(9))
    rig.held(victim, bystander)


@fault("ring-truncated", "ring", "ring truncated under the sidecar", "refused; the sidecar serves on")
def test_a_truncated_ring_gets_no_verdict(rig: Rig, lane: str) -> None:
    victim, bystander = rig.pair()

    def truncate(ring: RingWriter, slot: int) -> None:  # after the engine's last write to it
        fd = os.open(f"/dev/shm/{ring.name}", os.O_RDWR)
        try:
            os.ftruncate(fd, 4096)
        finally:
            os.close(fd)

    if lane == "shm":  # after the request record too: the engine's last write on the fast lane
        submit = victim.ring.submit

        def submitted(slot: int, *args: int) -> None:
            submit(slot, *args)
            truncate(victim.ring, slot)

        victim.ring.submit = submitted  # type: ignore[method-assign]
    else:
        _hooked(victim, truncate)
    with pytest.raises((StepRefused, GuardUnavailable), match=r"truncated|smaller|bytes|beyond|Bus|size"):
        victim.step(row(9))
    rig.held(victim, bystander)


@fault("ring-foreign", "ring", "another program's segment named as the ring", "refused at open, nothing echoed")
def test_a_foreign_segment_is_refused_at_open(rig: Rig, lane: str) -> None:
    ring = rig.ring()
    name = ring.name
    ring.close()  # unlinks it: put another program's segment under its name
    _foreign_segment(name, b"SECRETHEADER" + b"\x07" * 70_000)
    try:
        impostor = RingWriter.__new__(RingWriter)
        impostor.name, impostor.layout = name, ring.layout
        _refused_at_open(rig, impostor, "not an fse ring")
    finally:
        os.unlink(f"/dev/shm/{name}")


@fault("ring-unlinked", "ring", "ring unlinked before the session opens", "refused at open naming the ring")
def test_an_unlinked_ring_is_refused_at_open(rig: Rig, lane: str) -> None:
    ring = rig.ring()
    os.unlink(f"/dev/shm/{ring.name}")
    _refused_at_open(rig, ring, "no shared-memory ring named")


@fault("ring-wrong-version", "ring", "ring of another layout version", "refused at open naming the version")
def test_a_ring_of_another_version_is_refused_at_open(rig: Rig, lane: str) -> None:
    ring = rig.ring()
    ring._shm.buf[8:12] = (3).to_bytes(4, "little")  # type: ignore[union-attr]
    _refused_at_open(rig, ring, "layout version 3 is not supported")


# -- what the engine sends -------------------------------------------------------------------


@fault("input-nan", "input", "NaN or Inf in the logits", "a signed ABORT naming it; no token")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_abort_with_the_reason(rig: Rig, lane: str, bad: float) -> None:
    victim, bystander = rig.pair()
    x = row(9)
    x[17] = bad
    with pytest.raises(GuardAbort, match="non_finite|finite"):
        victim.step(x)
    assert rig.held(victim, bystander).tally.aborted == 1  # the ABORT is in the chain


@fault("input-vocab-size", "input", "ring of another vocabulary size", "refused at open naming both sizes")
def test_a_ring_of_another_vocabulary_size_is_refused(rig: Rig, lane: str) -> None:
    _refused_at_open(rig, rig.ring(vocab_size=1001), r"1001.*1000|1000.*1001")


@fault("input-dtype", "input", "ring of an unknown dtype", "refused at open naming the dtype")
def test_a_ring_of_an_unknown_dtype_is_refused(rig: Rig, lane: str) -> None:
    ring = rig.ring()
    ring._shm.buf[28:32] = (9).to_bytes(4, "little")  # type: ignore[union-attr]
    _refused_at_open(rig, ring, "dtype")


def _misstep(rig: Rig, lane: str, shift: int, match: str) -> None:
    victim, bystander = rig.pair()
    victim.s.next_step += shift  # a confused engine: the step it names is not the next one
    with pytest.raises((StepRefused, GuardUnavailable), match=match):
        victim.step(row(9))
    victim.s.next_step -= shift  # (a dead session steps no more: it refuses before naming a step)
    rig.held(victim, bystander)


@fault("step-twice", "input", "a step sent twice", "refused naming the expected step")
def test_a_step_sent_twice_is_refused(rig: Rig, lane: str) -> None:
    _misstep(rig, lane, -1, r"step 2.*expected step 3|expected 3|out of order|tag")


@fault("step-out-of-order", "input", "a step skipped (out of order)", "refused naming the expected step")
def test_a_step_out_of_order_is_refused(rig: Rig, lane: str) -> None:
    _misstep(rig, lane, +1, r"step 4.*expected step 3|expected 3|out of order|tag")


@fault("step-closed-session", "input", "a step for a closed session", "refused: no such session")
def test_a_step_for_a_closed_session_is_refused(rig: Rig, lane: str) -> None:
    victim, bystander = rig.pair()
    stub = pb_grpc.GuardServiceStub(rig.client._channel)
    closed = stub.CloseSession(pb.CloseSessionRequest(session_id=victim.s.session_id, session_secret=victim.s._secret))
    assert closed.steps == 3
    with pytest.raises(GuardUnavailable, match=r"NOT_FOUND|no session|hung up|closed"):
        victim.step(row(9))
    rig.held(victim, bystander, closed=True)


@fault("step-after-abort", "input", "a step after the session's ABORT", "refused: the session has ended")
def test_a_step_after_abort_is_refused(rig: Rig, lane: str) -> None:
    victim, bystander = rig.pair()
    x = row(9)
    x[3] = np.nan
    with pytest.raises(GuardAbort):
        victim.step(x)
    victim.s.dead = None  # an engine that ignores the ABORT and steps on
    victim.s._stream = victim.s.lane = None  # (the failed session hung up its channel: a new one)
    with pytest.raises((StepRefused, GuardUnavailable), match=r"abort|ended|FAILED_PRECONDITION|NOT_FOUND"):
        victim.step(row(10))
    rig.held(victim, bystander)


# -- what comes back -------------------------------------------------------------------------

_SEALED = "not the one the batch seal signed for its row"
_VERDICT_FAULTS = {
    "forged": (VerdictRejected, "signature does not verify"),
    "replayed": (VerdictRejected, r"verdict is for step 2, expected step 3"),
    "cross_session": (VerdictRejected, "verdict is for session"),
    "cross_opening": (VerdictRejected, r"previous chain hash|does not link"),
}


@pytest.fixture
def mitm(shared, tmp_path) -> Iterator[Mitm]:
    sc, _ = shared
    m = Mitm(sc.target, tmp_path / "mitm.sock")
    yield m
    m.close()


def _verdict_fault(shared, keys, mitm: Mitm, lane: str, mode: str) -> None:
    sc, audit = shared
    rig = Rig(mitm.target if lane != "shm" else sc.target, keys.public, audit, lane, STEP_TIMEOUT)
    try:
        sid = f"victim-{uuid.uuid4().hex[:8]}"
        earlier = None
        if mode == "cross_opening":
            earlier = rig.open(session_id=sid)
            earlier.run(4)
            earlier.s.close()
        victim, bystander = rig.open(session_id=sid), rig.open()
        victim.run(3)
        bystander.run(4)  # a step ahead: its step-3 verdict exists when the victim's is altered
        # A batch is sealed: any verdict put in another's place fails its row's seal digest.
        expected, match = (VerdictRejected, _SEALED) if lane == "batch" else _VERDICT_FAULTS[mode]
        if lane == "shm":
            exc = _tamper_shm(sc, victim, earlier or bystander, mode)
            assert isinstance(exc, expected), repr(exc)
            assert re.search(match, str(exc)), str(exc)
        else:
            mitm.arm(mode, sid)
            with pytest.raises(expected, match=match):
                victim.step(row(9))
            assert mitm.fired == 1
        rig.held(victim, bystander)
    finally:
        rig.close()


def _tamper_shm(sc: LocalSidecar, victim: Guarded, other: Guarded, mode: str) -> BaseException | None:
    """On the fast lane the attacker writes into the ring's verdict area instead: the
    victim's step-3 answer altered, or replaced by its step-2 verdict or by ``other``'s
    step-3 verdict (another session's, or an earlier opening's of the same id)."""
    from tests.test_lane import _tamper_during_step, _write_answer

    def forge(slot: int, seq: int) -> None:
        if mode == "forged":
            v = pb.Verdict()
            v.CopyFrom(victim.verdicts[2])
            v.step, v.token_id, v.prev_chain_hash = 3, 9, victim.s.chain_hash  # a step-3 verdict nobody signed
        elif mode == "replayed":
            v = victim.verdicts[2]
        else:
            v = other.verdicts[3]
        _write_answer(victim.ring, slot, seq, [pb.StepResponse(verdict=v).SerializeToString()])

    return _tamper_during_step(sc, victim.s, row(9), forge)


@fault("verdict-forged", "verdict", "verdict altered in transit (forged)", "rejected: the signature does not verify")
def test_a_forged_verdict_is_rejected(shared, keys, mitm, lane: str) -> None:
    _verdict_fault(shared, keys, mitm, lane, "forged")


@fault("verdict-replayed", "verdict", "an earlier verdict of the session replayed", "rejected: wrong step")
def test_a_replayed_verdict_is_rejected(shared, keys, mitm, lane: str) -> None:
    _verdict_fault(shared, keys, mitm, lane, "replayed")


@fault("verdict-cross-session", "verdict", "another session's verdict delivered", "rejected: wrong session")
def test_another_sessions_verdict_is_rejected(shared, keys, mitm, lane: str) -> None:
    _verdict_fault(shared, keys, mitm, lane, "cross_session")


@fault(
    "verdict-cross-opening",
    "verdict",
    "a verdict from an earlier opening of the same session id",
    "rejected: it does not link to this opening's chain",
)
def test_a_verdict_from_an_earlier_opening_is_rejected(shared, keys, mitm, lane: str) -> None:
    _verdict_fault(shared, keys, mitm, lane, "cross_opening")


@fault(
    "verdict-reordered",
    "verdict",
    "a batch's verdicts delivered in another order",
    "both rows rejected: neither is the verdict the batch seal signed for its row",
    lanes=("batch",),
)
def test_reordered_verdicts_of_a_batch_are_rejected(shared, keys, mitm, lane: str) -> None:
    _batch_fault(shared, keys, mitm, lane, "reordered", _SEALED)


@fault(
    "seal-stripped",
    "verdict",
    "a batch answered without its seal",
    "every row of the batch rejected: no verdict in it is signed",
    lanes=("batch",),
)
def test_a_batch_without_its_seal_fails_every_row(shared, keys, mitm, lane: str) -> None:
    _batch_fault(shared, keys, mitm, lane, "unsealed", _SEAL_FAILED)


@fault(
    "seal-forged",
    "verdict",
    "a verdict altered and its digest in the seal replaced",
    "every row of the batch rejected: the seal's signature no longer verifies",
    lanes=("batch",),
)
def test_a_batch_whose_seal_was_altered_fails_every_row(shared, keys, mitm, lane: str) -> None:
    _batch_fault(shared, keys, mitm, lane, "resealed", _SEAL_FAILED)


_SEAL_FAILED = "seal is missing or does not verify"


def _batch_fault(shared, keys, mitm: Mitm, lane: str, mode: str, match: str) -> None:
    """Two sessions' rows in one frame and one batch; ``mode`` alters the batch's answer:
    both rows must be rejected with ``match`` in the error, the bystander go on."""
    sc, audit = shared
    rig = Rig(mitm.target, keys.public, audit, lane, STEP_TIMEOUT)
    try:
        ring = rig.ring(rows=2)
        a, b = rig.open(ring=ring), rig.open(ring=ring)  # one frame, one batch: two rows
        bystander = rig.open()
        bystander.run(3)
        for i in range(3):
            outs = rig.client.step_batch([(a.s, row(i)), (b.s, row(i + 1))], ring)
            assert all(isinstance(o, pb.Verdict) for o in outs), outs
        mitm.arm(mode, a.s.session_id)
        outs = rig.client.step_batch([(a.s, row(5)), (b.s, row(6))], ring)
        assert mitm.fired == 1
        for o in outs:  # under a bad seal, b's untouched verdict fails too: nothing signs it now
            assert isinstance(o, VerdictRejected) and match in str(o), repr(o)
        for g in (a, b):
            rig.failed_closed(g)
            rig.audit_intact(g)
        rig.unaffected(bystander)
    finally:
        rig.close()


# -- the audit and the policy file -----------------------------------------------------------


@fault("audit-disk-full", "audit", "audit file cannot grow (disk full)", "a signed ABORT naming the audit; no token")
def test_a_full_audit_disk_aborts_the_step(own, lane: str) -> None:
    _, rig = own(rlimits=FULL_DISK)
    victim, bystander = rig.pair()
    with pytest.raises(GuardAbort, match="audit"):
        for i in range(10_000):
            victim.step(row(i + 10))
    # whole frames only: one for every token, none cut in half; the ABORT's own frame could not be written
    rig.held(victim, bystander, through=len(victim.verdicts))


@fault("audit-unwritable", "audit", "audit directory unwritable", "new sessions refused; open ones go on")
def test_an_unwritable_audit_directory_refuses_new_sessions(own, lane: str) -> None:
    _, rig = own()
    bystander = rig.open()
    bystander.run(2)
    audit = rig.audit_dir
    assert audit is not None
    keep = audit.with_name("audit.kept")
    audit.rename(keep)
    audit.write_text("not a directory")  # root ignores modes: make it unusable for anyone
    try:
        with pytest.raises(GuardUnavailable, match="cannot create audit file"):
            rig.open()
    finally:
        audit.unlink()
        keep.rename(audit)
    rig.unaffected(bystander)


@fault(
    "policy-invalid-reload",
    "policy",
    "policy file replaced by an invalid one, then reloaded",
    "reload refused naming the field; sessions keep the old policy",
)
def test_an_invalid_policy_reload_is_refused_and_sessions_go_on(own, lane: str) -> None:
    sc, rig = own(policies={"default": {"rules": [{"id": "x", "kind": "literal", "patterns": ["t5 "], "action": "flag"}]}})
    bystander = rig.open()
    bystander.run(2)
    cfg = yaml.safe_load(sc.config.read_text())
    cfg["policies"]["default"]["rules"][0]["action"] = "explode"
    sc.config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(GuardUnavailable, match=r"action"):
        rig.client.reload_policy()
    g = rig.open()
    assert g.s.policy_digest == bystander.s.policy_digest
    rig.unaffected(g)
    rig.unaffected(bystander)
