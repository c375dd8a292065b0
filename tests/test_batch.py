"""Batched steps (a batched engine's decoding step) against the sidecar as deployed: one
frame and one message for many sessions, each row judged and verified on its own under one
signature for the batch (its seal), and one row's fault ending that row's session alone."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest

from engine_adapters.client import Compact, GuardClient
from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.core.compact import moments_and_top
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardUnavailable, StepRefused
from sidecar.ring import RingWriter
from sidecar.signing import verdict_bytes

V = 1000
VOCAB = [f"t{i}".encode() for i in range(V)]


def rows(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(-3.0, 2.0, V).astype(np.float32)
        x[rng.choice(V, 4, replace=False)] += 9.0
        out.append(x)
    return out


def compact(x: np.ndarray, k: int = 32) -> Compact:
    return Compact(*moments_and_top(x, k))


@pytest.fixture
def sidecar(start_sidecar):
    return start_sidecar(max_batch_rows=8)


@pytest.fixture
def client(sidecar, keys):
    c = GuardClient(sidecar.target, keys.public, step_timeout=5.0)
    c.wait_ready()
    yield c
    c.close()


PARAMS = [SamplingParams(), SamplingParams(temperature=0.8, top_k=8, seed=3), SamplingParams(temperature=1.2, top_k=4, seed=4)]


def test_a_batch_of_full_and_compact_rows_in_one_frame_gets_the_verdicts_of_single_steps(client) -> None:
    digest = client.register_vocabulary(VOCAB)
    n = 6
    with RingWriter.create(slots=2, rows=n, vocab_size=V, topk=32) as ring:
        batch = [client.open_session(digest, PARAMS[i % 3], ring=ring, session_id=f"b{i}") for i in range(n)]
        single = [client.open_session(digest, PARAMS[i % 3], ring=ring, session_id=f"s{i}") for i in range(n)]
        for step in range(3):
            xs = rows(step, n)
            mixed = [(s, compact(x) if i % 2 else x) for i, (s, x) in enumerate(zip(batch, xs, strict=True))]
            got = client.step_batch(mixed, ring)
            want = [s.step(x) for s, x in zip(single, xs, strict=True)]
            assert all(isinstance(v, pb.Verdict) for v in got), got
            assert [v.token_id for v in got] == [v.token_id for v in want]
            assert [v.decision for v in got] == [v.decision for v in want]
            assert [v.step for v in got] == [step] * n
        for s in batch:
            closed = s.close()
            assert closed is not None and closed.steps == 3 and s.receipt is not None  # the chain verified all along


def test_inline_batches_without_a_ring_give_the_same_tokens(client) -> None:
    digest = client.register_vocabulary(VOCAB)
    xs = rows(7, 3)
    with RingWriter.create(slots=1, rows=3, vocab_size=V, topk=32) as ring:
        a = [client.open_session(digest, PARAMS[i], ring=ring, session_id=f"r{i}") for i in range(3)]
        ra = client.step_batch([(s, compact(x)) for s, x in zip(a, xs, strict=True)], ring)
    b = [client.open_session(digest, PARAMS[i], session_id=f"i{i}") for i in range(3)]
    rb = client.step_batch([(b[0], xs[0]), (b[1], compact(xs[1])), (b[2], compact(xs[2]))])
    assert [v.token_id for v in ra] == [v.token_id for v in rb]  # type: ignore[union-attr]


def test_a_row_that_cannot_be_judged_ends_its_own_session_and_no_other(client) -> None:
    digest = client.register_vocabulary(VOCAB)
    with RingWriter.create(slots=2, rows=3, vocab_size=V, topk=8) as ring:
        ok1 = client.open_session(digest, SamplingParams(), ring=ring)
        hot = client.open_session(digest, SamplingParams(temperature=1.0, seed=1), ring=ring)  # no top-k: needs FULL
        ok2 = client.open_session(digest, SamplingParams(temperature=0.7, top_k=3, seed=2), ring=ring)
        xs = rows(1, 3)
        got = client.step_batch([(ok1, compact(xs[0], 8)), (hot, compact(xs[1], 8)), (ok2, compact(xs[2], 8))], ring)
        assert isinstance(got[0], pb.Verdict) and isinstance(got[2], pb.Verdict)
        assert isinstance(got[1], StepRefused) and got[1].code == "FAILED_PRECONDITION"
        assert "send this row FULL" in str(got[1])
        assert hot.dead is not None and ok1.dead is None
        again = client.step_batch([(ok1, xs[0]), (hot, xs[1]), (ok2, xs[2])], ring)
        assert isinstance(again[0], pb.Verdict) and isinstance(again[2], pb.Verdict)
        assert isinstance(again[1], GuardUnavailable)  # a dead session stays dead: no token for it


def test_rows_of_a_batch_without_the_sessions_secret_or_with_a_bad_id_are_refused_in_place(sidecar, client) -> None:
    digest = client.register_vocabulary(VOCAB)
    s = client.open_session(digest, SamplingParams())
    x = compact(rows(2, 1)[0])
    stub = pb_grpc.GuardServiceStub(grpc.insecure_channel(sidecar.target))
    cl = pb.CompactLogits(moments=x.moments.tolist(), top_logits=x.top_logits.tolist(), top_ids=x.top_ids.tolist())
    req = pb.StepBatchRequest(
        steps=[
            pb.StepRequest(session_id=s.session_id, session_secret=b"x" * 32, step=0, compact=cl),
            pb.StepRequest(session_id="bad\nid", step=0, compact=cl),
            pb.StepRequest(session_id=s.session_id, session_secret=s._secret, step=0, compact=cl),
        ]
    )
    resp = stub.StepBatch(req, timeout=5)
    codes = [r.error.code if r.HasField("error") else 0 for r in resp.responses]
    assert codes == [grpc.StatusCode.PERMISSION_DENIED.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "bad" not in resp.responses[1].error.message  # a malformed id is never echoed
    assert resp.responses[2].verdict.session_id == s.session_id


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "signed-each"])
def test_a_sealed_batch_carries_one_signature_and_an_unsealed_one_signs_every_verdict(sidecar, client, sealed) -> None:
    digest = client.register_vocabulary(VOCAB)
    sessions = [client.open_session(digest, SamplingParams()) for _ in range(2)]
    x = compact(rows(6, 1)[0])
    cl = pb.CompactLogits(moments=x.moments.tolist(), top_logits=x.top_logits.tolist(), top_ids=x.top_ids.tolist())
    req = pb.StepBatchRequest(
        steps=[
            pb.StepRequest(session_id=sessions[0].session_id, session_secret=sessions[0]._secret, step=0, compact=cl),
            pb.StepRequest(session_id="nobody", step=0, compact=cl),  # refused: its digest is zeros
            pb.StepRequest(session_id=sessions[1].session_id, session_secret=sessions[1]._secret, step=0, compact=cl),
        ],
        seal=sealed,
    )
    resp = pb_grpc.GuardServiceStub(grpc.insecure_channel(sidecar.target)).StepBatch(req, timeout=5)
    verdicts = [r.verdict for r in resp.responses if r.HasField("verdict")]
    assert len(verdicts) == 2 and resp.responses[1].HasField("error")
    trusted = client.trusted
    if sealed:
        assert all(not v.signature for v in verdicts) and trusted.verify_seal(resp.seal, 3)
        assert resp.seal.digests[32:64] == bytes(32)
        assert [resp.seal.digests[0:32], resp.seal.digests[64:96]] == [
            hashlib.sha256(verdict_bytes(v)).digest() for v in verdicts
        ]
    else:
        assert not resp.HasField("seal") and all(trusted.verify(v) for v in verdicts)


def test_a_batch_over_max_batch_rows_is_refused_whole(sidecar, client) -> None:
    digest = client.register_vocabulary(VOCAB)
    sessions = [client.open_session(digest, SamplingParams()) for _ in range(9)]
    got = client.step_batch([(s, x) for s, x in zip(sessions, rows(3, 9), strict=True)])
    assert all(isinstance(g, StepRefused) and g.code == "RESOURCE_EXHAUSTED" for g in got)
    assert "max_batch_rows (8)" in str(got[0])


def test_a_sidecar_killed_mid_batch_fails_every_row_closed(sidecar, client) -> None:
    digest = client.register_vocabulary(VOCAB)
    sessions = [client.open_session(digest, SamplingParams()) for _ in range(3)]
    assert all(isinstance(v, pb.Verdict) for v in client.step_batch([(s, x) for s, x in zip(sessions, rows(4, 3), strict=True)]))
    sidecar.proc.kill()
    sidecar.proc.wait()
    got = client.step_batch([(s, x) for s, x in zip(sessions, rows(5, 3), strict=True)])
    assert all(isinstance(g, GuardUnavailable) for g in got)
    assert all(s.dead is not None for s in sessions)


def test_bench_batch_times_full_and_compact_rows_at_every_batch_size() -> None:
    from sidecar.bench.batch import bench_batch

    result = bench_batch(rounds=1, batches=(1, 8))
    assert [r["batch"] for r in result["rows"]] == [1, 8]
    assert result["bytes_per_row"] == {"FULL": 4 * 128_256, "COMPACT": 64 + 8 * 64, "descriptor": 48}
    for r in result["rows"]:
        assert r["full_us_per_row_p50"] > 0 and r["compact_us_per_row_p50"] > 0
