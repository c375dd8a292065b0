"""The vectorised first proposal of a COMPACT batch is the single-row path's, bit for bit:
the same validation (rows refused with the same errors), the same statistics, the same
drawn token and metrics, the same ACCEPT; and it leaves to the single-row path every row
it does not cover."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.config import Policy, SidecarConfig
from sidecar.core.batch_draw import first_draws
from sidecar.core.compact import CompactBatch, CompactRow, moments_and_top
from sidecar.core.policy import compile_policy
from sidecar.core.sampling import SamplingParams, sample_normal
from sidecar.core.session import Session
from sidecar.errors import CoverageError, FseError, RowError
from sidecar.ring import RingWriter
from sidecar.service import GuardService
from sidecar.signing import Ed25519Signer
from sidecar.wire import params_to_pb

V = 700
VOCAB = [f"t{i}".encode() for i in range(V)]


def _rows(rng: np.random.Generator, n: int, k: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n rows as an engine ships them: (n, 8) moments, (n, k) logits highest first, (n, k) ids."""
    ms, vs, ids = [], [], []
    for _ in range(n):
        x = rng.normal(-4.0, 2.0, V).astype(np.float32)
        peaks = rng.choice(V, 8, replace=False)
        x[peaks] += rng.uniform(2.0, 12.0, 8).astype(np.float32)
        if ties:  # coarse logits: many equal values, at the top and at the cut
            x = np.round(x * 2.0).astype(np.float32) / 2.0
        m, v, i = moments_and_top(x, k)
        if ties:  # an engine's top-k promises no order among equal logits: ship them shuffled
            shuffled = np.lexsort((rng.random(k), -v))
            v, i = v[shuffled], i[shuffled]
        ms.append(m)
        vs.append(v)
        ids.append(i)
    return np.stack(ms), np.stack(vs), np.stack(ids)


# test_sampling's strategy, weighted toward what the vectorised draw covers (greedy, no
# penalty) and with a top-k above the 64 entries shipped (an uncovered draw).
params_st = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.0, 0.4, 0.8, 1.5]),
    top_k=st.sampled_from([0, 1, 5, 40, 80]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    min_p=st.sampled_from([0.0, 0.0, 0.05]),
    repetition_penalty=st.sampled_from([1.0, 1.0, 1.3]),
    seed=st.integers(0, 2**64 - 1),
)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    k=st.sampled_from([2, 9, 64]),
    ties=st.booleans(),
    params=st.lists(params_st, min_size=12, max_size=12),
    step=st.integers(0, 10_000),
    history=st.lists(st.integers(0, V - 1), max_size=5),
)
def test_first_draws_equal_the_single_row_sampler_and_metrics_bit_for_bit(
    seed: int, n: int, k: int, ties: bool, params: list[SamplingParams], step: int, history: list[int]
) -> None:
    m, v, ids = _rows(np.random.default_rng(seed), n, k, ties)
    batch = CompactBatch.from_top(V, m, v, ids)
    ps, steps, hists = params[:n], [step + j for j in range(n)], [history] * n
    draws = first_draws(batch, list(range(n)), ps, steps, hists)
    for j, d in enumerate(draws):
        row = CompactRow.from_top(V, m[j], v[j], ids[j])
        p = ps[j]
        try:
            token = sample_normal(row, hists[j], p, steps[j])
        except CoverageError:
            assert d is None, "a draw the shipped entries do not cover must go to the single-row path"
            continue
        penalised = p.repetition_penalty != 1.0 and p.repetition_window > 0 and bool(hists[j])
        if penalised:
            assert d is None
            continue
        assert d is not None
        st_ = row.stats()
        assert d.stats == st_
        assert d.candidate == row.candidate(st_, token)


def test_tied_logits_shipped_in_any_order_are_drawn_by_the_tie_rule() -> None:
    """The batch keeps the engine's highest-first order instead of sorting again, except
    where logits tie: there the lowest id comes first, whatever order they were shipped in."""
    rng = np.random.default_rng(3)
    x = rng.normal(-4.0, 1.0, V).astype(np.float32)
    x[[40, 7, 300]] = 9.0  # a three-way tie at the top
    m, v, ids = moments_and_top(x, 8)
    assert ids[:3].tolist() == [7, 40, 300]
    v, ids = v[[2, 1, 0, *range(3, 8)]], ids[[2, 1, 0, *range(3, 8)]]  # shipped highest id first
    rows = 4
    batch = CompactBatch.from_top(V, np.stack([m] * rows), np.stack([v] * rows), np.stack([ids] * rows))
    greedy = SamplingParams(temperature=0.0)
    draws = first_draws(batch, list(range(rows)), [greedy] * rows, list(range(rows)), [[]] * rows)
    assert [d.candidate.token if d else None for d in draws] == [7] * rows
    assert all(d is not None and d.candidate.rank == 0 for d in draws)
    row = CompactRow.from_top(V, m, v, ids)
    assert sample_normal(row, [], greedy, 0) == 7  # the single row's own rule


def test_first_draws_cover_a_healthy_batch_greedy_and_top_k() -> None:
    """Not vacuous: on model-like rows with k = 64 every greedy and top-k 40 row is drawn."""
    m, v, ids = _rows(np.random.default_rng(5), 16, 64, False)
    batch = CompactBatch.from_top(V, m, v, ids)
    ps = [SamplingParams() if j % 2 else SamplingParams(temperature=0.8, top_k=40, seed=j) for j in range(16)]
    draws = first_draws(batch, list(range(16)), ps, [3] * 16, [[]] * 16)
    assert all(d is not None for d in draws)


def test_non_finite_rows_and_refused_rows_are_left_to_the_single_row_path() -> None:
    m, v, ids = _rows(np.random.default_rng(6), 3, 16, False)
    v[1, 4] = np.nan
    ids[2, 3] = ids[2, 2]  # a repeated id: refused
    batch = CompactBatch.from_top(V, m, v, ids)
    assert batch.errors[0] is None and batch.errors[1] is None and not batch.finite[1]
    assert isinstance(batch.errors[2], RowError) and "distinct" in str(batch.errors[2])
    draws = first_draws(batch, [0, 1, 2], [SamplingParams()] * 3, [0] * 3, [[]] * 3)
    assert draws[0] is not None and draws[1] is None and draws[2] is None
    with pytest.raises(RowError, match="distinct"):
        batch.row(2)


def _corrupt(rng: np.random.Generator, m: np.ndarray, v: np.ndarray, ids: np.ndarray, how: int) -> None:
    j = int(rng.integers(0, v.shape[0]))
    if how == 0:
        ids[j, -1] = V + int(rng.integers(0, 5))  # outside the vocabulary
    elif how == 1:
        ids[j, 1] = ids[j, 0]  # repeated
    elif how == 2:
        v[j, [0, -1]] = v[j, [-1, 0]]  # not highest first
    elif how == 3:
        m[j, 6] += 1.0  # max disagrees with the top entry
    elif how == 4:
        m[j, 0] -= 5.0  # log-sum-exp below what the shipped entries alone give
    elif how == 5:
        m[j, 0] = m[j, 6] + math.log(V) + 1.0  # more mass than the vocabulary can hold
    elif how == 6:
        m[j, int(rng.choice([1, 2, 4]))] = -1.0  # negative entropy, varentropy or variance
    elif how == 7:
        m[j, 5] = -1e-9  # negative L2 norm
    elif how == 8:
        m[j, 0] -= 1e-3 * float(rng.uniform(0.5, 1.5))  # at the tolerance: either side
    elif how == 9:
        v[j, -1] = np.inf  # non-finite: accepted, judged as such


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 10),
    k=st.sampled_from([2, 7, 32]),
    hows=st.lists(st.integers(0, 9), max_size=4),
)
def test_batch_validation_refuses_exactly_the_rows_the_single_row_check_refuses_with_its_error(
    seed: int, n: int, k: int, hows: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    m, v, ids = _rows(rng, n, k, False)
    ids = ids.astype(np.int64)
    for how in hows:
        _corrupt(rng, m, v, ids, how)
    batch = CompactBatch.from_top(V, m, v, ids)
    for j in range(n):
        try:
            single = CompactRow.from_top(V, m[j], v[j], ids[j])
        except RowError as exc:
            assert str(batch.errors[j]) == str(exc)
            continue
        assert batch.errors[j] is None
        row = batch.row(j)
        assert row.vocab_size == single.vocab_size and row.moments == single.moments
        assert np.array_equal(row.ids, single.ids) and np.array_equal(row.logits, single.logits, equal_nan=True)
        assert row.floor == single.floor or (math.isnan(row.floor) and math.isnan(single.floor))
        assert bool(batch.finite[j]) == single.stats().finite


def test_a_batch_with_no_rows_or_a_k_below_two_is_refused_whole() -> None:
    with pytest.raises(RowError, match="at least one row"):
        CompactBatch.from_top(V, np.zeros((0, 8)), np.zeros((0, 4), np.float32), np.zeros((0, 4), np.uint32))
    with pytest.raises(RowError, match="k >= 2"):
        CompactBatch.from_top(V, np.zeros((2, 8)), np.zeros((2, 1), np.float32), np.zeros((2, 1), np.uint32))


def _judged_both_ways(seed: int, params: SamplingParams, steps: int) -> int:
    """Two sessions of the default policy (gate, drift test, loop guard) fed the same rows:
    one judges every row, the other takes the batch's draw where it is accepted as it is.
    Every outcome must be equal, and so every chain hash. Returns how many were accepted."""
    pol = compile_policy("default", Policy())
    a, b = Session("a", 1, params, pol, VOCAB), Session("a", 1, params, pol, VOCAB)
    rng = np.random.default_rng(seed)
    accepted = 0
    for step in range(steps):
        m, v, ids = _rows(rng, 1, 64, step % 3 == 0)
        batch = CompactBatch.from_top(V, m, v, ids)
        row = batch.row(0)
        try:
            want = a.judge(row, step)
        except CoverageError:
            break
        (d,) = first_draws(batch, [0], [b.params], [step], [b.history])
        got = b.accept_drawn(d, step) if d is not None else None
        if got is not None:
            accepted += 1
            assert got == want
        else:
            got = b.judge(row, step)
        a.commit(step, want)
        b.commit(step, got)
        assert a.chain_hash == b.chain_hash
        if a.aborted:
            break
    return accepted


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), params=params_st, steps=st.integers(1, 30))
def test_a_session_accepting_drawn_proposals_makes_the_same_outcomes_as_judging_each_row(
    seed: int, params: SamplingParams, steps: int
) -> None:
    _judged_both_ways(seed, params, steps)


def test_drawn_proposals_are_accepted_as_they_are_on_most_steps_of_a_healthy_session() -> None:
    """Not vacuous: the equality above holds on accepted draws, greedy and top-k."""
    assert _judged_both_ways(11, SamplingParams(), 30) >= 20
    assert _judged_both_ways(12, SamplingParams(temperature=0.7, top_k=20, seed=3), 30) >= 15


def _req(s: Session, step: int, row: int, seq: int) -> pb.StepRequest:
    ref = pb.RingRef(slot=0, row=row, seq=seq)
    return pb.StepRequest(session_id=s.session_id, session_secret=s.secret, step=step, ring=ref)


def test_a_service_judging_a_compact_frame_signs_the_verdicts_of_single_steps_byte_for_byte() -> None:
    """Through the service and a real ring: a frame of COMPACT rows judged as a batch (the
    vectorised draw) and the same rows stepped one by one in a twin service give the same
    signed verdicts, byte for byte, heals and aborts included."""
    key = Ed25519PrivateKey.generate()
    twins = [GuardService(SidecarConfig(), Ed25519Signer(key), nonces=lambda: bytes(16)) for _ in range(2)]
    n, rng = 12, np.random.default_rng(21)
    params = [SamplingParams() if j % 3 == 0 else SamplingParams(temperature=0.9, top_k=30, top_p=0.9, seed=j) for j in range(n)]
    with RingWriter.create(slots=1, rows=n, vocab_size=V, topk=64) as ring:
        opened = []
        for svc in twins:
            digest = svc.register_vocabulary(VOCAB).digest
            reqs = [
                pb.OpenSessionRequest(session_id=f"s{j}", vocab_digest=digest, sampling=params_to_pb(p), ring_name=ring.name)
                for j, p in enumerate(params)
            ]
            opened.append([svc.open_session(r) for r in reqs])
        decisions = set()
        for step in range(12):
            m, v, ids = _rows(rng, n, 64, step % 4 == 0)
            if step == 5:
                m[3, 0] = np.nan  # one row that cannot be judged: that session aborts
            live = [j for j in range(n) if not opened[0][j].aborted]
            with ring.frame(0) as f:
                for j in live:
                    f.write_compact(opened[0][j].tag, step, m[j], v[j], ids[j])
            batched = twins[0].step_batch([_req(opened[0][j], step, r, f.seq) for r, j in enumerate(live)])
            for r, j in enumerate(live):
                s = opened[1][j]
                with ring.frame(0) as g:
                    g.write_compact(s.tag, step, m[j], v[j], ids[j])
                single = twins[1].step(_req(s, step, 0, g.seq))
                judged = batched[r]
                assert not isinstance(judged, FseError)
                got = pb.Verdict(**judged.fields)
                assert got.SerializeToString(deterministic=True) == single.SerializeToString(deterministic=True)
                decisions.add(got.decision)
    assert {pb.DECISION_ACCEPT, pb.DECISION_ABORT} <= decisions
