"""The evaluator seam (DESIGN §9): every check of a candidate has the same interface.

An evaluator belongs to one session. :meth:`Evaluator.check` judges a proposal against
the committed state without changing it; :meth:`Evaluator.commit` advances that state
once the step commits that proposal. :func:`sidecar.core.redo.decide` runs the
evaluators in order and owns the propose / evaluate / commit flow, so adding an
evaluator (the gate, the loop guard, a drift test) never edits that flow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

from ..config import GuardSet
from .fse import Cursor, Hit, Matcher, Scan
from .guards import Action, Sampler, TokenMetrics, Trip, enabled_checks, evaluate
from .values import Value


class Proposal(Value):
    """One candidate of one step, with the metrics of the row it was drawn from."""

    _fields = ("token", "sampler", "metrics", "step", "generated", "attempt", "now_s", "tail")
    __slots__ = _fields

    def __init__(
        self,
        token: int,
        sampler: Sampler,
        metrics: TokenMetrics,
        step: int,
        generated: int,
        attempt: int = 0,
        now_s: float = 0.0,
        tail: float = 1.0,
    ) -> None:
        self.token: Final = token
        self.sampler: Final = sampler
        self.metrics: Final = metrics
        self.step: Final = step
        self.generated: Final = generated  # tokens the session committed before this step
        self.attempt: Final = attempt  # 0 for the step's first proposal, then 1, 2, ... in the redo
        self.now_s: Final = now_s  # the step's timestamp (seconds), for time-based debounces
        # the drawing sampler's probability of a token no more probable than this one
        # (sampling.draw_normal; 1.0 for a greedy or strict draw, and when not known)
        self.tail: Final = tail


class Evaluator(Protocol):
    name: str

    def strict(self) -> bool:
        """Whether the step must start with the strict sampler (the gate's STRICT band)."""
        ...

    def check(self, p: Proposal) -> Sequence[Trip]:
        """Trips of ``p`` against the committed state; must not change that state."""
        ...

    def commit(self, p: Proposal) -> None:
        """``p`` is the step's committed token: advance the state."""
        ...


class TokenGuards:
    """Seed 000/001's per-token guards (thresholds on the candidate's metrics).

    ``calm``: whether the stream shows no sign of a hot sampler (the drift test's
    :meth:`~sidecar.core.evidence.DriftTest.calm`). Only then may a far-tail draw with a
    small tail go through (``guards.neg_logprob_min_tail``); without it, never."""

    name = "guards"

    def __init__(self, guards: GuardSet, calm: Callable[[], bool] | None = None) -> None:
        self.guards = guards
        self._checks = enabled_checks(guards)
        self._calm = calm

    def strict(self) -> bool:
        return False

    def check(self, p: Proposal) -> Sequence[Trip]:
        calm = p.tail < 1.0 and self._calm is not None and self._calm()
        return evaluate(p.metrics, self.guards, p.sampler, p.generated, self._checks, p.tail, calm)

    def commit(self, p: Proposal) -> None:
        pass


class PolicyRules:
    """The FSE matcher over the session's emitted text (block, halt and flag rules)."""

    name = "rules"

    def __init__(self, matcher: Matcher, tokens: Sequence[bytes]) -> None:
        self.matcher = matcher
        self.tokens = tokens
        self.cursor: Cursor = matcher.empty
        self._last: tuple[int, Scan] | None = None  # the last check, reused by its commit

    def strict(self) -> bool:
        return False

    def _scan(self, token: int) -> Scan:
        if self._last is not None and self._last[0] == token:
            return self._last[1]
        scan = self.matcher.scan(self.cursor, self.tokens[token])
        self._last = (token, scan)
        return scan

    def check(self, p: Proposal) -> Sequence[Trip]:
        # A pending match (ends the text so far) already counts for block and halt: its
        # last token must not go out. A flag waits until the match is confirmed.
        return [
            self._trip(h, p)
            for h in self._scan(p.token).hits
            if not (h.pending and self.matcher.rules[h.rule].action == Action.FLAG)
        ]

    def commit(self, p: Proposal) -> None:
        self.cursor = self._scan(p.token).cursor
        self._last = None

    def finish(self) -> list[Trip]:
        """Flag hits that only the end of the text confirms (at close)."""
        return [self._trip(h, None) for h in self.matcher.finish(self.cursor)]

    def _trip(self, h: Hit, p: Proposal | None) -> Trip:
        rule = self.matcher.rules[h.rule]
        action = rule.action.name.lower()
        return Trip(
            code=rule.id,
            value=1.0,
            threshold=0.0,
            sampler=p.sampler if p is not None else Sampler.NORMAL,
            detail=f"rule {rule.id} ({action}): match at bytes [{h.start}, {h.end})",
            action=rule.action,
            token_id=p.token if p is not None else -1,
            span_start=h.start,
            span_end=h.end,
        )
