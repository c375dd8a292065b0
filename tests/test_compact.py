"""COMPACT rows (top-k + moments) give the FULL row's decisions wherever they cover the
sampler's support, and are refused, never guessed, where they do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import Guard, GuardSet, Policy, Rule
from sidecar.core.compact import CompactRow, compact_from_logits, moments_and_top
from sidecar.core.guards import Action
from sidecar.core.metrics import candidate, row_stats
from sidecar.core.policy import compile_policy
from sidecar.core.redo import Decision
from sidecar.core.sampling import SamplingParams, entries_needed, prepared, sample_normal, sample_strict
from sidecar.core.session import Session
from sidecar.errors import CoverageError, RowError

V = 600
VOCAB = [f"t{i}".encode() for i in range(V)]


def model_like(rng: np.random.Generator, v: int = V) -> np.ndarray:
    """Logits shaped like a model's: a broad mass far below a few peaks."""
    x = rng.normal(-4.0, 2.0, v).astype(np.float32)
    peaks = rng.choice(v, 8, replace=False)
    x[peaks] += rng.uniform(4.0, 12.0, 8).astype(np.float32)
    return x


def test_stats_from_the_moments_match_the_full_row() -> None:
    x = model_like(np.random.default_rng(1))
    full, c = row_stats(x), compact_from_logits(x, 16).stats()
    assert c.finite and c.top1 == full.top1 and c.top1_logit == full.top1_logit
    for f in ("lse", "entropy", "varentropy", "max_prob", "variance", "l2_norm"):
        assert getattr(c, f) == pytest.approx(getattr(full, f), rel=1e-4, abs=1e-5), f


def test_candidate_metrics_of_every_shipped_token_match_the_full_row() -> None:
    x = model_like(np.random.default_rng(2))
    c = compact_from_logits(x, 32)
    sf, sc = row_stats(x), c.stats()
    for token in c.ids.tolist():
        a, b = candidate(x, sf, token), c.candidate(sc, token)
        assert b.rank == a.rank
        assert b.neg_logprob == pytest.approx(a.neg_logprob, abs=1e-4)
        assert b.margin == pytest.approx(a.margin, abs=1e-5)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    temperature=st.sampled_from([0.0, 0.3, 0.8, 1.5]),
    top_k=st.integers(1, 40),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    min_p=st.sampled_from([0.0, 0.05]),
    penalty=st.sampled_from([1.0, 1.3]),
    step=st.integers(0, 10_000),
)
def test_samplers_draw_the_same_token_from_a_compact_row_that_covers_their_support(
    seed: int, temperature: float, top_k: int, top_p: float, min_p: float, penalty: float, step: int
) -> None:
    rng = np.random.default_rng(seed)
    x = model_like(rng)
    params = SamplingParams(temperature, top_k, top_p, min_p, penalty, 16, seed)
    history = rng.integers(0, V, 24).tolist()
    c = compact_from_logits(x, entries_needed(params, history))
    assert sample_normal(c, history, params, step) == sample_normal(x, history, params, step)
    assert sample_strict(c, history, params) == sample_strict(x, history, params)


def test_no_k_short_of_the_vocabulary_is_asked_for_a_temperature_without_top_k_or_a_boosting_penalty() -> None:
    assert entries_needed(SamplingParams(temperature=0.7), []) == 0
    assert entries_needed(SamplingParams(repetition_penalty=0.9), [1]) == 0
    assert entries_needed(SamplingParams(), [5, 5, 6]) == 3  # greedy, no penalty
    assert (
        entries_needed(SamplingParams(temperature=0.7, top_k=40, repetition_penalty=1.1, repetition_window=4), [1, 2, 2, 3, 4])
        == 45
    )


def test_a_sampler_whose_support_is_wider_than_the_shipped_entries_is_refused() -> None:
    x = model_like(np.random.default_rng(3))
    c = compact_from_logits(x, 4)
    with pytest.raises(CoverageError, match="send this row FULL"):
        sample_normal(c, [], SamplingParams(temperature=1.0, top_k=50), 0)
    with pytest.raises(CoverageError, match="normal sampler"):
        sample_normal(c, [], SamplingParams(temperature=1.0), 0)  # no top-k: up to 30 nats below the best


def test_greedy_on_a_row_whose_shipped_entries_were_all_penalised_below_the_floor_is_refused() -> None:
    x = np.zeros(V, np.float32)
    x[:3] = [9.0, 8.9, 8.8]
    x[3] = 8.0  # the best token once the first three are penalised, but not shipped
    c = compact_from_logits(x, 3)
    params = SamplingParams(repetition_penalty=2.0)
    assert sample_strict(x, [0, 1, 2], params) == 3
    with pytest.raises(CoverageError):
        sample_strict(c, [0, 1, 2], params)


def test_a_penalty_below_one_raises_the_bound_on_repeated_tokens_that_were_not_shipped() -> None:
    x = np.full(V, -1.0, np.float32)
    x[:3] = [5.0, 4.0, 3.0]
    x[10] = 2.9
    c = compact_from_logits(x, 3)  # floor 3.0; token 10 (2.9) boosted by 1/0.5 -> 5.8 wins
    params = SamplingParams(repetition_penalty=0.5)
    assert sample_strict(x, [10], params) == 10
    with pytest.raises(CoverageError):
        sample_strict(c, [10], params)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m, v, i: (m, v[::-1].copy(), i[::-1].copy()), "highest first"),
        (lambda m, v, i: (m, v, np.where(i == i[1], i[0], i)), "distinct"),
        (lambda m, v, i: (m, v, np.where(i == i[0], V, i)), r"token ids must be in \[0, 600\)"),
        (lambda m, v, i: (np.where(np.arange(8) == 0, m[6] - 1.0, m), v, i), "log_sum_exp .* impossible"),
        (lambda m, v, i: (np.where(np.arange(8) == 6, m[6] + 5.0, m), v, i), "disagree"),
        (lambda m, v, i: (m, v[:1], i[:1]), "k >= 2"),
        (lambda m, v, i: (m[:5], v, i), "7 moments"),
    ],
)
def test_a_compact_row_that_cannot_be_true_is_refused_naming_what_is_wrong(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    m, v, i = moments_and_top(model_like(np.random.default_rng(4)), 8)
    with pytest.raises(RowError, match=message):
        CompactRow.from_top(V, *mutate(m, v, i))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_compact_row_aborts_like_a_full_one(bad: float) -> None:
    m, v, i = moments_and_top(model_like(np.random.default_rng(5)), 8)
    v = v.copy()
    v[3] = bad if bad != math.inf else v[3]
    m = m.copy()
    if bad == math.inf:
        m[0] = math.inf
    s = Session("s", 1, SamplingParams(), compile_policy("p", Policy()), VOCAB)
    out = s.judge(CompactRow.from_top(V, m, v, i), 0)
    assert out.decision == Decision.ABORT and out.reasons[0].code == "non_finite"


def _sessions(params: SamplingParams, policy: Policy) -> tuple[Session, Session]:
    pol = compile_policy("p", policy)
    return Session("full", 1, params, pol, VOCAB), Session("compact", 2, params, pol, VOCAB)


GUARDED = Policy(
    guards=GuardSet(
        running_ppl=Guard(enabled=True, threshold=60.0),
        logit_variance=Guard(enabled=False, threshold=0.1),
        l2_norm=Guard(enabled=True, threshold=400.0),
        neg_logprob=Guard(enabled=True, threshold=2.5),
    ),
    # a block rule on a token that is often drawn: the redo masks it and draws again
    rules=[Rule(id="no-t7", kind="literal", patterns=["t7"], action="block")],
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), temperature=st.sampled_from([0.0, 0.7, 1.4]), top_k=st.integers(1, 12))
def test_a_guarded_session_on_compact_rows_makes_the_full_sessions_decisions_step_for_step(
    seed: int, temperature: float, top_k: int
) -> None:
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=temperature, top_k=top_k, repetition_penalty=1.2, repetition_window=8, seed=seed)
    full, comp = _sessions(params, GUARDED)
    for step in range(12):
        x = model_like(rng)
        x[7] += 6.0  # make the blocked token likely
        a = full.judge(x, step)
        # k: the sampler's top-k, the tokens the penalty or the rule can remove, and one more
        row = compact_from_logits(x, top_k + 8 + 4)
        b = comp.judge(row, step)
        assert (b.decision, b.token, b.sampler) == (a.decision, a.token, a.sampler)
        assert [(r.code, r.action, r.token_id) for r in b.reasons] == [(r.code, r.action, r.token_id) for r in a.reasons]
        # Judged under the penalised row: a repeated token that was not shipped keeps its
        # unpenalised mass, so COMPACT -log p is the FULL one or above it by at most that
        # mass's share of the FULL row the draw ran on (and rounding: the COMPACT row's
        # statistics are the engine's float32 sums)
        banned = [r.token_id for r in a.reasons if r.action == Action.BLOCK]
        y, _ = prepared(x, full.history, params, banned)
        unshipped = sorted(set(full.history[-params.repetition_window :]) - set(row.ids.tolist()))
        share = float(np.exp(x[unshipped].astype(np.float64) - np.logaddexp.reduce(y.astype(np.float64))).sum())
        assert a.metrics.neg_logprob - 1e-5 <= b.metrics.neg_logprob <= a.metrics.neg_logprob + math.log1p(share) + 1e-4
        assert b.metrics.rank == a.metrics.rank
        full.commit(step, a)
        comp.commit(step, b)
        if a.decision == Decision.ABORT:
            break
