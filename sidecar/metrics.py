"""Glass Box metrics of next-token logits (pure, vectorised, numerically stable).

Metrics describe the *model's own* distribution: softmax of the raw logits (T = 1, no
repetition penalty). The sampler's transformations change which token is chosen, not
what the model's state was, so one set of distribution statistics serves the first
attempt and the strict redo alike.

Two steps, both over a batch ``(rows, vocab)``:

1. :func:`distribution_stats` - per-row statistics that do not depend on the chosen
   token: log-sum-exp, entropy, varentropy, top-1/top-2, logit variance, L2 norm, and
   whether the row is finite at all.
2. :func:`candidate_metrics` - the chosen token's -log p, probability, rank and margin.

A row holding NaN or +/-Inf gets ``finite = False`` and NaN metrics; the guard set turns
that into an abort. Nothing here raises on bad numbers and nothing warns.

Example:
    >>> import numpy as np
    >>> x = np.log(np.array([[0.5, 0.25, 0.25]], dtype=np.float32))
    >>> s = distribution_stats(x)
    >>> round(float(s.entropy[0]), 4)
    1.0397
    >>> c = candidate_metrics(x, s, np.array([1]))
    >>> int(c.rank[0]), round(float(c.neg_logprob[0]), 4), round(float(c.margin[0]), 4)
    (1, 1.3863, -0.25)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import RowError

_F32 = np.float32


@dataclass(frozen=True, slots=True)
class DistributionStats:
    """Per-row statistics; every field has shape (rows,)."""

    finite: np.ndarray  # bool
    top1: np.ndarray  # int64, argmax id (first on ties)
    top1_logit: np.ndarray  # float64
    top2_logit: np.ndarray  # float64, best logit among the other ids
    lse: np.ndarray  # float64, log-sum-exp
    entropy: np.ndarray  # float64, nats
    varentropy: np.ndarray  # float64, Var[-log p], nats^2
    max_prob: np.ndarray  # float64
    variance: np.ndarray  # float64, population variance of the logits
    l2_norm: np.ndarray  # float64


@dataclass(frozen=True, slots=True)
class CandidateMetrics:
    """Metrics of one chosen token per row; every field has shape (rows,)."""

    token: np.ndarray  # int64
    neg_logprob: np.ndarray  # float64, nats
    selected_prob: np.ndarray  # float64
    rank: np.ndarray  # int64, 0 = the most probable token
    margin: np.ndarray  # float64, p(chosen) - max p(other); = top1 - top2 when chosen is top1


def as_rows(logits: np.ndarray) -> np.ndarray:
    """View ``logits`` as a C-contiguous float32 batch (rows, vocab), copying only if needed."""
    x = np.asarray(logits)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] < 2:
        raise RowError(f"logits must have shape (rows, vocab) with vocab >= 2, got {x.shape}")
    if x.dtype != _F32:
        if x.dtype.kind != "f":
            raise RowError(f"logits must be floating point, got dtype {x.dtype}")
        x = x.astype(_F32)
    return np.ascontiguousarray(x)


def distribution_stats(logits: np.ndarray) -> DistributionStats:
    """Statistics of softmax(logits) per row. ``logits``: (rows, vocab) or (vocab,)."""
    x = as_rows(logits)
    n, v = x.shape
    rows = np.arange(n)
    with np.errstate(all="ignore"):
        top1 = np.argmax(x, axis=1)
        m = x[rows, top1]
        # Second best without a copy of the row: the best of the two slices around top1.
        top2 = np.empty(n, dtype=_F32)
        for r in range(n):  # loop over rows, never over the vocabulary
            i = int(top1[r])
            left = x[r, :i].max() if i > 0 else -np.inf
            right = x[r, i + 1 :].max() if i < v - 1 else -np.inf
            top2[r] = max(left, right)
        s = x - m[:, None]  # <= 0 everywhere for a finite row; keeps exp in range
        e = np.exp(s)
        z = e.sum(axis=1, dtype=np.float64)
        es = e * s
        s1 = es.sum(axis=1, dtype=np.float64)  # sum p*s * Z
        s2 = np.vecdot(es, s).astype(np.float64)  # sum p*s^2 * Z
        sum_s = s.sum(axis=1, dtype=np.float64)
        sum_ss = np.vecdot(s, s).astype(np.float64)
        m64 = m.astype(np.float64)
        log_z = np.log(z)
        mean_s = s1 / z
        entropy = log_z - mean_s
        varentropy = np.maximum(s2 / z - mean_s * mean_s, 0.0)
        # Logit variance and norm from the max-shifted row: shift-invariant, and small
        # magnitudes keep E[s^2] - E[s]^2 from cancelling catastrophically.
        mu_s = sum_s / v
        variance = np.maximum(sum_ss / v - mu_s * mu_s, 0.0)
        sq_norm = sum_ss + 2.0 * m64 * sum_s + v * m64 * m64
        l2 = np.sqrt(np.maximum(sq_norm, 0.0))
        finite = np.isfinite(sum_s) & np.isfinite(m64)
        if not finite.all():
            # A huge but finite row can overflow a float32 sum; decide exactly, per row.
            for r in np.flatnonzero(~finite):
                finite[r] = bool(np.isfinite(x[r]).all())
        nan = np.float64(np.nan)
        return DistributionStats(
            finite=finite,
            top1=top1.astype(np.int64),
            top1_logit=np.where(finite, m64, nan),
            top2_logit=np.where(finite, top2.astype(np.float64), nan),
            lse=np.where(finite, m64 + log_z, nan),
            entropy=np.where(finite, entropy, nan),
            varentropy=np.where(finite, varentropy, nan),
            max_prob=np.where(finite, 1.0 / z, nan),
            variance=np.where(finite, variance, nan),
            l2_norm=np.where(finite, l2, nan),
        )


def candidate_metrics(logits: np.ndarray, stats: DistributionStats, token: np.ndarray) -> CandidateMetrics:
    """Metrics of ``token[r]`` under row r's distribution."""
    x = as_rows(logits)
    n, v = x.shape
    tok = np.asarray(token, dtype=np.int64).reshape(-1)
    if tok.shape != (n,):
        raise RowError(f"need one token per row: {n} rows, {tok.shape[0]} tokens")
    if ((tok < 0) | (tok >= v)).any():
        raise RowError(f"token id out of range [0, {v}): {tok.tolist()}")
    rows = np.arange(n)
    with np.errstate(all="ignore"):
        xc = x[rows, tok]
        rank = np.count_nonzero(x > xc[:, None], axis=1).astype(np.int64)
        nlp = stats.lse - xc.astype(np.float64)
        p = np.exp(-nlp)
        is_top = tok == stats.top1
        runner = np.where(is_top, stats.top2_logit, stats.top1_logit)
        margin = p - np.exp(runner - stats.lse)
        nan = np.float64(np.nan)
        f = stats.finite
        return CandidateMetrics(
            token=tok,
            neg_logprob=np.where(f, nlp, nan),
            selected_prob=np.where(f, p, nan),
            rank=np.where(f, rank, -1),
            margin=np.where(f, margin, nan),
        )


def running_perplexity(sum_neg_logprob: float, count: int) -> float:
    """exp(mean -log p) over ``count`` committed tokens; 1.0 before the first token."""
    if count <= 0:
        return 1.0
    mean = sum_neg_logprob / count
    return float(np.exp(min(mean, 700.0)))  # clamp: exp(710) overflows float64
