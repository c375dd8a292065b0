"""The guard set: which metrics of a candidate trip which thresholds (pure).

A guard reads one number from :class:`TokenMetrics` and compares it with its threshold.
``non_finite`` is always on: a row with NaN or Inf cannot be judged and aborts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from ..config import GuardSet
from .values import Value


class Sampler(IntEnum):
    """Values match fse.v1.Sampler."""

    NORMAL = 1
    STRICT = 2


class Action(IntEnum):
    """What a trip asks of the redo. Values match fse.v1.Action."""

    REDO = 1  # a guard: redo with the strict sampler, abort when that trips too
    BLOCK = 2  # a block rule: exclude the candidate and redo
    HALT = 3  # a halt rule or an unrecoverable row: abort now
    FLAG = 4  # a flag rule: record only


class TokenMetrics(Value):
    """The Glass Box metrics of one candidate token (all floats are float64)."""

    _fields = (
        "token",
        "entropy",
        "neg_logprob",
        "rank",
        "margin",
        "selected_prob",
        "max_prob",
        "logit_variance",
        "l2_norm",
        "varentropy",
        "running_ppl",
        "finite",
    )
    __slots__ = _fields

    def __init__(
        self,
        token: int,
        entropy: float,
        neg_logprob: float,
        rank: int,
        margin: float,
        selected_prob: float,
        max_prob: float,
        logit_variance: float,
        l2_norm: float,
        varentropy: float,
        running_ppl: float,
        finite: bool = True,
    ) -> None:
        self.token: Final = token
        self.entropy: Final = entropy
        self.neg_logprob: Final = neg_logprob
        self.rank: Final = rank
        self.margin: Final = margin
        self.selected_prob: Final = selected_prob
        self.max_prob: Final = max_prob
        self.logit_variance: Final = logit_variance
        self.l2_norm: Final = l2_norm
        self.varentropy: Final = varentropy
        self.running_ppl: Final = running_ppl
        self.finite: Final = finite


@dataclass(frozen=True, slots=True)
class Trip:
    """One guard or rule that fired on one attempt (fse.v1.Reason)."""

    code: str
    value: float
    threshold: float
    sampler: Sampler
    detail: str = ""
    action: Action = Action.REDO
    token_id: int = -1  # the attempt's candidate
    span_start: int = 0  # a rule hit: its bytes in the emitted text, the candidate's appended
    span_end: int = 0

    @property
    def rejects(self) -> bool:
        """Whether the candidate cannot be committed (everything but a flag)."""
        return self.action != Action.FLAG


# (guard name, metric attribute, trips when metric is greater than threshold?)
_CHECKS: tuple[tuple[str, str, bool], ...] = (
    ("neg_logprob", "neg_logprob", True),
    ("entropy", "entropy", True),
    ("rank", "rank", True),
    ("margin", "margin", False),
    ("running_ppl", "running_ppl", True),
    ("logit_variance", "logit_variance", False),
    ("max_prob", "max_prob", True),
    ("l2_norm", "l2_norm", True),
)


def enabled_checks(guards: GuardSet) -> tuple[tuple[str, str, bool, float], ...]:
    """The guards that are on, in :data:`_CHECKS` order: (name, metric attribute, trips
    above?, threshold). A session computes them once."""
    return tuple((name, attr, above, g.threshold) for name, attr, above in _CHECKS if (g := getattr(guards, name)).enabled)


def evaluate(
    metrics: TokenMetrics,
    guards: GuardSet,
    sampler: Sampler,
    generated: int,
    checks: tuple[tuple[str, str, bool, float], ...] | None = None,
    tail: float = 1.0,
    calm: bool = False,
) -> list[Trip]:
    """Every guard that trips for this candidate, in a fixed order.

    ``generated`` is how many tokens the session has committed before this one (for the
    perplexity warm-up); ``checks``: :func:`enabled_checks` of ``guards`` if known;
    ``tail``: the drawing sampler's probability of a token no more probable than this one
    (1.0 for a greedy or strict draw). A far-tail token (-log p over its threshold) whose
    tail is under ``guards.neg_logprob_min_tail`` is a rare draw of a sampler that seldom
    goes there: while the stream is ``calm`` (the drift test sees no sign of a hot sampler)
    it is let through with a FLAG saying so; otherwise, and for a sampler that often goes
    there, the draw is redone.
    """
    if not metrics.finite:
        return [Trip("non_finite", math.nan, 0.0, sampler, "logits row holds NaN or Inf", Action.HALT)]
    trips: list[Trip] = []
    for name, attr, above, threshold in enabled_checks(guards) if checks is None else checks:
        if name == "running_ppl" and generated < guards.ppl_warmup_tokens:
            continue
        value = float(getattr(metrics, attr))
        if (value > threshold) if above else (value < threshold):
            op = ">" if above else "<"
            detail = f"{name} {value:.6g} {op} {threshold:.6g}"
            if name == "neg_logprob" and tail < 1.0:  # a sampled draw: how often its sampler goes there
                detail += f"; the sampler's tail was {tail:.3g}"
                if calm and tail < guards.neg_logprob_min_tail:
                    detail += f" (< {guards.neg_logprob_min_tail:.6g}, a calm stream): a rare draw, let through"
                    trips.append(Trip(name, value, threshold, sampler, detail, Action.FLAG, metrics.token))
                    continue
            trips.append(Trip(name, value, threshold, sampler, detail, token_id=metrics.token))
    return trips


def health_band(running_ppl: float) -> int:
    """fse.v1.HealthBand: 1 healthy (< 200), 2 drifting (200..400), 3 halt (> 400)."""
    if not running_ppl < 200.0:
        return 3 if not running_ppl <= 400.0 else 2
    return 1
