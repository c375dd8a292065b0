"""The windowed risk gate: signals over recent tokens, a risk score, bands with
hysteresis and debounce (seed 003's mechanism in this domain's words). Pure.

Why windows: a running perplexity is a mean from step 0, so a long healthy prefix
dilutes a burst of garbage and a budget of ~6 nats per token lets word salad through
once the mean has room. The gate looks at exponentially weighted means over about
``window`` tokens instead (the first tokens average plainly, so the start is not biased
towards zero):

    nlp_t     windowed mean of -log p of the committed tokens      (nats)
    ent_t     windowed mean of the entropy of their distributions  (nats)
    lrank_t   windowed mean of log(1 + rank)
    ppl_t     exp(nlp_t): the windowed perplexity

    risk_t = w_nlp * min(nlp_t / nlp_scale, 1) + w_ent * min(ent_t / ent_scale, 1)
           + w_rank * min(lrank_t / lrank_scale, 1)                 in [0, 1]

Bands on the risk score: HEALTHY < drifting edge <= DRIFTING < strict edge <= STRICT
< halt edge <= HALT. Moving to another band needs the score past the current band's
edge by the hysteresis margin; the new band is then *pending* and becomes current only
after ``debounce_tokens`` consecutive tokens (and ``debounce_s`` seconds, if set) with the
same target; a token whose target is the current band cancels it. STRICT takes every
token from the strict sampler while it lasts; HALT aborts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import IntEnum
from typing import Final

from ..config import GateConfig
from .evaluators import Proposal
from .guards import Action, Trip
from .values import Value


class Band(IntEnum):
    """Values match fse.v1.GateBand."""

    HEALTHY = 1
    DRIFTING = 2
    STRICT = 3
    HALT = 4


class Signals(Value):
    _fields = ("n", "nlp", "ent", "lrank")
    __slots__ = _fields

    def __init__(self, n: int = 0, nlp: float = 0.0, ent: float = 0.0, lrank: float = 0.0) -> None:
        self.n: Final = n  # committed tokens seen
        self.nlp: Final = nlp
        self.ent: Final = ent
        self.lrank: Final = lrank

    def add(self, neg_logprob: float, entropy: float, rank: int, window: int) -> Signals:
        w = max(2.0 / (window + 1), 1.0 / (self.n + 1))  # plain mean until the window fills
        return Signals(
            self.n + 1,
            self.nlp + w * (neg_logprob - self.nlp),
            self.ent + w * (entropy - self.ent),
            self.lrank + w * (math.log1p(max(rank, 0)) - self.lrank),
        )

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nlp, 700.0))


def risk(s: Signals, cfg: GateConfig) -> float:
    w_nlp, w_ent, w_rank = cfg.weights
    return (
        w_nlp * min(s.nlp / cfg.neg_logprob_scale, 1.0)
        + w_ent * min(s.ent / cfg.entropy_scale, 1.0)
        + w_rank * min(s.lrank / cfg.log_rank_scale, 1.0)
    )


def raw_band(score: float, cfg: GateConfig) -> Band:
    e = cfg.edges
    if score >= e.halt:
        return Band.HALT
    if score >= e.strict:
        return Band.STRICT
    return Band.DRIFTING if score >= e.drifting else Band.HEALTHY


def _edges(band: Band, cfg: GateConfig) -> tuple[float, float]:
    """(lower, upper) edge of ``band`` on the risk score."""
    e = cfg.edges
    if band == Band.HEALTHY:
        return -math.inf, e.drifting
    if band == Band.DRIFTING:
        return e.drifting, e.strict
    return (e.strict, e.halt) if band == Band.STRICT else (e.halt, math.inf)


def target(score: float, current: Band, cfg: GateConfig) -> Band:
    """The band the score points to, once it clears the current band by the margin."""
    raw = raw_band(score, cfg)
    lower, upper = _edges(current, cfg)
    if raw > current:
        return raw if score >= upper + cfg.hysteresis else current
    if raw < current:
        return raw if score < lower - cfg.hysteresis else current
    return current


class GateState(Value):
    _fields = ("current", "pending", "pending_tokens", "pending_since_s")
    __slots__ = _fields

    def __init__(
        self,
        current: Band = Band.HEALTHY,
        pending: Band | None = None,
        pending_tokens: int = 0,
        pending_since_s: float = 0.0,
    ) -> None:
        self.current: Final = current
        self.pending: Final = pending
        self.pending_tokens: Final = pending_tokens  # consecutive tokens that pointed to ``pending``
        self.pending_since_s: Final = pending_since_s


def advance(state: GateState, score: float, now_s: float, cfg: GateConfig) -> GateState:
    """One token's update: seed 003's ``advance_state`` with a token debounce beside time."""
    if state.pending is None and raw_band(score, cfg) == state.current:
        return state  # most tokens: still in the current band, nothing pending
    t = target(score, state.current, cfg)
    if t == state.current:  # back in the current band: the pending one is cancelled
        return state if state.pending is None else GateState(state.current)
    if state.pending != t:
        state = GateState(state.current, t, 0, now_s)  # a new target restarts the debounce
    state = GateState(state.current, state.pending, state.pending_tokens + 1, state.pending_since_s)
    if state.pending_tokens >= cfg.debounce_tokens and now_s - state.pending_since_s >= cfg.debounce_s:
        return GateState(t)
    return state


class GateView(Value):
    """What a verdict reports of the gate after a step."""

    _fields = ("band", "pending", "risk", "signals")
    __slots__ = _fields

    def __init__(self, band: Band, pending: Band | None, risk: float, signals: Signals) -> None:
        self.band: Final = band
        self.pending: Final = pending
        self.risk: Final = risk
        self.signals: Final = signals


class RiskGate:
    """The gate as an evaluator: judges a candidate by the band its token would lead to."""

    name = "gate"

    def __init__(self, cfg: GateConfig) -> None:
        self.cfg = cfg
        self.signals = Signals()
        self.state = GateState()
        self.risk = 0.0
        self._last: tuple[Proposal, tuple[Signals, float, GateState]] | None = None  # reused by commit

    def strict(self) -> bool:
        return self.state.current >= Band.STRICT

    def _next(self, p: Proposal) -> tuple[Signals, float, GateState]:
        if self._last is not None and (self._last[0] is p or self._last[0] == p):
            return self._last[1]
        m = p.metrics
        sig = self.signals.add(m.neg_logprob, m.entropy, m.rank, self.cfg.window)
        score = risk(sig, self.cfg)
        out = (sig, score, advance(self.state, score, p.now_s, self.cfg))
        self._last = (p, out)
        return out

    def check(self, p: Proposal) -> Sequence[Trip]:
        _sig, score, nxt = self._next(p)
        if nxt.current < Band.HALT:
            return ()
        halt = self.cfg.edges.halt
        detail = f"gate: risk {score:.3f} held in the HALT band (>= {halt}) for {self.cfg.debounce_tokens} tokens"
        return (Trip("gate", score, halt, p.sampler, detail, Action.HALT, p.token),)

    def commit(self, p: Proposal) -> None:
        self.signals, self.risk, self.state = self._next(p)
        self._last = None

    def view(self) -> GateView:
        return GateView(self.state.current, self.state.pending, self.risk, self.signals)
