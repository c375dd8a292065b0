"""The anytime-valid drift test: an e-process over the token stream (seed 004). Pure.

Null hypothesis H0, "the sampler is healthy": at every step t, given everything before,

    E[ -log p_t(X_t) ]  <=  H_t + delta

where p_t is the model's next-token distribution (the raw logits of the step), H_t its
entropy, X_t the token the step's first proposal draws, and delta = ``margin_nats``.

Why this null. For X_t drawn from p_t itself, E[-log p_t(X_t)] = H_t exactly. Greedy
decoding, a temperature below 1, top-k, top-p and min-p all move probability towards
likelier tokens, and -log p falls as p rises, so they can only lower that expectation
(Chebyshev's sum inequality): every usual healthy decoding satisfies H0 with delta = 0.
A temperature above 1 without truncation moves mass into the tail and breaks it: that
is the garbage this test is for. ``delta`` allows what is healthy but outside the
argument, chiefly the repetition penalty (it pushes mass off repeated tokens, which are
usually likely ones); ``fse-sidecar bench quality`` reports the per-token excess of
healthy runs it is calibrated from.

The bet. s_t = -log p_t(X_t) - H_t - delta is at least -(H_t + delta), and H_t is known
before X_t is drawn. With lam_t = c / max(H_t + delta, 1) for a fraction c in (0, 1), the
factor 1 + lam_t * s_t is at least 1 - c > 0, and under H0 its expectation is at most 1,
so the wealth W_t = prod (1 + lam_t s_t) is a non-negative supermartingale. The e-process
is the mean of the wealths for the fractions in ``bets`` (a mean of e-processes is one:
small bets are patient, large ones fast). Ville's inequality gives

    P_H0( there is a t with E_t >= 1/alpha ) <= alpha,

so a healthy stream is halted with probability at most alpha over the whole generation,
however long it runs. A crossing is permanent: the session halts.

Each step counts once: the first proposal of the step (the request's sampler, or the
strict one while the gate holds STRICT), whatever the redo commits in the end, so the
test watches the sampler, and healing a token does not hide the drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..config import DriftConfig
from .evaluators import Proposal
from .guards import Action, Trip


def log_factors(surprisal: np.ndarray | float, entropy: np.ndarray | float, cfg: DriftConfig) -> np.ndarray:
    """log(1 + lam * s) for every bet in ``cfg.bets`` (last axis); works on arrays of steps."""
    s = np.asarray(surprisal, dtype=np.float64) - np.asarray(entropy, dtype=np.float64) - cfg.margin_nats
    scale = np.maximum(np.asarray(entropy, dtype=np.float64) + cfg.margin_nats, 1.0)
    lam = np.asarray(cfg.bets, dtype=np.float64) / scale[..., None]
    return np.log1p(lam * s[..., None])


def log_e_value(log_wealths: np.ndarray) -> np.ndarray:
    """log of the mean of the wealths (last axis), computed without overflow."""
    top = np.max(log_wealths, axis=-1)
    return top + np.log(np.mean(np.exp(log_wealths - top[..., None]), axis=-1))


def _log_e_scalar(log_wealths: Sequence[float]) -> float:
    """:func:`log_e_value` for one stream, without numpy's per-call cost (the step path)."""
    top = max(log_wealths)
    return top + math.log(sum([math.exp(w - top) for w in log_wealths]) / len(log_wealths))


class DriftTest:
    """The e-process as an evaluator. Halts when the e-value reaches 1/alpha."""

    name = "drift"

    def __init__(self, cfg: DriftConfig) -> None:
        self.cfg = cfg
        self.log_wealths: tuple[float, ...] = (0.0,) * len(cfg.bets)
        self.crossed = False
        self._log_threshold = math.log(1.0 / cfg.alpha)
        # (step, wealths after its first proposal, their log e-value): reused by commit
        self._pending: tuple[int, tuple[float, ...], float] | None = None
        self._log_e = _log_e_scalar(self.log_wealths)  # of the committed wealths: every verdict reports it

    @property
    def e_value(self) -> float:
        return math.exp(min(self._log_e, 700.0))

    def strict(self) -> bool:
        return False

    def _factors(self, neg_logprob: float, entropy: float) -> tuple[float, ...]:
        """:func:`log_factors` for one step, in plain floats (tested equal)."""
        margin = self.cfg.margin_nats
        s = neg_logprob - entropy - margin
        scale = max(entropy + margin, 1.0)
        return tuple([math.log1p(c / scale * s) for c in self.cfg.bets])

    def check(self, p: Proposal) -> Sequence[Trip]:
        if p.attempt == 0 or self._pending is None or self._pending[0] != p.step:  # the step's first proposal
            m = p.metrics
            f = self._factors(m.neg_logprob, m.entropy)
            wealths = tuple([w + x for w, x in zip(self.log_wealths, f, strict=True)])
            self._pending = (p.step, wealths, _log_e_scalar(wealths))
        log_e = self._pending[2]
        if not (self.crossed or log_e >= self._log_threshold):
            return ()
        e = math.exp(min(log_e, 700.0))
        detail = (
            f"drift: e-value {e:.4g} >= 1/alpha = {1 / self.cfg.alpha:.4g}: the sampler is more surprising than "
            f"the model by more than {self.cfg.margin_nats} nats per token (false alarm rate <= {self.cfg.alpha})"
        )
        return (Trip("drift", e, 1.0 / self.cfg.alpha, p.sampler, detail, Action.HALT, p.token),)

    def commit(self, p: Proposal) -> None:
        if self._pending is not None and self._pending[0] == p.step:
            self.log_wealths = self._pending[1]
            self._log_e = self._pending[2]
            self.crossed = self.crossed or self._pending[2] >= self._log_threshold
        self._pending = None
