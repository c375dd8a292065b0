from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sidecar.core.metrics import candidate, candidate_metrics, distribution_stats, row_stats, running_perplexity
from sidecar.errors import RowError


def reference(x32: np.ndarray, token: int) -> dict[str, float]:
    """Straightforward float64 definitions, nothing clever."""
    x = x32.astype(np.float64)
    lse = np.log(np.sum(np.exp(x - x.max()))) + x.max()
    logp = x - lse
    p = np.exp(logp)
    order = np.sort(p)[::-1]
    others = np.delete(p, token)
    return {
        "entropy": float(-np.sum(p * logp)),
        "varentropy": float(np.sum(p * logp**2) - np.sum(p * logp) ** 2),
        "max_prob": float(order[0]),
        "variance": float(np.var(x)),
        "l2_norm": float(np.linalg.norm(x)),
        "neg_logprob": float(-logp[token]),
        "selected_prob": float(p[token]),
        "rank": int(np.sum(x > x[token])),
        "margin": float(p[token] - others.max()),
        "top1_top2": float(order[0] - order[1]),
    }


def assert_matches(x: np.ndarray, token: int) -> None:
    ref = reference(x, token)
    s = row_stats(x)
    c = candidate(x, s, token)
    assert s.finite
    # float32 inputs, float32 BLAS accumulation: relative 1e-4 plus a small absolute term
    # for quantities that are legitimately ~0 (entropy of a one-hot row).
    tol = {"rel": 1e-4, "abs": 1e-5}
    assert s.entropy == pytest.approx(ref["entropy"], **tol)
    assert s.max_prob == pytest.approx(ref["max_prob"], **tol)
    assert s.variance == pytest.approx(ref["variance"], rel=1e-4, abs=1e-4 * max(1.0, ref["variance"]))
    assert s.l2_norm == pytest.approx(ref["l2_norm"], rel=1e-4)
    assert s.varentropy == pytest.approx(ref["varentropy"], rel=1e-3, abs=1e-4 * max(1.0, ref["entropy"] ** 2))
    assert c.neg_logprob == pytest.approx(ref["neg_logprob"], rel=1e-4, abs=1e-4)
    assert c.selected_prob == pytest.approx(ref["selected_prob"], **tol)
    assert c.rank == ref["rank"]
    assert c.margin == pytest.approx(ref["margin"], **tol)
    if token == s.top1:
        assert c.margin == pytest.approx(ref["top1_top2"], **tol)


finite_f32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(x=arrays(np.float32, st.integers(2, 3000), elements=finite_f32), data=st.data())
def test_metrics_match_float64_reference_on_random_rows(x: np.ndarray, data: st.DataObject) -> None:
    token = data.draw(st.integers(0, x.shape[0] - 1))
    assert_matches(x, token)


@settings(max_examples=50, deadline=None)
@given(scale=st.floats(0.1, 30.0), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_metrics_match_reference_on_model_sized_rows(scale: float, seed: int, data: st.DataObject) -> None:
    x = (np.random.default_rng(seed).standard_normal(49152) * scale).astype(np.float32)
    assert_matches(x, data.draw(st.integers(0, 49151)))


@pytest.mark.parametrize(
    "x",
    [
        np.full(1000, 5.0, np.float32),  # all equal
        np.full(1000, -1e4, np.float32),
        np.where(np.arange(1000) == 7, 1e4, -1e4).astype(np.float32),  # one-hot, extreme
        np.where(np.arange(1000) % 2 == 0, 1e4, -1e4).astype(np.float32),
        np.array([1e4, -1e4], np.float32),
        np.linspace(-1e4, 1e4, 5000, dtype=np.float32),
    ],
    ids=["all-equal", "all-minus-1e4", "one-hot-1e4", "half-half-1e4", "two-extremes", "linspace-1e4"],
)
def test_metrics_hold_on_extreme_rows(x: np.ndarray) -> None:
    for token in (0, 1, x.shape[0] - 1, int(np.argmax(x))):
        assert_matches(x, token)


@pytest.mark.parametrize("offset, spread", [(0.0, 3.0), (-12.0, 4.0), (1e3, 0.01), (-3e3, 1.0)])
def test_variance_stays_exact_when_logits_sit_far_from_zero(offset: float, spread: float) -> None:
    # E[x^2] - E[x]^2 cancels when |mean| >> std; the metric must switch to the
    # variance about the mean rather than lose digits.
    x = (offset + np.random.default_rng(3).standard_normal(131072) * spread).astype(np.float32)
    assert row_stats(x).variance == pytest.approx(float(np.var(x.astype(np.float64))), rel=1e-4)


def test_all_equal_row_has_uniform_entropy_and_zero_variance() -> None:
    s = row_stats(np.full(49152, 3.0, np.float32))
    assert s.entropy == pytest.approx(math.log(49152), rel=1e-6)
    assert s.variance == 0.0
    assert s.max_prob == pytest.approx(1 / 49152)


def test_one_hot_row_has_zero_entropy_and_certain_top_token() -> None:
    x = np.full(49152, -1e4, np.float32)
    x[123] = 1e4
    s = row_stats(x)
    assert s.top1 == 123 and s.entropy == pytest.approx(0.0, abs=1e-12) and s.max_prob == 1.0
    c = candidate(x, s, 123)
    assert c.rank == 0 and c.neg_logprob == pytest.approx(0.0, abs=1e-12) and c.margin == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 500, 999])
def test_non_finite_row_is_flagged_not_raised(bad: float, where: int) -> None:
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    x[where] = bad
    s = row_stats(x)
    assert not s.finite
    assert math.isnan(s.entropy) and math.isnan(s.l2_norm)
    c = candidate(x, s, 3)
    assert c.rank == -1 and math.isnan(c.neg_logprob)


def test_huge_finite_row_overflowing_float32_sums_is_still_finite() -> None:
    x = np.full(49152, 3e38, np.float32)
    x[0] = -3e38
    s = row_stats(x)
    assert s.finite
    assert s.l2_norm == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-6)


def test_batch_functions_agree_with_single_rows() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 4096)) * 4).astype(np.float32)
    x[3, 10] = np.nan
    tokens = np.array([0, 5, 9, 1, 4095])
    stats = distribution_stats(x)
    cand = candidate_metrics(x, stats, tokens)
    for r in range(5):
        single = row_stats(x[r])
        assert stats.finite[r] == single.finite
        if single.finite:
            assert stats.entropy[r] == single.entropy
            assert cand.neg_logprob[r] == candidate(x[r], single, int(tokens[r])).neg_logprob
    assert not stats.finite[3] and cand.rank[3] == -1


def test_float16_rows_are_widened() -> None:
    x = np.random.default_rng(2).standard_normal(512).astype(np.float16)
    assert row_stats(x).entropy == pytest.approx(row_stats(x.astype(np.float32)).entropy)


@pytest.mark.parametrize(
    "bad, message",
    [(np.zeros((2, 3), np.float32), "shape"), (np.zeros(1, np.float32), "vocab >= 2"), (np.zeros(5, np.int32), "floating")],
)
def test_malformed_rows_raise_row_error_naming_the_problem(bad: np.ndarray, message: str) -> None:
    with pytest.raises(RowError, match=message):
        row_stats(bad)


def test_candidate_rejects_out_of_range_token() -> None:
    x = np.zeros(10, np.float32)
    with pytest.raises(RowError, match="out of range"):
        candidate(x, row_stats(x), 10)


def test_running_perplexity_is_exp_of_mean_surprise() -> None:
    assert running_perplexity(0.0, 0) == 1.0
    assert running_perplexity(2 * math.log(400), 2) == pytest.approx(400)
    assert math.isfinite(running_perplexity(1e9, 1))
