"""The first proposal of many COMPACT rows at once (pure, vectorised over the rows).

Most steps of a healthy generation are decided by their first proposal: the Normal
sampler's token and its metrics, and nothing trips. For a batched engine's frame this
module computes that proposal for every row of a :class:`CompactBatch` in a few numpy
passes over its (rows, k) arrays, where the single-row path makes a dozen small numpy
calls per row. It is the same function as :func:`sidecar.core.sampling.sample_normal`
followed by the candidate's metrics (:meth:`CompactRow.stats`, :meth:`CompactRow.candidate`):
the same float32 thresholds, float64 sums in the same order, the same tie rules (logit
descending, lowest id first); the tests compare them bit for bit.

A row it does not cover comes back as None and is judged by the single-row path, which
also raises that row's errors: a repetition penalty that applies (it depends on the
session's history), a non-finite row, a draw the shipped entries do not cover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np

from .compact import CompactBatch
from .metrics import Candidate, RowStats
from .sampling import CANDIDATE_NATS, SamplingParams, uniform
from .values import Value


class Draw(Value):
    """A row's statistics, its first proposal's candidate metrics and the draw's tail
    (:func:`sidecar.core.sampling.draw_normal`)."""

    _fields = ("stats", "candidate", "tail")
    __slots__ = _fields

    def __init__(self, stats: RowStats, candidate: Candidate, tail: float = 1.0) -> None:
        self.stats: Final = stats
        self.candidate: Final = candidate
        self.tail: Final = tail


def draws_itself(p: SamplingParams, history: Sequence[int]) -> bool:
    """Whether the proposal is a function of the row alone (no repetition penalty applies)."""
    return p.repetition_penalty == 1.0 or p.repetition_window == 0 or not history


def first_draws(
    batch: CompactBatch,
    rows: Sequence[int],
    params: Sequence[SamplingParams],
    steps: Sequence[int],
    histories: Sequence[Sequence[int]],
) -> list[Draw | None]:
    """For each of ``rows`` (indices into ``batch``), with its session's ``params``, its
    ``step`` and committed ``histories``: the Normal sampler's first proposal, or None
    where the single-row path must judge it."""
    n = len(rows)
    out: list[Draw | None] = [None] * n
    if n == 0:
        return out
    idx = np.asarray(rows, dtype=np.intp)
    usable = batch.finite[idx].copy()
    for j, (i, p, h) in enumerate(zip(rows, params, histories, strict=True)):
        if batch.errors[i] is not None or not draws_itself(p, h):
            usable[j] = False
    if not usable.any():
        return out
    with np.errstate(all="ignore"):  # rows that are not usable may hold anything; they are masked out
        return _draws(batch, idx, rows, params, steps, usable, out)


def _draws(
    batch: CompactBatch,
    idx: np.ndarray,
    rows: Sequence[int],
    params: Sequence[SamplingParams],
    steps: Sequence[int],
    usable: np.ndarray,
    out: list[Draw | None],
) -> list[Draw | None]:
    n = len(rows)
    y = batch.logits[idx]  # (n, k) float32, entries in id order
    order = batch.desc[idx]  # logit descending, lowest id first on ties
    ys = batch.desc_logits[idx]  # y in that order
    k = y.shape[1]
    floor = batch.floor[idx]
    y_max = ys[:, 0].astype(np.float64)
    temps = np.array([p.temperature for p in params])
    greedy = temps <= 0.0
    pick = np.zeros(n, dtype=np.intp)  # the drawn entry's place in the sorted order
    tails = np.ones(n)  # a greedy draw's tail is 1
    edge = y_max.copy()  # what defines the support: the best logit for greedy
    sampled = np.flatnonzero(usable & ~greedy)
    if len(sampled):  # the rows drawn at a temperature, in passes over those rows only
        at_t = sampled.tolist()
        ps = [params[j] for j in at_t]
        yt, t, y_top = ys[sampled], temps[sampled], y_max[sampled]
        m = len(at_t)
        cut = y_top - t * CANDIDATE_NATS
        for j, p in enumerate(ps):
            if p.min_p > 0.0:
                cut[j] = max(cut[j], y_top[j] + t[j] * math.log(p.min_p))
        # The single row compares its float32 logits with a Python float: in float32.
        count = (yt >= cut.astype(np.float32)[:, None]).sum(axis=1)
        top_k = np.array([p.top_k for p in ps])
        topped = (top_k > 0) & (count >= top_k)
        keep = np.where(topped, top_k, count)
        edge[sampled] = np.where(topped, yt[np.arange(m), np.clip(top_k - 1, 0, k - 1)].astype(np.float64), cut)
        cols = np.arange(k)
        z = np.where(cols < keep[:, None], yt.astype(np.float64) / t[:, None], -np.inf)
        cdf = np.cumsum(np.exp(z - z[:, :1]), axis=1)
        rowsm = np.arange(m)
        total = cdf[rowsm, keep - 1]
        top_p = np.array([p.top_p for p in ps])
        nucleus = np.where(top_p < 1.0, ((cdf < (top_p * total)[:, None]) & (cols < keep[:, None])).sum(axis=1) + 1, keep)
        total = cdf[rowsm, nucleus - 1]
        u = np.array([uniform(p.seed, steps[j]) for p, j in zip(ps, at_t, strict=True)])
        drawn = ((cdf <= (u * total)[:, None]) & (cols < nucleus[:, None])).sum(axis=1)
        picked = np.minimum(drawn, nucleus - 1)
        pick[sampled] = picked
        # the mass from the first candidate as improbable as the drawn one (ties included)
        # on, as sample_normal sums it: its cumulative sums are these, in the same order
        first = (yt > yt[rowsm, picked][:, None]).sum(axis=1)
        below = np.where(first > 0, cdf[rowsm, np.maximum(first - 1, 0)], 0.0)
        tails[sampled] = (total - below) / total
    covered = usable & ((floor == -math.inf) | (edge > floor))
    if not covered.any():
        return out
    rowsn = np.arange(n)
    at = order[rowsn, pick]  # the token's place in id order
    xc = y[rowsn, at]
    top = pick == 0
    rank = np.where(top, 0, (y > xc[:, None]).sum(axis=1))
    runner = np.where(top, ys[:, 1], ys[:, 0])
    ids = batch.ids[idx]
    tokens = ids[rowsn, at].tolist()
    top1 = ids[rowsn, order[:, 0]].tolist()
    mom = batch.moments[idx].tolist()
    tail_of = tails.tolist()
    for j, ok, tok, t1, tl, x, rk, rn in zip(
        range(n), covered.tolist(), tokens, top1, y_max.tolist(), xc.tolist(), rank.tolist(), runner.tolist(), strict=True
    ):
        if not ok:
            continue
        lse, ent, varent, _, var, l2, _ = mom[j]
        st = RowStats(True, t1, tl, lse, max(ent, 0.0), max(varent, 0.0), min(math.exp(tl - lse), 1.0), max(var, 0.0), l2)
        nlp = lse - x
        prob = math.exp(-nlp)
        out[j] = Draw(st, Candidate(tok, nlp, prob, rk, prob - math.exp(rn - lse)), tail_of[j])
    return out
