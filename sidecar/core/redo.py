"""The self-healing redo state machine of seed 000 (pure).

    propose (Normal sampler) -> evaluate -> ACCEPT
                                   | trip
                                   v
    propose (Strict sampler: greedy, same penalty) -> evaluate -> HEALED
                                                        | trip
                                                        v
                                                      ABORT (double fault)

A non-finite row aborts at once: no sampler can make a NaN row safe. Nothing here
mutates its inputs: :func:`decide` returns an outcome and the caller commits it (or not).
Every trip of every attempt is kept in the outcome, healed ones included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from ..config import GuardSet
from .guards import Sampler, TokenMetrics, Trip, evaluate
from .metrics import RowStats, candidate, running_perplexity
from .sampling import SamplingParams, sample_normal, sample_strict


class Decision(IntEnum):
    """Values match fse.v1.Decision."""

    ACCEPT = 1
    HEALED = 2
    ABORT = 3


@dataclass(frozen=True, slots=True)
class StepOutcome:
    decision: Decision
    token: int  # -1 on ABORT
    sampler: Sampler | None  # which attempt is committed; None on ABORT
    metrics: TokenMetrics  # of the committed candidate (of the last attempt on ABORT)
    reasons: tuple[Trip, ...]


def token_metrics(row: np.ndarray, st: RowStats, token: int, ppl_sum: float, generated: int) -> TokenMetrics:
    """Metrics of ``token``; the running PPL includes the candidate."""
    if not st.finite:
        nan = float("nan")
        return TokenMetrics(token, nan, nan, -1, nan, nan, nan, nan, nan, nan, nan, finite=False)
    c = candidate(row, st, token)
    return TokenMetrics(
        token=token,
        entropy=st.entropy,
        neg_logprob=c.neg_logprob,
        rank=c.rank,
        margin=c.margin,
        selected_prob=c.selected_prob,
        max_prob=st.max_prob,
        logit_variance=st.variance,
        l2_norm=st.l2_norm,
        varentropy=st.varentropy,
        running_ppl=running_perplexity(ppl_sum + c.neg_logprob, generated + 1),
    )


def decide(
    row: np.ndarray,
    stats: RowStats,
    history: Sequence[int],
    params: SamplingParams,
    guards: GuardSet,
    ppl_sum: float,
    generated: int,
    step: int,
) -> StepOutcome:
    """Judge one step. ``row``: (vocab,) float32; ``stats``: its :func:`row_stats`."""
    if not stats.finite:
        m = token_metrics(row, stats, 0, ppl_sum, generated)
        trips = tuple(evaluate(m, guards, Sampler.NORMAL, generated))
        return StepOutcome(Decision.ABORT, -1, None, m, trips)

    first = sample_normal(row, history, params, step)
    m1 = token_metrics(row, stats, first, ppl_sum, generated)
    trips1 = evaluate(m1, guards, Sampler.NORMAL, generated)
    if not trips1:
        return StepOutcome(Decision.ACCEPT, first, Sampler.NORMAL, m1, ())

    second = sample_strict(row, history, params)
    m2 = m1 if second == first else token_metrics(row, stats, second, ppl_sum, generated)
    trips2 = evaluate(m2, guards, Sampler.STRICT, generated)
    if not trips2:
        return StepOutcome(Decision.HEALED, second, Sampler.STRICT, m2, tuple(trips1))
    return StepOutcome(Decision.ABORT, -1, None, m2, tuple(trips1) + tuple(trips2))
