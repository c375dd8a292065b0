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

Two e-processes run side by side. The *sampler's* counts each step once, on its first
proposal (the request's sampler, or the strict one while the gate holds STRICT), whatever
the redo commits, so healing a token does not hide a drifting sampler. The *committed*
one counts the token each step commits: what the user is given.

Heal first (``on_drift: protect``, the default). When the sampler's e-value reaches
1/alpha the session enters the *protective band*: each step's sampler draw is rejected
(a REDO trip, so the strict sampler redoes it and the verdict is HEALED, the trip saying
why) and the answer goes on, readable, instead of ending as a stub. The sampler's
evidence is restarted at the entry (capped at 1 while the band holds) and the band is
left once it has stayed below ``release_e`` for ``release_tokens`` tokens: hysteresis
(1/alpha to enter, release_e to leave) and debounce, seed 003's mechanism; the step after
the release carries a FLAG saying so. Only the committed e-process reaching 1/alpha
halts the session: what healing cannot hold. ``on_drift: halt`` aborts at the sampler's
crossing instead, as before. Both keep Ville's bound: a healthy sampler enters the band
(or is halted) with probability at most alpha over the whole generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..config import DriftConfig
from .evaluators import Proposal
from .guards import Action, Sampler, Trip


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


def _e(log_e: float) -> float:
    """An e-value from its log, bounded so that a runaway stream never overflows."""
    return math.exp(min(log_e, 700.0))


class DriftTest:
    """The e-processes as an evaluator: the protective band on the sampler's, a halt on the
    committed tokens' (or on the sampler's, with ``on_drift: halt``)."""

    name = "drift"

    def __init__(self, cfg: DriftConfig) -> None:
        self.cfg = cfg
        self.log_wealths: tuple[float, ...] = (0.0,) * len(cfg.bets)  # the sampler's
        self.committed_wealths: tuple[float, ...] = (0.0,) * len(cfg.bets)
        self.crossed = False  # halted (the committed stream, or the sampler with on_drift halt)
        self.protecting = False
        self._below = 0  # consecutive tokens the protected sampler's e-value stayed below release_e
        self._released = False  # the band ended at the last commit: the next step says so
        self._log_threshold = math.log(1.0 / cfg.alpha)
        self._log_release = math.log(cfg.release_e)
        # (step, the sampler's wealths after its first proposal, their log e-value): reused by commit
        self._pending: tuple[int, tuple[float, ...], float] | None = None
        self._committed: tuple[Proposal, tuple[float, ...], float] | None = None  # the last candidate's
        self._log_e = _log_e_scalar(self.log_wealths)  # of the sampler's committed wealths: every verdict reports it

    @property
    def e_value(self) -> float:
        return _e(self._log_e)

    def strict(self) -> bool:
        return False

    def calm(self) -> bool:
        """Whether the sampler shows no sign of running hot: outside the protective band,
        and its e-value (the evidence so far) under ``release_e``, the level at which the
        band would end. A healthy stream's e-value falls well under it within a few tokens;
        a hot one's rises."""
        return not (self.crossed or self.protecting) and self._log_e < self._log_release

    def _factors(self, neg_logprob: float, entropy: float) -> tuple[float, ...]:
        """:func:`log_factors` for one step, in plain floats (tested equal)."""
        margin = self.cfg.margin_nats
        s = neg_logprob - entropy - margin
        scale = max(entropy + margin, 1.0)
        return tuple([math.log1p(c / scale * s) for c in self.cfg.bets])

    def _candidate(self, p: Proposal) -> tuple[tuple[float, ...], float]:
        """The committed stream's wealths and log e-value if ``p`` were committed."""
        if self._committed is not None and self._committed[0] is p:
            return self._committed[1], self._committed[2]
        m = p.metrics
        f = self._factors(m.neg_logprob, m.entropy)
        wealths = tuple([w + x for w, x in zip(self.committed_wealths, f, strict=True)])
        out = (wealths, _log_e_scalar(wealths))
        self._committed = (p, *out)
        return out

    def _halt(self, p: Proposal, e: float, what: str) -> Trip:
        detail = (
            f"drift: e-value {e:.4g} >= 1/alpha = {1 / self.cfg.alpha:.4g}: {what} is more surprising than "
            f"the model by more than {self.cfg.margin_nats} nats per token (false alarm rate <= {self.cfg.alpha})"
        )
        return Trip("drift", e, 1.0 / self.cfg.alpha, p.sampler, detail, Action.HALT, p.token)

    def check(self, p: Proposal) -> Sequence[Trip]:
        first = p.attempt == 0 or self._pending is None or self._pending[0] != p.step
        if first:  # the step's first proposal: the sampler's evidence
            m = p.metrics
            f = self._factors(m.neg_logprob, m.entropy)
            wealths = tuple([w + x for w, x in zip(self.log_wealths, f, strict=True)])
            self._pending = (p.step, wealths, _log_e_scalar(wealths))
        assert self._pending is not None
        log_e = self._pending[2]
        if self.cfg.on_drift == "halt":
            if self.crossed or log_e >= self._log_threshold:
                return (self._halt(p, _e(log_e), "the sampler"),)
            return ()
        if self.crossed:
            return (self._halt(p, self.committed_e, "what the session commits"),)
        trips: list[Trip] = []
        if first and p.sampler == Sampler.NORMAL and (self.protecting or log_e >= self._log_threshold):
            e = _e(log_e)
            if self.protecting:
                why = (
                    f"drift: protective band: the sampler's e-value since the band began is {e:.3g} (it ends once "
                    f"below {self.cfg.release_e:g} for {self.cfg.release_tokens} tokens); the strict sampler redoes the token"
                )
            else:
                why = (
                    f"drift: e-value {e:.4g} >= 1/alpha = {1 / self.cfg.alpha:.4g}: the sampler drifts; the session "
                    "enters the protective band (the strict sampler until the sampler recovers)"
                )
            trips.append(Trip("drift", e, 1.0 / self.cfg.alpha, p.sampler, why, Action.REDO, p.token))
        elif first and self._released:
            why = (
                f"drift: the sampler recovered (e-value below {self.cfg.release_e:g} for "
                f"{self.cfg.release_tokens} tokens): the protective band ends"
            )
            trips.append(Trip("drift", self.e_value, self.cfg.release_e, p.sampler, why, Action.FLAG, p.token))
        if not any(t.rejects for t in trips):  # this candidate may be committed: what it would add
            _w, committed_log_e = self._candidate(p)
            if committed_log_e >= self._log_threshold:
                trips.append(self._halt(p, _e(committed_log_e), "what the session commits"))
        return trips

    @property
    def committed_e(self) -> float:
        return _e(_log_e_scalar(self.committed_wealths))

    def commit(self, p: Proposal) -> None:
        self._released = False
        if self._pending is not None and self._pending[0] == p.step:
            wealths, log_e = self._pending[1], self._pending[2]
            if self.cfg.on_drift == "halt":
                self.crossed = self.crossed or log_e >= self._log_threshold
            elif not self.protecting and log_e >= self._log_threshold:
                self.protecting, self._below = True, 0
                wealths = (0.0,) * len(wealths)  # the evidence restarts at the entry
            elif self.protecting:
                wealths = tuple([min(w, 0.0) for w in wealths])  # capped at e = 1 while the band holds
                log_e = _log_e_scalar(wealths)
                self._below = self._below + 1 if log_e < self._log_release else 0
                if self._below >= self.cfg.release_tokens:
                    self.protecting, self._released = False, True
                    wealths = (0.0,) * len(wealths)  # a fresh test for the next episode
            self.log_wealths = wealths
            self._log_e = _log_e_scalar(wealths)
        if self.cfg.on_drift == "protect":
            committed, committed_log_e = self._candidate(p)
            self.committed_wealths = committed
            self.crossed = self.crossed or committed_log_e >= self._log_threshold
        self._pending = None
        self._committed = None
