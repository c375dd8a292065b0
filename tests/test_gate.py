"""The windowed risk gate (sidecar.core.gate): hysteresis, debounce, bands, STRICT mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import GateConfig, Guard, GuardSet, Policy
from sidecar.core.evaluators import Proposal
from sidecar.core.gate import Band, GateState, RiskGate, Signals, advance, risk
from sidecar.core.guards import Sampler, TokenMetrics
from sidecar.core.metrics import row_stats
from sidecar.core.policy import compile_policy
from sidecar.core.redo import decide
from sidecar.core.sampling import SamplingParams
from sidecar.core.session import Session

CFG = GateConfig(debounce_tokens=4)  # edges 0.35 / 0.55 / 0.8, hysteresis 0.05


def run(scores: list[float], cfg: GateConfig = CFG, times: list[float] | None = None) -> list[GateState]:
    state, out = GateState(), []
    for i, s in enumerate(scores):
        state = advance(state, s, times[i] if times else 0.0, cfg)
        out.append(state)
    return out


def test_a_score_oscillating_around_an_edge_within_the_margin_never_flips_the_band() -> None:
    edge = CFG.edges.drifting
    states = run([edge - 0.04, edge + 0.04] * 50)  # inside +-hysteresis around the edge
    assert {s.current for s in states} == {Band.HEALTHY}
    assert all(s.pending is None for s in states)


@given(st.lists(st.floats(-0.049, 0.049), min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_wobble_within_the_margin_keeps_the_band(wobble: list[float]) -> None:
    # start in DRIFTING, then wobble around its upper edge
    start = run([0.45] * 4)[-1]
    assert start.current == Band.DRIFTING
    state = start
    for w in wobble:
        state = advance(state, CFG.edges.strict + w, 0.0, CFG)
        assert state.current == Band.DRIFTING


def test_a_one_token_spike_does_not_pass_the_debounce() -> None:
    states = run([0.1, 0.1, 0.95, 0.1, 0.1])
    assert [s.current for s in states] == [Band.HEALTHY] * 5
    assert states[2].pending == Band.HALT and states[3].pending is None  # back in band: cancelled


def test_a_sustained_shift_passes_after_exactly_the_debounce() -> None:
    states = run([0.1] + [0.7] * 6)
    assert [s.current for s in states] == [Band.HEALTHY] * 4 + [Band.STRICT] * 3
    assert [s.pending for s in states[:4]] == [None, Band.STRICT, Band.STRICT, Band.STRICT]
    # and down again: below strict - margin, for the debounce
    down = states[-1]
    for i in range(4):
        down = advance(down, 0.2, 0.0, CFG)
        assert down.current == (Band.STRICT if i < 3 else Band.HEALTHY)


def test_a_new_target_restarts_the_debounce() -> None:
    states = run([0.7, 0.7, 0.7, 0.45, 0.45, 0.45, 0.45])
    assert [s.current for s in states] == [Band.HEALTHY] * 6 + [Band.DRIFTING]


def test_a_time_debounce_needs_the_time_as_well_as_the_tokens() -> None:
    cfg = GateConfig(debounce_tokens=2, debounce_s=1.0)
    states = run([0.7] * 6, cfg, times=[0.0, 0.1, 0.2, 0.5, 1.0, 1.1])
    assert [s.current for s in states] == [Band.HEALTHY] * 4 + [Band.STRICT] * 2


def test_risk_is_in_unit_range_and_windows_start_as_plain_means() -> None:
    s = Signals().add(2.0, 3.0, 0, 16).add(4.0, 1.0, 9, 16)
    assert s.nlp == pytest.approx(3.0) and s.ent == pytest.approx(2.0)
    assert s.lrank == pytest.approx(np.log(10) / 2)
    assert 0.0 <= risk(s, CFG) <= 1.0
    assert risk(Signals(5, 1e9, 1e9, 1e9), CFG) == pytest.approx(1.0)


def test_a_burst_after_a_long_healthy_prefix_is_not_diluted() -> None:
    """The running-PPL gap: 500 healthy tokens, then 12 of garbage."""
    s = Signals()
    for _ in range(500):
        s = s.add(0.5, 1.5, 0, CFG.window)
    running_mean = (500 * 0.5 + 12 * 9.0) / 512
    for _ in range(12):
        s = s.add(9.0, 6.0, 5000, CFG.window)
    assert running_mean < 1.0 < 6.0 < s.nlp
    assert risk(s, CFG) >= CFG.edges.halt


def metrics(nlp: float, ent: float = 2.0, rank: int = 1) -> TokenMetrics:
    return TokenMetrics(0, ent, nlp, rank, 0.1, 0.5, 0.5, 1.0, 1.0, 0.0, 1.0)


def test_the_gate_halts_sustained_garbage_and_the_strict_band_forces_the_strict_sampler() -> None:
    gate = RiskGate(CFG)
    for step in range(40):
        p = Proposal(0, Sampler.NORMAL, metrics(7.0, 5.0, 3000), step, step)
        if gate.check(p):
            break
        gate.commit(p)
        if gate.state.current == Band.STRICT:
            assert gate.strict()
    [trip] = gate.check(p)
    assert trip.code == "gate" and trip.action.name == "HALT" and trip.value >= CFG.edges.halt

    # a session whose gate holds STRICT proposes with the strict sampler first
    off = GuardSet(
        **{g: Guard(enabled=False, threshold=1.0) for g in ("running_ppl", "logit_variance", "l2_norm", "neg_logprob")}
    )
    sess = Session("g", 1, SamplingParams(temperature=5.0, seed=1), compile_policy("p", Policy(guards=off)), [b"a"] * 1000)
    assert sess.gate is not None
    sess.gate.state = GateState(Band.STRICT)
    row = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    out = decide(row, row_stats(row), [], sess.params, sess.evaluators, 0.0, 0, 0)
    assert out.sampler == Sampler.STRICT and out.token == int(row.argmax()) and out.reasons == ()
