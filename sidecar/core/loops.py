"""The loop guard: repeated n-grams of generated tokens, in O(1) per token. Pure.

Seed 001's "healthy loop" gap: a greedy loop ("the the the ...", a sentence again and
again) has low perplexity, low entropy and high variance, so every per-token signal
looks healthier than normal text. The guard counts n-grams of the generated tokens
(not the prompt) over a sliding window of ``window`` tokens. A candidate that would make
an n-gram occur more than ``max_repeats`` times is refused with a BLOCK trip, so the
redo excludes it and takes the next candidate: Hugging Face transformers'
``no_repeat_ngram_size`` (``max_repeats`` 1) as a heal instead of a logits mask. When
the guard has had to refuse tokens in more than ``max_heals`` of the last ``window``
steps, the loop persists and the next refusal halts (``action: halt`` halts at once).

Each n-gram is a Rabin-Karp hash modulo the Mersenne prime 2^61 - 1: the hash of the
last n - 1 tokens is rolled forward at each commit (drop the oldest, add the newest),
so a check is one multiply-add and a dictionary lookup, whatever n and the window.
Two different n-grams share a hash with probability about 2^-61 per pair.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from ..config import LoopGuardConfig
from .evaluators import Proposal
from .guards import Action, Trip

_P = (1 << 61) - 1
_B = 1_000_003  # base; any value in [2, P) works, fixed so that hashes are deterministic


class LoopGuard:
    name = "loop_guard"

    def __init__(self, cfg: LoopGuardConfig) -> None:
        self.cfg = cfg
        self._prefix: deque[int] = deque()  # the last n - 1 tokens
        self._prefix_hash = 0
        self._drop = pow(_B, max(cfg.n - 2, 0), _P)  # weight of the oldest prefix token
        self._grams: deque[int] = deque()  # hashes of the n-grams in the window, oldest first
        self._counts: dict[int, int] = {}
        self._heal_steps: deque[int] = deque()  # steps in the window where a token was refused
        self._step_refused = -1  # the step whose check refused a token, if any
        self.generated = 0

    def strict(self) -> bool:
        return False

    def _gram(self, token: int) -> int | None:
        """Hash of the n-gram ``token`` would complete (None before n tokens exist)."""
        if len(self._prefix) < self.cfg.n - 1:
            return None
        return (self._prefix_hash * _B + token + 1) % _P

    def check(self, p: Proposal) -> Sequence[Trip]:
        h = self._gram(p.token)
        seen = self._counts.get(h, 0) if h is not None else 0
        if seen < self.cfg.max_repeats:
            return ()
        self._step_refused = p.step
        heals = self._heals_in_window(p.step)
        n, limit = self.cfg.n, self.cfg.max_repeats
        if self.cfg.action == "halt" or heals >= self.cfg.max_heals:
            why = "action halt" if self.cfg.action == "halt" else f"{heals} steps healed in the last {self.cfg.window}"
            detail = f"loop: this {n}-gram already occurred {seen} times (max {limit}); the loop persists ({why})"
            return (Trip("loop", float(seen), float(limit), p.sampler, detail, Action.HALT, p.token),)
        detail = f"loop: this {n}-gram already occurred {seen} times in the last {self.cfg.window} tokens (max {limit})"
        return (Trip("loop", float(seen), float(limit), p.sampler, detail, Action.BLOCK, p.token),)

    def _heals_in_window(self, step: int) -> int:
        # commit keeps the deque pruned to the previous step's window: at most its oldest
        # entry has fallen out of this step's
        stale = 1 if self._heal_steps and self._heal_steps[0] <= step - self.cfg.window else 0
        return len(self._heal_steps) - stale

    def commit(self, p: Proposal) -> None:
        cfg = self.cfg
        if self._step_refused == p.step:
            self._heal_steps.append(p.step)
        while self._heal_steps and self._heal_steps[0] <= p.step - cfg.window:
            self._heal_steps.popleft()
        h = self._gram(p.token)
        if h is not None:
            self._grams.append(h)
            self._counts[h] = self._counts.get(h, 0) + 1
            if len(self._grams) > cfg.window:
                old = self._grams.popleft()
                left = self._counts[old] - 1
                if left:
                    self._counts[old] = left
                else:
                    del self._counts[old]
        if cfg.n > 1:  # roll the prefix hash: drop the oldest token, add this one
            if len(self._prefix) == cfg.n - 1:
                self._prefix_hash = (self._prefix_hash - (self._prefix.popleft() + 1) * self._drop) % _P
            self._prefix.append(p.token)
            self._prefix_hash = (self._prefix_hash * _B + p.token + 1) % _P
        self.generated += 1
