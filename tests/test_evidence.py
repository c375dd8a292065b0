"""The drift test (sidecar.core.evidence): false alarms bounded by alpha, drift caught.

Simulated streams: each step has its own next-token distribution p_t (softmax of random
logits with a random sharpness, 64 tokens), known before the draw as in the sidecar. A
null stream draws from p_t itself, or more sharply (temperature 0.7, top-k 5): H0 holds.
A shifted stream draws at temperature 1.5 or 3: H0 fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sidecar.config import DriftConfig
from sidecar.core.evaluators import Proposal
from sidecar.core.evidence import DriftTest, log_e_value, log_factors
from sidecar.core.guards import Sampler, TokenMetrics

V, STEPS = 64, 400


def simulate(n: int, draw_temperature: float, cfg: DriftConfig, seed: int, top_k: int = 0) -> np.ndarray:
    """Step at which each stream first crosses 1/alpha (STEPS when it never does)."""
    rng = np.random.default_rng(seed)
    log_w = np.zeros((n, len(cfg.bets)))
    crossed = np.full(n, STEPS)
    threshold = math.log(1 / cfg.alpha)
    for t in range(STEPS):
        logits = rng.standard_normal((n, V)) * rng.uniform(0.5, 4.0, (n, 1))  # sharp and flat steps alike
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        p = np.exp(logp)
        entropy = -(p * logp).sum(axis=1)
        q = np.exp(logp / draw_temperature)
        if top_k:
            kth = np.sort(q, axis=1)[:, -top_k][:, None]
            q = np.where(q >= kth, q, 0.0)
        q /= q.sum(axis=1, keepdims=True)
        x = (q.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(max=V - 1)
        surprisal = -logp[np.arange(n), x]
        log_w += log_factors(surprisal, entropy, cfg)
        hit = (log_e_value(log_w) >= threshold) & (crossed == STEPS)
        crossed[hit] = t
    return crossed


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.0, 5)], ids=["model-itself", "temperature-0.7", "top-k-5"])
def test_healthy_streams_are_halted_at_a_rate_at_most_alpha(temperature: float, top_k: int) -> None:
    cfg = DriftConfig(alpha=0.05, margin_nats=0.0)  # no margin: the bare guarantee
    crossed = simulate(4000, temperature, cfg, seed=7, top_k=top_k)
    rate = float((crossed < STEPS).mean())
    # Ville: at most alpha; binomial sd at 4000 streams is ~0.0034
    assert rate <= cfg.alpha + 0.01, rate


@pytest.mark.parametrize(
    "temperature, margin, excess",
    [(1.5, 0.0, 0.76), (2.0, 0.5, 1.38), (3.0, 0.5, 2.15)],
    ids=["t1.5-no-margin", "t2.0-default", "t3.0-default"],
)
def test_shifted_streams_are_halted_and_the_delay_is_reported(temperature, margin, excess, capsys) -> None:
    """``excess``: the mean -log p - H of such draws in this simulation (64 tokens; the real
    model's 49k-token tail gives +3.2 nats at temperature 1.5: bench quality)."""
    cfg = DriftConfig(margin_nats=margin)
    crossed = simulate(2000, temperature, cfg, seed=11)
    halted = crossed < STEPS
    delay = float(np.median(crossed[halted]))
    with capsys.disabled():
        print(
            f"\ndrift test, draws at temperature {temperature} (excess ~{excess} nats/token, margin {margin}): "
            f"{halted.mean():.1%} halted within {STEPS} steps, median delay {delay:.0f} steps"
        )
    assert halted.mean() >= 0.99
    assert delay < 60


def test_with_on_drift_halt_the_first_proposal_of_each_step_decides_and_a_crossing_is_permanent() -> None:
    cfg = DriftConfig(alpha=0.01, margin_nats=0.5, on_drift="halt")
    d = DriftTest(cfg)
    surprising = TokenMetrics(0, 1.0, 12.0, 500, 0.0, 1e-5, 0.5, 1.0, 1.0, 0.0, 1.0)
    healed = TokenMetrics(1, 1.0, 0.1, 0, 0.5, 0.9, 0.9, 1.0, 1.0, 0.0, 1.0)
    expected = np.zeros(len(cfg.bets))
    for step in range(40):
        first = Proposal(0, Sampler.NORMAL, surprising, step, step, attempt=0)
        trips = d.check(first)
        redo = Proposal(1, Sampler.STRICT, healed, step, step, attempt=1)
        # the same step: judged on its first proposal, whichever proposal asks
        assert [(t.code, t.value) for t in d.check(redo)] == [(t.code, t.value) for t in trips]
        if trips:
            break
        d.commit(redo)  # the healed token is committed; the evidence counts the sampler's
        expected += log_factors(12.0, 1.0, cfg)  # the vectorised form agrees with the step path
        assert d.log_wealths == pytest.approx(expected, rel=1e-12)
    else:
        pytest.fail("a stream of 12-nat surprises over 1-nat entropy was never halted")
    [trip] = trips
    assert trip.code == "drift" and trip.action.name == "HALT" and trip.value >= 1 / cfg.alpha
    d.commit(Proposal(0, Sampler.NORMAL, surprising, step, step))
    assert d.crossed
    calm = Proposal(1, Sampler.NORMAL, healed, step + 1, step + 1)
    assert d.check(calm)  # permanent: later evidence cannot undo a crossing


def test_greedy_decoding_never_builds_evidence() -> None:
    d = DriftTest(DriftConfig(margin_nats=0.0))
    rng = np.random.default_rng(3)
    for step in range(500):
        logits = rng.standard_normal(V) * 2
        logp = logits - np.logaddexp.reduce(logits)
        entropy = float(-(np.exp(logp) * logp).sum())
        m = TokenMetrics(0, entropy, float(-logp.max()), 0, 0.1, 0.5, 0.5, 1.0, 1.0, 0.0, 1.0)
        p = Proposal(0, Sampler.NORMAL, m, step, step)
        assert not d.check(p)
        d.commit(p)
    assert d.e_value <= 1.0


SURPRISING = TokenMetrics(0, 1.0, 12.0, 500, 0.0, 1e-5, 0.5, 1.0, 1.0, 0.0, 1.0)  # the sampler's garbage
CALM = TokenMetrics(1, 1.0, 0.1, 0, 0.5, 0.9, 0.9, 1.0, 1.0, 0.0, 1.0)  # the strict sampler's pick


def _step(d: DriftTest, step: int, first: TokenMetrics, redo: TokenMetrics = CALM) -> tuple[list, list]:
    """One step as the redo runs it: the first (NORMAL) proposal, a STRICT one if it was
    rejected; the accepted one committed. Returns both proposals' trips."""
    p = Proposal(first.token, Sampler.NORMAL, first, step, step, attempt=0)
    trips = list(d.check(p))
    if not any(t.rejects for t in trips):
        d.commit(p)
        return trips, []
    q = Proposal(redo.token, Sampler.STRICT, redo, step, step, attempt=1)
    again = list(d.check(q))
    if not any(t.rejects for t in again):
        d.commit(q)
    return trips, again


def test_a_drifting_sampler_moves_the_session_into_the_protective_band_instead_of_halting_it() -> None:
    d = DriftTest(DriftConfig())
    entered = None
    for step in range(200):
        trips, again = _step(d, step, SURPRISING)
        assert not again  # the strict sampler's token is committed: never a halt
        if trips and entered is None:
            entered = step
            [t] = trips
            assert t.code == "drift" and t.action.name == "REDO" and "enters the protective band" in t.detail
        elif entered is not None:
            [t] = trips  # every later step: the sampler's draw is redone, the trip says why
            assert t.action.name == "REDO" and "protective band" in t.detail
    assert entered is not None and entered < 10
    assert d.protecting and not d.crossed and d.e_value <= 1.0  # capped while the band holds


def test_the_band_ends_once_the_sampler_recovers_and_the_next_step_says_so() -> None:
    cfg = DriftConfig()
    d = DriftTest(cfg)
    step = 0
    while not d.protecting:
        _step(d, step, SURPRISING)
        step += 1
    healthy_first = TokenMetrics(2, 3.0, 1.0, 1, 0.2, 0.4, 0.5, 1.0, 1.0, 0.0, 1.0)  # -log p well under H
    protected = 0
    while d.protecting:
        trips, _ = _step(d, step, healthy_first)
        assert [t.action.name for t in trips] == ["REDO"]  # hysteresis: still redone until released
        protected += 1
        step += 1
        assert protected < 400
    assert protected >= cfg.release_tokens  # debounce: never sooner
    trips, _ = _step(d, step, healthy_first)
    assert [(t.action.name, "protective band ends" in t.detail) for t in trips] == [("FLAG", True)]
    trips, _ = _step(d, step + 1, healthy_first)
    assert trips == []  # back to the request's own sampler


def test_what_the_session_commits_drifting_halts_it_as_healing_cannot_hold() -> None:
    d = DriftTest(DriftConfig())
    for step in range(200):
        trips, again = _step(d, step, SURPRISING, redo=SURPRISING)  # even the strict picks are garbage
        if again:
            [t] = again
            assert t.code == "drift" and t.action.name == "HALT" and "what the session commits" in t.detail
            break
    else:
        pytest.fail("a committed stream of 12-nat surprises was never halted")
    assert step < 10  # as soon as the sampler's crossing found no calm token to commit instead


def test_the_stream_is_calm_only_once_healthy_tokens_brought_the_evidence_under_release_e() -> None:
    """calm() is what lets the -log p guard pass a rare far-tail draw: never at the start
    (no evidence yet, e = 1), after healthy tokens (e under release_e), never while the
    sampler's evidence rises or the protective band holds."""
    cfg = DriftConfig()
    d = DriftTest(cfg)
    assert not d.calm()  # e = 1: nothing known
    healthy = TokenMetrics(2, 3.0, 1.0, 1, 0.2, 0.4, 0.5, 1.0, 1.0, 0.0, 1.0)  # -log p well under H
    step = 0
    while not d.calm():
        _step(d, step, healthy)
        step += 1
        assert step < 50
    assert d.e_value < cfg.release_e and step >= 2
    while d.calm():  # surprising draws: the evidence rises past release_e before any band
        _step(d, step, SURPRISING)
        step += 1
    assert not d.protecting and d.e_value >= cfg.release_e
    while not d.protecting:
        _step(d, step, SURPRISING)
        step += 1
    for _ in range(cfg.release_tokens - 1):  # in the band, however low the evidence: not calm
        _step(d, step, healthy)
        step += 1
        assert d.protecting and not d.calm()
