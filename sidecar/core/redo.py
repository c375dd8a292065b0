"""The self-healing redo state machine of seed 000 (pure).

    propose (Normal sampler) -> evaluate -> ACCEPT
        | block: that token is masked; propose again (Normal, up to max_block_retries)
        | a guard trips (REDO)
        v
    propose (Strict sampler: greedy, same penalty, same mask) -> evaluate -> HEALED
        | block: mask it, propose again (Strict)
        | a guard trips again: double fault
        v
    ABORT    (also: a halt rule, a non-finite row, no allowed token, max_proposals spent)

The evaluators (:mod:`sidecar.core.evaluators`) judge each proposal in order; this
module owns the flow and nothing else. Nothing here mutates its inputs: :func:`decide`
returns an outcome and the caller commits it (or not). Every trip of every proposal is
kept in the outcome, in the order made, healed ones included; a flag is recorded and
rejects nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from enum import IntEnum
from typing import Final

import numpy as np

from ..config import RedoBounds
from .compact import CompactRow
from .evaluators import Evaluator, Proposal
from .guards import Action, Sampler, TokenMetrics, Trip
from .metrics import Candidate, RowStats, candidate, running_perplexity
from .sampling import Row, SamplingParams, draw_normal, prepared, sample_strict
from .values import Value


class Decision(IntEnum):
    """Values match fse.v1.Decision."""

    ACCEPT = 1
    HEALED = 2
    ABORT = 3


class ProposalRecord(Value):
    """One candidate the redo proposed (the audit's record of it; fse.v1.Proposal)."""

    _fields = ("token_id", "sampler", "reasons")
    __slots__ = _fields

    def __init__(self, token_id: int, sampler: Sampler, reasons: int) -> None:
        self.token_id: Final = token_id  # -1: the sampler had no allowed token left
        self.sampler: Final = sampler
        self.reasons: Final = reasons  # how many of the outcome's reasons, in order, this proposal tripped


class StepOutcome(Value):
    _fields = ("decision", "token", "sampler", "metrics", "reasons", "proposal", "proposals")
    __slots__ = _fields

    def __init__(
        self,
        decision: Decision,
        token: int,
        sampler: Sampler | None,
        metrics: TokenMetrics,
        reasons: tuple[Trip, ...],
        proposal: Proposal | None = None,
        proposals: tuple[ProposalRecord, ...] = (),
    ) -> None:
        self.decision: Final = decision
        self.token: Final = token  # -1 on ABORT
        self.sampler: Final = sampler  # which attempt is committed; None on ABORT
        self.metrics: Final = metrics  # of the committed candidate (of the last attempt on ABORT)
        self.reasons: Final = reasons  # each proposal's trips in proposal order, then the step's own
        self.proposal: Final = proposal  # the committed proposal; None on ABORT
        self.proposals: Final = proposals  # every proposal, in the order made

    def aborted(self, trip: Trip) -> StepOutcome:
        """This outcome turned into an ABORT for ``trip`` (a step-wide reason, e.g. the
        audit could not record it): its proposals stay on record, nothing is committed."""
        return StepOutcome(Decision.ABORT, -1, None, self.metrics, (*self.reasons, trip), None, self.proposals)


_DEFAULT_BOUNDS = RedoBounds()


def token_metrics(
    row: Row,
    st: RowStats,
    token: int,
    ppl_sum: float,
    generated: int,
    banned: Sequence[int] = (),
    history: Sequence[int] = (),
    params: SamplingParams | None = None,
) -> TokenMetrics:
    """Metrics of ``token``; the running PPL includes the candidate.

    The candidate's own metrics (-log p, probability, rank, margin) are those of the
    distribution it was drawn from: the row with the request's repetition penalty applied
    (``params`` over ``history``, as the samplers do) and renormalised over the tokens no
    policy rule excluded in this step (``banned``). Otherwise a banned word's only
    alternative, improbable because the model was sure of the word (" Ray" + "leigh"), or
    the word a penalty moved the draw to when the model wanted to repeat one (llama.cpp's
    default 1.1), would trip the -log p guard although nothing drifted. The
    distribution's own metrics (entropy, max prob, variance, L2) stay the model's.
    """
    if not st.finite:
        nan = float("nan")
        return TokenMetrics(token, nan, nan, -1, nan, nan, nan, nan, nan, nan, nan, finite=False)
    drawn = _drawn(row, st, token, history, params, banned)
    if drawn is None:
        c = row.candidate(st, token) if isinstance(row, CompactRow) else candidate(row, st, token)
        return _metrics(st, token, c.neg_logprob, c.rank, c.margin, c.selected_prob, ppl_sum, generated)
    nlp, prob, rank, margin = drawn
    return _metrics(st, token, nlp, rank, margin, prob, ppl_sum, generated)


_PLAIN = SamplingParams()
# Below this share of the model's mass left after the changes, the sum over the changed
# entries would cancel to noise (the row's lse is good to ~1e-6): one pass instead.
_CANCEL_SHARE = 1e-2


def _drawn(
    row: Row, st: RowStats, token: int, history: Sequence[int], params: SamplingParams | None, banned: Sequence[int]
) -> tuple[float, float, int, float] | None:
    """(-log p, p, rank, margin) of ``token`` under the penalised, masked row the samplers
    draw from; None when that row is the model's own (no penalty applies, none banned)."""
    applies = params is not None and params.repetition_penalty != 1.0 and params.repetition_window > 0 and len(history) > 0
    if not (banned or applies):
        return None
    sp = params if applies and params is not None else _PLAIN
    y, bound = prepared(row, history, sp, banned)
    compact = isinstance(row, CompactRow)
    raw, at = (row.logits, row.position(token)) if isinstance(row, CompactRow) else (row, token)
    diff = np.flatnonzero(y != raw)  # the entries the penalty or a ban changed (a few)
    if diff.size == 0:
        return None
    # The allowed mass as a share of the model's: 1 + sum over the changed entries of
    # (new - old) / Z, exact for a FULL row. A COMPACT row's unshipped tokens keep their
    # mass (an upper bound: a penalty above 1 or a ban only lowers it); a penalty below 1
    # may raise an unshipped repeated token to at most ``bound``: counted at that bound.
    lse = st.lse
    extra = 0.0
    if compact and sp.repetition_penalty < 1.0 and bound > -math.inf:
        assert isinstance(row, CompactRow)
        recent = np.unique(np.asarray(history[-sp.repetition_window :], dtype=np.int64))
        unshipped = int(recent.size - np.count_nonzero(np.isin(recent, row.ids)))
        extra = unshipped * math.exp(bound - lse)
    with np.errstate(under="ignore"):
        share = 1.0 + float(np.exp(y[diff].astype(np.float64) - lse).sum() - np.exp(raw[diff].astype(np.float64) - lse).sum())
    share += extra
    if share > _CANCEL_SHARE:
        allowed_lse = lse + math.log(share)
    else:
        tail = -math.inf
        if isinstance(row, CompactRow):
            tail = row.tail_log_mass()
            if extra > 0.0:
                tail = float(np.logaddexp(tail, lse + math.log(extra)))
        top = max(float(y.max()), tail)
        with np.errstate(under="ignore"):
            allowed_lse = top + math.log(float(np.exp(y - np.float32(top)).sum(dtype=np.float64)) + math.exp(tail - top))
    xc = float(y[at])
    nlp = allowed_lse - xc
    prob = math.exp(-nlp)
    rank = int(np.count_nonzero(y > xc))
    left = float(y[:at].max()) if at > 0 else -math.inf
    right = float(y[at + 1 :].max()) if at < y.shape[0] - 1 else -math.inf
    runner = max(left, right, bound if compact else -math.inf)
    return nlp, prob, rank, prob - math.exp(runner - allowed_lse)


def _metrics(
    st: RowStats, token: int, nlp: float, rank: int, margin: float, prob: float, ppl_sum: float, generated: int
) -> TokenMetrics:
    return TokenMetrics(
        token=token,
        entropy=st.entropy,
        neg_logprob=nlp,
        rank=rank,
        margin=margin,
        selected_prob=prob,
        max_prob=st.max_prob,
        logit_variance=st.variance,
        l2_norm=st.l2_norm,
        varentropy=st.varentropy,
        running_ppl=running_perplexity(ppl_sum + nlp, generated + 1),
    )


def accept_first(
    st: RowStats,
    c: Candidate,
    evaluators: Sequence[Evaluator],
    ppl_sum: float,
    generated: int,
    step: int,
    now_s: float = 0.0,
    tail: float = 1.0,
) -> StepOutcome | None:
    """:func:`decide`'s outcome when its first proposal is the Normal sampler's candidate
    ``c`` (drawn from a finite row whose statistics are ``st``, with the draw's ``tail``)
    and nothing trips on it: an ACCEPT. None when the step needs :func:`decide` (an
    evaluator asks for the strict sampler, or any trip, a flag included)."""
    for ev in evaluators:
        if ev.strict():
            return None
    m = _metrics(st, c.token, c.neg_logprob, c.rank, c.margin, c.selected_prob, ppl_sum, generated)
    p = Proposal(c.token, Sampler.NORMAL, m, step, generated, 0, now_s, tail)
    for ev in evaluators:
        if ev.check(p):
            return None
    return StepOutcome(Decision.ACCEPT, c.token, Sampler.NORMAL, m, (), p, (ProposalRecord(c.token, Sampler.NORMAL, 0),))


def _strict_params(params: SamplingParams, bounds: RedoBounds) -> SamplingParams:
    """The strict sampler's parameters: the request's, with at least the redo's repetition penalty."""
    if bounds.strict_repetition_penalty > params.repetition_penalty:
        return replace(params, repetition_penalty=bounds.strict_repetition_penalty)
    return params


def decide(
    row: Row,
    stats: RowStats,
    history: Sequence[int],
    params: SamplingParams,
    evaluators: Sequence[Evaluator],
    ppl_sum: float,
    generated: int,
    step: int,
    bounds: RedoBounds = _DEFAULT_BOUNDS,
    now_s: float = 0.0,
) -> StepOutcome:
    """Judge one step. ``row``: (vocab,) float32 or a COMPACT row; ``stats``: its statistics.

    An evaluator that asks for it (the gate in its STRICT band) makes the first proposal
    the strict sampler's. ``now_s`` is the step's timestamp, for time debounces.
    """
    if not stats.finite:
        nan_metrics = token_metrics(row, stats, 0, ppl_sum, generated)
        trip = Trip("non_finite", math.nan, 0.0, Sampler.NORMAL, "logits row holds NaN or Inf", Action.HALT)
        return StepOutcome(Decision.ABORT, -1, None, nan_metrics, (trip,))

    reasons: list[Trip] = []
    made: list[ProposalRecord] = []
    banned: list[int] = []
    sampler = Sampler.STRICT if any(ev.strict() for ev in evaluators) else Sampler.NORMAL
    strict_params: SamplingParams | None = None  # built when the strict sampler first runs (most steps never do)
    normal_tries = 0
    m: TokenMetrics | None = None
    for attempt in range(bounds.max_proposals):
        if sampler == Sampler.NORMAL:
            drawn_with = params
            token, tail = draw_normal(row, history, params, step, banned)
            normal_tries += 1
        else:
            if strict_params is None:
                strict_params = _strict_params(params, bounds)
            drawn_with = strict_params
            token, tail = sample_strict(row, history, strict_params, banned), 1.0
        if token < 0:
            why = f"every token is excluded by the policy ({len(banned)} blocked in this step)"
            reasons.append(Trip("no_allowed_token", float(len(banned)), 0.0, sampler, why, Action.HALT))
            made.append(ProposalRecord(-1, sampler, 1))
            m = m or token_metrics(row, stats, 0, ppl_sum, generated)
            return StepOutcome(Decision.ABORT, -1, None, m, tuple(reasons), None, tuple(made))
        m = token_metrics(row, stats, token, ppl_sum, generated, banned, history, drawn_with)
        p = Proposal(token, sampler, m, step, generated, attempt, now_s, tail)
        trips = [t for ev in evaluators for t in ev.check(p)]
        reasons += trips
        made.append(ProposalRecord(token, sampler, len(trips)))
        actions = {t.action for t in trips if t.rejects}
        if not actions:
            healed = any(t.rejects for t in reasons)
            return StepOutcome(Decision.HEALED if healed else Decision.ACCEPT, token, sampler, m, tuple(reasons), p, tuple(made))
        if Action.HALT in actions or (Action.REDO in actions and sampler == Sampler.STRICT):
            return StepOutcome(Decision.ABORT, -1, None, m, tuple(reasons), None, tuple(made))
        if Action.BLOCK in actions:
            banned.append(token)
        if Action.REDO in actions or normal_tries > bounds.max_block_retries:
            sampler = Sampler.STRICT
    why = f"no allowed token within max_proposals ({bounds.max_proposals})"
    reasons.append(Trip("redo_exhausted", float(bounds.max_proposals), 0.0, sampler, why, Action.HALT))
    assert m is not None
    return StepOutcome(Decision.ABORT, -1, None, m, tuple(reasons), None, tuple(made))
