from __future__ import annotations

import numpy as np
import pytest

from sidecar.config import Guard, GuardSet, Policy, RedoBounds, Rule
from sidecar.core.compact import compact_from_logits
from sidecar.core.evaluators import Proposal, TokenGuards
from sidecar.core.guards import Action, Sampler, Trip, evaluate, health_band
from sidecar.core.metrics import row_stats
from sidecar.core.policy import CompiledPolicy, compile_policy
from sidecar.core.redo import Decision, decide, token_metrics
from sidecar.core.sampling import SamplingParams
from sidecar.core.session import Session
from sidecar.errors import RowError, SessionError

OFF = GuardSet(
    running_ppl=Guard(enabled=False, threshold=400),
    logit_variance=Guard(enabled=False, threshold=0.1),
    l2_norm=Guard(enabled=False, threshold=1e4),
    neg_logprob=Guard(enabled=False, threshold=6.5),
)


VOCAB = [f"t{i}".encode() for i in range(1000)]


def guards(**on: float) -> GuardSet:
    return OFF.model_copy(update={k: Guard(enabled=True, threshold=v) for k, v in on.items()})


def guarded(gs: GuardSet) -> list[TokenGuards]:
    return [TokenGuards(gs)]


def policy(gs: GuardSet) -> CompiledPolicy:
    return compile_policy("test", Policy(guards=gs))


def peaked_row(v: int = 1000) -> np.ndarray:
    x = np.full(v, -2.0, np.float32)
    x[10] = 8.0  # the greedy choice, p ~ 0.95
    x[20] = 5.0
    return x


def test_candidate_that_passes_is_accepted() -> None:
    row = peaked_row()
    out = decide(row, row_stats(row), [], SamplingParams(), guarded(guards(neg_logprob=6.0)), 0.0, 0, 0)
    assert out.decision == Decision.ACCEPT and out.token == 10 and out.reasons == ()
    assert out.sampler == Sampler.NORMAL


def test_a_far_tail_draw_is_redone_unless_a_calm_stream_s_sampler_seldom_goes_there() -> None:
    """-log p over its threshold: a hot sampler's draw (its tail, the chance of a token this
    improbable, is large) is healed by the strict sampler; a cool sampler's rare draw (a
    tail under neg_logprob_min_tail) is committed with a FLAG that says why, but only while
    the stream is calm (the drift test sees no sign of a hot sampler)."""
    row = np.zeros(1000, np.float32)
    row[0] = 6.0  # every other token: -log p 7.25
    gs = guards(neg_logprob=7.0).model_copy(update={"neg_logprob_min_tail": 0.01})

    def far_tail_step(p: SamplingParams) -> int:
        return next(s for s in range(100_000) if decide(row, row_stats(row), [], p, guarded(OFF), 0.0, 0, s).token != 0)

    def judged(p: SamplingParams, gs: GuardSet, calm: bool) -> tuple[Decision, int, Trip]:
        out = decide(row, row_stats(row), [], p, [TokenGuards(gs, lambda: calm)], 0.0, 0, far_tail_step(p))
        trip = out.reasons[0]
        assert trip.code == "neg_logprob" and trip.value == pytest.approx(7.25, abs=0.01) and trip.sampler == Sampler.NORMAL
        assert out.decision == Decision.ACCEPT or (out.token == 0 and out.sampler == Sampler.STRICT)
        return out.decision, out.token, trip

    hot, cool = SamplingParams(temperature=1.5, seed=3), SamplingParams(temperature=0.4, seed=3)
    decision, _, trip = judged(hot, gs, calm=True)  # tail ~0.95
    assert decision == Decision.HEALED and trip.action == Action.REDO
    assert trip.detail == "neg_logprob 7.24596 > 7; the sampler's tail was 0.948"
    decision, token, trip = judged(cool, gs, calm=True)  # tail ~3e-4
    assert decision == Decision.ACCEPT and token != 0 and trip.action == Action.FLAG
    let_through = "neg_logprob 7.24596 > 7; the sampler's tail was 0.000306 (< 0.01, a calm stream): a rare draw, let through"
    assert trip.detail == let_through
    decision, _, trip = judged(cool, gs, calm=False)  # the drift test has evidence of a hot sampler
    assert decision == Decision.HEALED and trip.detail == "neg_logprob 7.24596 > 7; the sampler's tail was 0.000306"
    no_tail = guards(neg_logprob=7.0).model_copy(update={"neg_logprob_min_tail": 0.0})  # every far-tail draw redone
    assert judged(cool, no_tail, calm=True)[0] == Decision.HEALED
    no_drift_test = guarded(gs)  # nothing says the stream is calm
    assert decide(row, row_stats(row), [], cool, no_drift_test, 0.0, 0, far_tail_step(cool)).decision == Decision.HEALED


def test_surprising_sample_is_healed_by_the_strict_sampler_and_the_trip_is_kept() -> None:
    row = peaked_row()
    row[30] = 4.0  # a plausible but surprising token for a hot sampler
    hot = SamplingParams(temperature=50.0, seed=1)
    # find a step where the hot sampler picks something other than the greedy token
    step = next(s for s in range(200) if decide(row, row_stats(row), [], hot, guarded(OFF), 0.0, 0, s).token != 10)
    out = decide(row, row_stats(row), [], hot, guarded(guards(rank=0.0)), 0.0, 0, step)
    assert out.decision == Decision.HEALED
    assert out.token == 10 and out.sampler == Sampler.STRICT
    assert [r.code for r in out.reasons] == ["rank"]
    assert out.reasons[0].sampler == Sampler.NORMAL and out.reasons[0].value > 0


def test_double_fault_aborts_with_both_attempts_recorded() -> None:
    row = np.zeros(1000, np.float32)  # uniform: entropy ln(1000) = 6.9 for any token
    out = decide(row, row_stats(row), [], SamplingParams(temperature=1.0), guarded(guards(entropy=3.0)), 0.0, 0, 0)
    assert out.decision == Decision.ABORT and out.token == -1
    assert [(r.code, r.sampler) for r in out.reasons] == [("entropy", Sampler.NORMAL), ("entropy", Sampler.STRICT)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_abort_with_a_reason_naming_it(bad: float) -> None:
    row = peaked_row()
    row[500] = bad
    out = decide(row, row_stats(row), [], SamplingParams(), guarded(OFF), 0.0, 0, 0)
    assert out.decision == Decision.ABORT
    assert [r.code for r in out.reasons] == ["non_finite"]
    assert "NaN or Inf" in out.reasons[0].detail


def test_seed_001_defaults_trip_on_their_failure_modes() -> None:
    defaults = GuardSet()
    flat = np.zeros(1000, np.float32)  # collapse: variance 0 < 0.1
    assert "logit_variance" in [
        t.code for t in evaluate(token_metrics(flat, row_stats(flat), 0, 0.0, 0), defaults, Sampler.NORMAL, 0)
    ]
    huge = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 1e3  # L2 ~ 3e4 > 1e4
    assert "l2_norm" in [t.code for t in evaluate(token_metrics(huge, row_stats(huge), 0, 0.0, 0), defaults, Sampler.NORMAL, 0)]
    row = peaked_row()
    m = token_metrics(row, row_stats(row), 999, 0.0, 0)  # a ~e^-10 token: PPL ~ 2e4 > 400
    # and the recalibrated per-token guard: -log p ~ 10 > 9; running PPL once past its warm-up
    assert [t.code for t in evaluate(m, defaults, Sampler.NORMAL, 4)] == ["neg_logprob", "running_ppl"]
    assert [t.code for t in evaluate(m, defaults, Sampler.NORMAL, 3)] == ["neg_logprob"]  # the 4th token: warming up
    assert [t.code for t in evaluate(m, defaults.model_copy(update={"ppl_warmup_tokens": 0}), Sampler.NORMAL, 0)] == [
        "neg_logprob",
        "running_ppl",
    ]


def test_health_bands_follow_the_ppl_thresholds() -> None:
    assert [health_band(p) for p in (1.0, 199.9, 200.0, 400.0, 400.1, float("nan"))] == [1, 1, 2, 2, 3, 3]


def make_session(**kw) -> Session:
    return Session(session_id="s-1", tag=1, params=SamplingParams(), policy=policy(guards(**kw)), tokens=VOCAB, history=[1, 2])


def test_judging_commits_nothing_until_commit() -> None:
    s = make_session(neg_logprob=6.0)
    row = peaked_row()
    before = (list(s.history), s.next_step, s.chain_hash, s.ppl_sum)
    out = s.judge(row, 0)
    assert (s.history, s.next_step, s.chain_hash, s.ppl_sum) == before
    prev, new = s.commit(0, out)
    assert prev == before[2] and new == s.chain_hash != prev
    assert s.history == [1, 2, 10] and s.next_step == 1 and s.generated == 1


def test_aborted_session_accepts_no_more_steps_and_history_is_unchanged() -> None:
    s = make_session(entropy=0.0)
    row = np.zeros(1000, np.float32)
    out = s.judge(row, 0)
    assert out.decision == Decision.ABORT
    s.commit(0, out)
    assert s.history == [1, 2] and s.aborted
    with pytest.raises(SessionError, match="aborted"):
        s.judge(row, 1)


def test_steps_out_of_order_and_wrong_row_size_are_refused() -> None:
    s = make_session()
    with pytest.raises(SessionError, match="out of order"):
        s.judge(peaked_row(), 1)
    with pytest.raises(RowError, match="999 entries, the registered vocabulary has 1000"):
        s.judge(peaked_row(999), 0)


def test_same_inputs_give_the_same_chain() -> None:
    def run() -> bytes:
        s = Session(
            session_id="det", tag=1, params=SamplingParams(temperature=1.0, seed=5), policy=policy(guards(rank=3)), tokens=VOCAB
        )
        rng = np.random.default_rng(0)
        for step in range(20):
            s.commit(step, s.judge((rng.standard_normal(1000) * 3).astype(np.float32), step))
        return s.chain_hash

    assert run() == run()


def test_bad_session_ids_are_rejected() -> None:
    with pytest.raises(SessionError, match="must match"):
        Session(session_id="bad id/with spaces", tag=1, params=SamplingParams(), policy=policy(OFF), tokens=VOCAB[:10])


# -- policy rules through the redo ------------------------------------------------------------

WORDS = [b"a", b" bad", b" good", b" fine", b"word", b" ok"]


def rules_session(action: str, tokens: list[bytes] = WORDS, pattern: str = "badword", **redo: int) -> Session:
    rule = Rule(id="no-" + pattern, kind="literal", patterns=[pattern], action=action)
    pol = compile_policy("p", Policy(guards=OFF, rules=[rule], redo=RedoBounds(**redo)))
    return Session(session_id="r-1", tag=1, params=SamplingParams(), policy=pol, tokens=tokens)


def ranked(*ids: int) -> np.ndarray:
    """A row whose greedy order is ``ids`` (then everything else)."""
    row = np.full(len(WORDS), -20.0, np.float32)
    for rank, i in enumerate(ids):
        row[i] = 10.0 - rank
    return row


def test_block_excludes_the_completing_token_and_heals_with_the_next_candidate() -> None:
    s = rules_session("block")
    s.commit(0, s.judge(ranked(1), 0))  # " bad"
    out = s.judge(ranked(4, 3), 1)  # "word" would complete " badword"
    assert out.decision == Decision.HEALED and out.token == 3 and out.sampler == Sampler.NORMAL
    [r] = out.reasons
    assert (r.code, r.action, r.token_id, (r.span_start, r.span_end)) == ("no-badword", Action.BLOCK, 4, (1, 8))
    s.commit(1, out)
    assert b"".join(WORDS[t] for t in s.history) == b" bad fine"


def test_block_falls_back_to_the_strict_sampler_with_the_same_mask_then_aborts_when_nothing_is_left() -> None:
    s = rules_session("block", tokens=[b"x", b"zx"], pattern="x", max_block_retries=0)
    out = s.judge(np.array([5.0, 4.0], np.float32), 0)  # every token would complete "x"
    assert out.decision == Decision.ABORT
    assert [(r.code, r.token_id, r.sampler) for r in out.reasons] == [
        ("no-x", 0, Sampler.NORMAL),
        ("no-x", 1, Sampler.STRICT),
        ("no_allowed_token", -1, Sampler.STRICT),
    ]
    # one record per proposal, in order, each owning its trips: the sampler with nothing left too
    assert [(p.token_id, p.sampler, p.reasons) for p in out.proposals] == [
        (0, Sampler.NORMAL, 1),
        (1, Sampler.STRICT, 1),
        (-1, Sampler.STRICT, 1),
    ]


def test_block_gives_up_after_max_proposals() -> None:
    s = rules_session("block", tokens=[b"x", b"zx", b"zzx", b"y"], pattern="x", max_block_retries=1, max_proposals=2)
    out = s.judge(np.array([5.0, 4.0, 3.0, 2.0], np.float32), 0)  # "y" is allowed, but third in line
    assert out.decision == Decision.ABORT
    assert [(r.code, r.token_id, r.sampler) for r in out.reasons] == [
        ("no-x", 0, Sampler.NORMAL),
        ("no-x", 1, Sampler.NORMAL),
        ("redo_exhausted", -1, Sampler.STRICT),
    ]
    # two proposals with a trip each; the exhaustion is the step's own trip, after them
    assert [(p.token_id, p.reasons) for p in out.proposals] == [(0, 1), (1, 1)]
    roomier = rules_session("block", tokens=[b"x", b"zx", b"zzx", b"y"], pattern="x", max_block_retries=1, max_proposals=4)
    healed = roomier.judge(np.array([5.0, 4.0, 3.0, 2.0], np.float32), 0)
    assert (healed.decision, healed.token, healed.sampler) == (Decision.HEALED, 3, Sampler.STRICT)
    assert [(p.token_id, p.sampler, p.reasons) for p in healed.proposals] == [
        (0, Sampler.NORMAL, 1),
        (1, Sampler.NORMAL, 1),
        (2, Sampler.STRICT, 1),
        (3, Sampler.STRICT, 0),  # the committed one, last
    ]


def test_halt_aborts_before_the_completing_token_and_commits_no_text() -> None:
    s = rules_session("halt")
    s.commit(0, s.judge(ranked(1), 0))
    out = s.judge(ranked(4, 3), 1)
    assert out.decision == Decision.ABORT and out.token == -1
    assert [(r.code, r.action) for r in out.reasons] == [("no-badword", Action.HALT)]
    s.commit(1, out)
    assert s.aborted and s.history == [1]


def test_flag_records_the_hit_and_lets_the_token_through() -> None:
    s = rules_session("flag")
    s.commit(0, s.judge(ranked(1), 0))
    out = s.judge(ranked(4), 1)  # pending: confirmed by the next character
    assert out.decision == Decision.ACCEPT and out.token == 4 and out.reasons == ()
    s.commit(1, out)
    out2 = s.judge(ranked(5), 2)
    assert out2.decision == Decision.ACCEPT
    assert [(r.code, r.action, r.span_start, r.span_end) for r in out2.reasons] == [("no-badword", Action.FLAG, 1, 8)]


def test_flag_at_the_very_end_is_reported_by_finish() -> None:
    s = rules_session("flag")
    for step, tok in enumerate((1, 4)):
        s.commit(step, s.judge(ranked(tok), step))
    assert [(t.code, t.span_start, t.span_end) for t in s.finish()] == [("no-badword", 1, 8)]


def test_gate_loop_guard_and_drift_test_replay_identically_from_the_same_logits() -> None:
    """Two independent sessions, the default policy, the same rows: the same decisions,
    trips, bands, risk and e-values at every step (no hidden state, no clock)."""
    rng = np.random.default_rng(42)
    vocab = [f"w{i}".encode() for i in range(500)]
    rows = []
    for i in range(120):
        row = rng.standard_normal(500).astype(np.float32) * (3.0 if i < 60 else 0.5)  # then a flat stretch
        row[i % 7] += 4.0  # a short cycle the loop guard should see
        rows.append(row)
    pol = compile_policy("default", Policy())
    hot = SamplingParams(temperature=1.3, seed=9)

    def replay() -> list[tuple]:
        s = Session(session_id="replay", tag=1, params=hot, policy=pol, tokens=vocab)
        trace = []
        for step, row in enumerate(rows):
            out = s.judge(row, step)
            s.commit(step, out)
            g = s.gate_view()
            assert g is not None
            trace.append((out.decision, out.token, out.reasons, g.band, g.pending, g.risk, s.e_value, s.chain_hash))
            if out.decision == Decision.ABORT:
                break
        return trace

    first, second = replay(), replay()
    assert first == second
    assert len({t[3] for t in first}) > 1 or any(t[2] for t in first)  # the stream did move the evaluators


def test_a_candidate_drawn_with_tokens_excluded_is_judged_on_the_renormalised_distribution() -> None:
    """Blocking the word the model is sure of must not make its best alternative look
    like drift: -log p, rank and margin are those of the distribution over allowed tokens."""
    row = np.full(6, -10.0, np.float32)
    row[4], row[3], row[5] = 12.0, 3.0, 2.0  # "word" is near certain; " fine" the best other
    st = row_stats(row)
    raw = token_metrics(row, st, 3, 0.0, 0)
    masked = token_metrics(row, st, 3, 0.0, 0, banned=[4, 4])
    p = np.exp(row.astype(np.float64) - np.logaddexp.reduce(row.astype(np.float64)))
    allowed = 1 - p[4]
    assert raw.neg_logprob > 8.9 and raw.rank == 1
    assert masked.neg_logprob == pytest.approx(-np.log(p[3] / allowed), rel=1e-6) and masked.neg_logprob < 0.5
    assert masked.rank == 0 and masked.selected_prob == pytest.approx(p[3] / allowed, rel=1e-6)
    assert masked.margin == pytest.approx((p[3] - p[5]) / allowed, rel=1e-6)
    assert (masked.entropy, masked.max_prob) == (raw.entropy, raw.max_prob)  # the model's distribution

    rule = Rule(id="no-badword", kind="literal", patterns=["badword"], action="block")
    pol = compile_policy("p", Policy(guards=guards(neg_logprob=6.5, running_ppl=400), rules=[rule]))
    s = Session(session_id="r-2", tag=1, params=SamplingParams(), policy=pol, tokens=WORDS)
    s.commit(0, s.judge(ranked(1), 0))
    out = s.judge(row, 1)
    assert out.decision == Decision.HEALED and out.token == 3
    assert [r.code for r in out.reasons] == ["no-badword"]


def _softmax64(y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    return np.exp(y - np.logaddexp.reduce(y))


def test_a_candidate_drawn_under_a_repetition_penalty_is_judged_on_the_penalised_distribution() -> None:
    """llama.cpp's penalty (1.1 by default) moves the draw off a token the model wants to
    repeat; the word it moves to is improbable to the raw model but not to the sampler:
    -log p, rank and margin are those of the penalised row (the CTRL rule), renormalised."""
    rng = np.random.default_rng(5)
    row = rng.normal(0.0, 2.0, 500).astype(np.float32)
    row[7], row[9] = 16.0, 13.0  # the model's favourite repeats an earlier token
    params = SamplingParams(repetition_penalty=1.1, repetition_window=64)
    history = [7, 300, 7, 42]
    st = row_stats(row)
    pen = row.copy()
    for t in set(history):
        pen[t] = pen[t] / np.float32(1.1) if pen[t] > 0 else pen[t] * np.float32(1.1)
    q = _softmax64(pen)
    m = token_metrics(row, st, 9, 0.0, 0, (), history, params)
    assert m.neg_logprob == pytest.approx(-np.log(q[9]), rel=1e-6)
    assert m.selected_prob == pytest.approx(q[9], rel=1e-6)
    assert m.rank == int(np.count_nonzero(pen > pen[9]))
    assert m.margin == pytest.approx(q[9] - np.sort(np.delete(q, 9))[-1], rel=1e-6)
    assert (m.entropy, m.max_prob) == (st.entropy, st.max_prob)  # the model's distribution
    # No penalty, or no repeated token in the window: the raw metrics, exactly.
    raw = token_metrics(row, st, 9, 0.0, 0)
    assert token_metrics(row, st, 9, 0.0, 0, (), [300, 42], SamplingParams(repetition_penalty=1.0)) == raw
    assert token_metrics(row, st, 9, 0.0, 0, (), history, SamplingParams(repetition_penalty=1.1, repetition_window=0)) == raw


def test_a_penalty_that_takes_nearly_all_the_mass_is_judged_exactly_not_by_cancellation() -> None:
    """When the penalised tokens held nearly all the mass, 1 - sum(their share) would cancel
    to noise: the allowed mass is then summed over the row, and a ban adds to the penalty."""
    row = np.full(300, -5.0, np.float32)
    row[3], row[4], row[5] = 40.0, 20.0, 19.0  # 3 holds all but e^-20 of the mass
    params = SamplingParams(repetition_penalty=3.0, repetition_window=8)
    st = row_stats(row)
    pen = row.copy()
    pen[3] = np.float32(40.0) / np.float32(3.0)
    pen[4] = -np.inf  # banned as well
    q = _softmax64(pen)
    m = token_metrics(row, st, 5, 0.0, 0, [4], [3, 3], params)
    assert m.neg_logprob == pytest.approx(-np.log(q[5]), rel=1e-6) and m.neg_logprob < 0.01
    assert m.rank == 0 and m.margin == pytest.approx(q[5] - q[3], rel=1e-5)


def test_a_compact_row_under_a_penalty_is_judged_as_its_full_row() -> None:
    """Shipped entries carry the penalised candidate exactly; the unshipped tail keeps the
    model's mass, so -log p can only come out as high as the FULL row's or higher."""
    rng = np.random.default_rng(11)
    row = rng.normal(0.0, 1.5, 4000).astype(np.float32)
    row[[17, 18, 19]] = [12.0, 11.5, 9.0]
    history = [17, 18, 3999]  # 3999: a repeated token that was not shipped
    for penalty in (1.1, 1.5, 0.8):
        params = SamplingParams(repetition_penalty=penalty, repetition_window=16)
        full = token_metrics(row, row_stats(row), 19, 0.0, 0, (), history, params)
        cr = compact_from_logits(row, 256)
        comp = token_metrics(cr, cr.stats(), 19, 0.0, 0, (), history, params)
        assert comp.neg_logprob >= full.neg_logprob - 1e-6
        assert comp.neg_logprob == pytest.approx(full.neg_logprob, abs=2e-3)
        assert comp.rank == full.rank


def test_the_word_a_penalty_moves_the_draw_to_is_not_healed_as_drift() -> None:
    """Greedy with penalty 2: the repeated favourite (16 -> 8) drops below the next word
    (9), which the raw model gives -log p 7 (past a 6.5-nat guard) but the sampler
    draws with p ~ 0.73. It is ACCEPTED, not healed."""
    row = np.full(len(WORDS), -4.0, np.float32)
    row[4], row[3] = 16.0, 9.0
    pol = compile_policy("p", Policy(guards=guards(neg_logprob=6.5)))
    s = Session(session_id="r-pen", tag=1, params=SamplingParams(repetition_penalty=2.0), policy=pol, tokens=WORDS)
    s.commit(0, s.judge(ranked(4), 0))
    out = s.judge(row, 1)
    assert out.token == 3 and out.decision == Decision.ACCEPT, out.reasons
    assert out.metrics.neg_logprob == pytest.approx(np.log1p(np.exp(8.0 - 9.0)), abs=1e-4)


class _AsksStrict:
    """An evaluator in a protective band: every first proposal is the strict sampler's."""

    name = "asks_strict"

    def strict(self) -> bool:
        return True

    def check(self, p: Proposal) -> tuple[()]:
        return ()

    def commit(self, p: Proposal) -> None:
        pass


def test_the_strict_sampler_steps_off_a_repeated_token_under_its_own_repetition_penalty() -> None:
    row = np.full(1000, -2.0, np.float32)
    row[10], row[20] = 3.0, 2.5  # 10 was just emitted; 3.0 / 1.3 < 2.5
    st, history = row_stats(row), [10]
    plain = decide(row, st, history, SamplingParams(), [_AsksStrict()], 0.0, 1, 1)
    assert (plain.token, plain.sampler) == (10, Sampler.STRICT)  # greedy goes round again
    bounds = RedoBounds(strict_repetition_penalty=1.3)
    out = decide(row, st, history, SamplingParams(), [_AsksStrict()], 0.0, 1, 1, bounds)
    assert (out.token, out.sampler) == (20, Sampler.STRICT)
    # judged on the distribution it was drawn from (the penalised row), as any penalised draw
    assert out.metrics.rank == 0 and out.metrics.neg_logprob < token_metrics(row, st, 20, 0.0, 1).neg_logprob
    # the request's own sampler is untouched, and a request's stronger penalty is kept
    assert decide(row, st, history, SamplingParams(), guarded(OFF), 0.0, 1, 1, bounds).token == 10
    row[20] = 2.2  # 3.0 / 1.3 > 2.2 > 3.0 / 1.6
    assert decide(row, row_stats(row), history, SamplingParams(), [_AsksStrict()], 0.0, 1, 1, bounds).token == 10
    own = SamplingParams(repetition_penalty=1.6)
    assert decide(row, row_stats(row), history, own, [_AsksStrict()], 0.0, 1, 1, bounds).token == 20


@pytest.mark.parametrize("bad", [0.9, 2.5])
def test_a_strict_repetition_penalty_out_of_range_is_refused_naming_the_field(bad: float) -> None:
    with pytest.raises(ValueError, match="strict_repetition_penalty"):
        RedoBounds(strict_repetition_penalty=bad)


def test_a_session_lets_a_rare_far_tail_draw_through_only_once_the_drift_test_finds_the_stream_calm() -> None:
    """The wiring: a session's -log p guard asks its own drift test. At T=0.4 on a row whose
    999 tail tokens sit at -log p 7.25, the draws are the model's choice, which brings the
    drift test's e-value down; the first far-tail draw then goes through with a FLAG. The
    same draw as a session's first step (no evidence yet), or with the drift test off, is
    healed."""
    row = np.zeros(1000, np.float32)
    row[0] = 6.0
    params = SamplingParams(temperature=0.4, seed=3)
    gs = guards(neg_logprob=7.0).model_copy(update={"neg_logprob_min_tail": 0.01})
    # the first far-tail draw after a few of the model's choice
    at = next(s for s in range(8, 100_000) if decide(row, row_stats(row), [], params, guarded(OFF), 0.0, 0, s).token != 0)

    def run(drift: bool, start: int) -> Decision:
        only = {"gate": {"enabled": False}, "loop_guard": {"enabled": False}, "drift": {"enabled": drift}}
        pol = compile_policy("t", Policy(guards=gs, **only))
        s = Session(session_id="tail", tag=1, params=params, policy=pol, tokens=VOCAB)
        s.next_step = start
        for step in range(start, at):
            out = s.judge(row, step)
            assert out.decision == Decision.ACCEPT and out.token == 0
            s.commit(step, out)
        out = s.judge(row, at)
        if out.decision == Decision.ACCEPT:
            assert out.token != 0 and [(t.code, t.action) for t in out.reasons] == [("neg_logprob", Action.FLAG)]
        return out.decision

    assert run(drift=True, start=0) == Decision.ACCEPT  # calm after its first tokens
    assert run(drift=True, start=at) == Decision.HEALED  # the first step: e = 1, nothing known
    assert run(drift=False, start=0) == Decision.HEALED  # nothing says the stream is calm


@pytest.mark.parametrize("calm", [False, True])
def test_bench_quality_reads_the_tail_from_the_detail_the_guard_writes(calm: bool) -> None:
    """bench quality calibrates neg_logprob_min_tail from the trips' details: the format it
    parses is the one the guard writes, let through or not."""
    from sidecar.bench.quality import _TAIL
    from sidecar.core.guards import TokenMetrics

    m = TokenMetrics(7, 2.0, 12.5, 900, -0.5, 4e-6, 0.5, 1.0, 10.0, 1.0, 20.0)
    gs = guards(neg_logprob=9.0).model_copy(update={"neg_logprob_min_tail": 0.001})
    [trip] = evaluate(m, gs, Sampler.NORMAL, 10, tail=3.1912e-5, calm=calm)
    assert trip.action == (Action.FLAG if calm else Action.REDO)
    found = _TAIL.search(trip.detail)
    assert found is not None and float(found.group(1)) == pytest.approx(3.19e-5)
