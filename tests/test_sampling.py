from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.sampling import (
    CANDIDATE_NATS,
    SamplingParams,
    draw_normal,
    penalized,
    sample_normal,
    sample_strict,
    uniform,
)
from sidecar.errors import ConfigError, RowError


def reference_sample(row: np.ndarray, history: list[int], p: SamplingParams, step: int) -> int:
    """The documented pipeline written the slow, obvious way (full sort of the vocabulary)."""
    y = row.astype(np.float64).copy()
    if p.repetition_penalty != 1.0 and p.repetition_window:
        for t in set(history[-p.repetition_window :]):
            y[t] = y[t] / p.repetition_penalty if y[t] > 0 else y[t] * p.repetition_penalty
    if p.temperature <= 0:
        return int(np.argmax(y.astype(np.float32)))
    y32 = y.astype(np.float32)  # the sampler works on the float32 penalized row
    z = y32.astype(np.float64) / p.temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    keep = [i for i in order if z[i] >= z[order[0]] - CANDIDATE_NATS - 1e-9]
    w0 = math.exp(0.0)
    if p.min_p > 0:
        keep = [i for i in keep if math.exp(z[i] - z[order[0]]) >= p.min_p * w0 - 1e-12]
    if p.top_k:
        keep = keep[: p.top_k]
    w = np.exp(np.array([z[i] for i in keep]) - z[keep[0]])
    cdf = np.cumsum(w)
    if p.top_p < 1.0:
        n = int(np.searchsorted(cdf, p.top_p * cdf[-1], side="left")) + 1
        keep, cdf = keep[:n], cdf[:n]
    u = uniform(p.seed, step) * cdf[-1]
    return keep[min(int(np.searchsorted(cdf, u, side="right")), len(keep) - 1)]


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 5, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    min_p=st.sampled_from([0.0, 0.05, 0.2]),
    repetition_penalty=st.sampled_from([1.0, 1.1, 1.5]),
    repetition_window=st.sampled_from([0, 8, 64]),
    seed=st.integers(0, 2**64 - 1),
)


@settings(max_examples=150, deadline=None)
@given(
    params=params_strategy, step=st.integers(0, 10_000), seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.5, 3.0, 8.0])
)
def test_normal_sampler_matches_the_slow_reference(params: SamplingParams, step: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    row = (rng.standard_normal(300) * scale).astype(np.float32)
    history = rng.integers(0, 300, size=20).tolist()
    assert sample_normal(row, history, params, step) == reference_sample(row, history, params, step)


@settings(max_examples=150, deadline=None)
@given(params=params_strategy, step=st.integers(0, 10_000), seed=st.integers(0, 2**32 - 1))
def test_ties_and_signed_zeros_are_drawn_as_the_slow_reference_orders_them(params: SamplingParams, step: int, seed: int) -> None:
    """Quantised logits tie a lot (a Q4 model's rows): the order is (logit desc, id asc),
    and -0.0 ties with 0.0, whatever sort produced it."""
    rng = np.random.default_rng(seed)
    row = (np.round(rng.standard_normal(300) * 4) / 4).astype(np.float32)  # ~30 distinct values
    row[rng.integers(0, 300, size=20)] = np.float32(-0.0)
    row[rng.integers(0, 300, size=20)] = np.float32(0.0)
    history = rng.integers(0, 300, size=20).tolist()
    assert sample_normal(row, history, params, step) == reference_sample(row, history, params, step)


def reference_tail(row: np.ndarray, p: SamplingParams, token: int) -> float:
    """The sampler's probability of a token no more probable than ``token``, the slow way:
    the reference pipeline's support and weights, summed over its tokens at or below."""
    z = row.astype(np.float64) / p.temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    keep = [i for i in order if z[i] >= z[order[0]] - CANDIDATE_NATS - 1e-9]
    if p.min_p > 0:
        keep = [i for i in keep if math.exp(z[i] - z[order[0]]) >= p.min_p - 1e-12]
    if p.top_k:
        keep = keep[: p.top_k]
    w = np.exp(np.array([z[i] for i in keep]) - z[keep[0]])
    if p.top_p < 1.0:
        n = int(np.searchsorted(np.cumsum(w), p.top_p * w.sum(), side="left")) + 1
        keep, w = keep[:n], w[:n]
    return float(sum(wi for i, wi in zip(keep, w, strict=True) if z[i] <= z[token]) / w.sum())


@settings(max_examples=100, deadline=None)
@given(params=params_strategy, step=st.integers(0, 10_000), seed=st.integers(0, 2**32 - 1))
def test_a_draw_s_tail_is_the_sampler_s_mass_on_tokens_no_more_probable(params: SamplingParams, step: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    row = (rng.standard_normal(300) * 3.0).astype(np.float32)
    row[rng.integers(0, 300, size=5)] = row[0]  # ties: they count as no more probable
    plain = replace(params, repetition_penalty=1.0)  # (the reference has no history here)
    token, tail = draw_normal(row, [], plain, step)
    assert token == sample_normal(row, [], plain, step)
    if plain.greedy:
        assert tail == 1.0  # a greedy draw could not have been anything else
    else:
        assert 0.0 < tail <= 1.0 and tail == pytest.approx(reference_tail(row, plain, token), rel=1e-9, abs=1e-12)


def test_a_cool_sampler_s_far_tail_draw_has_a_small_tail_and_a_hot_one_s_a_large_one() -> None:
    row = np.zeros(1000, np.float32)
    row[0] = 6.0  # the model's choice; 999 tokens at -log p 7.25 share the rest
    cool, hot = SamplingParams(temperature=0.4, seed=3), SamplingParams(temperature=1.5, seed=3)
    tails = {}
    for name, p in (("cool", cool), ("hot", hot)):
        step = next(s for s in range(100_000) if draw_normal(row, [], p, s)[0] != 0)
        tails[name] = draw_normal(row, [], p, step)[1]
    assert tails["cool"] == pytest.approx(999 / (999 + math.exp(6.0 / 0.4)), rel=1e-9)  # ~3e-4
    assert tails["hot"] == pytest.approx(999 / (999 + math.exp(6.0 / 1.5)), rel=1e-9)  # ~0.95


def test_proposal_is_a_pure_function_of_seed_and_step() -> None:
    row = np.random.default_rng(0).standard_normal(49152).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=40, seed=1234)
    first = [sample_normal(row, [], p, s) for s in range(50)]
    again = [sample_normal(row, [], p, s) for s in range(50)]
    assert first == again
    assert len(set(first)) > 5  # it does sample, not argmax
    other_seed = [sample_normal(row, [], SamplingParams(temperature=1.0, top_k=40, seed=99), s) for s in range(50)]
    assert other_seed != first


def test_uniform_is_in_unit_interval_and_spread() -> None:
    u = np.array([uniform(7, s) for s in range(5000)])
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.02


def test_sampling_frequencies_follow_the_distribution() -> None:
    probs = np.array([0.5, 0.3, 0.2])
    row = np.log(probs).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=3)
    counts = np.bincount([sample_normal(row, [], p, s) for s in range(6000)], minlength=3) / 6000
    np.testing.assert_allclose(counts, probs, atol=0.025)


def test_top_k_one_is_greedy_and_min_p_cuts_unlikely_tokens() -> None:
    row = np.array([2.0, 1.0, 0.0, -5.0], np.float32)
    assert {sample_normal(row, [], SamplingParams(temperature=2.0, top_k=1, seed=s), 0) for s in range(50)} == {0}
    picks = {sample_normal(row, [], SamplingParams(temperature=1.0, min_p=0.3, seed=s), s) for s in range(300)}
    assert picks == {0, 1}  # p1/p0 = e^-1 = 0.37 >= 0.3; p2/p0 = e^-2 < 0.3


def test_strict_sampler_is_greedy_under_the_same_repetition_penalty() -> None:
    row = np.array([3.0, 2.9, 1.0], np.float32)
    p = SamplingParams(temperature=1.0, repetition_penalty=1.5)
    assert sample_strict(row, [], p) == 0
    assert sample_strict(row, [0], p) == 1  # 3.0 / 1.5 = 2.0 < 2.9


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    row = np.array([2.0, -2.0, 1.0], np.float32)
    out = penalized(row, [0, 1], 2.0, 64)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0])
    assert penalized(row, [0], 1.0, 64) is row  # no copy when nothing changes
    np.testing.assert_array_equal(row, [2.0, -2.0, 1.0])  # input untouched


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", 1.0),
        ("repetition_penalty", 0.0),
        ("top_k", -1),
        ("seed", -1),
    ],
)
def test_invalid_parameters_are_rejected_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"sampling.{field}"):
        SamplingParams(**{field: value})


@settings(max_examples=25, deadline=None)
@given(
    top_k=st.sampled_from([1, 7, 40, 500]),
    layout=st.sampled_from(["gaussian", "clustered", "ties", "heavy-tail"]),
    seed=st.integers(0, 2**32 - 1),
    step=st.integers(0, 10_000),
)
def test_top_k_window_matches_the_reference_on_model_sized_rows(top_k: int, layout: str, seed: int, step: int) -> None:
    # Rows large enough that the top-k window is placed from a strided sample: the
    # estimate must never change the result, however the high logits are laid out.
    rng = np.random.default_rng(seed)
    n = 49152
    row = rng.standard_normal(n).astype(np.float32) * 3
    if layout == "clustered":  # the best logits all sit in a run the sample strides over
        row[1000:1020] += 12.0
    elif layout == "ties":  # the k-th value is shared by many ids
        row = np.round(row).astype(np.float32)
    elif layout == "heavy-tail":
        row = (rng.standard_cauchy(n) * 2).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=0.95, repetition_penalty=1.1, seed=seed)
    history = rng.integers(0, n, size=30).tolist()
    assert sample_normal(row, history, params, step) == reference_sample(row, history, params, step)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("sampler", ["normal", "strict"])
def test_samplers_refuse_rows_holding_nan_or_plus_inf(bad: float, sampler: str) -> None:
    # The guard aborts such rows before sampling; a direct caller gets a clear error, not
    # an arbitrary token or an IndexError.
    row = np.zeros(100, np.float32)
    row[37] = bad
    with pytest.raises(RowError, match="NaN or \\+Inf"):
        if sampler == "normal":
            sample_normal(row, [], SamplingParams(temperature=1.0, top_k=5), 0)
        else:
            sample_strict(row, [], SamplingParams())


def test_minus_inf_logits_are_masked_tokens_not_errors() -> None:
    row = np.full(100, -np.inf, np.float32)
    row[[3, 9]] = [1.0, 0.5]
    assert sample_strict(row, [], SamplingParams()) == 3
    assert {sample_normal(row, [], SamplingParams(temperature=1.0, seed=s), 0) for s in range(40)} <= {3, 9}
