"""Samplers: Normal (temperature, top-k, top-p, min-p) and Strict (greedy).

Both apply the repetition penalty over the recent history (seed 000: greedy without it
falls into "boring loops"). A proposal is a pure function of (logits, history, params,
seed, step): the random draw is one uniform number derived from SHA-256 of the session
seed and the step (:func:`uniform`), so there is no hidden RNG state to advance and a
rejected proposal leaves nothing behind.

Pipeline of :func:`sample_normal`, in order:
    1. repetition penalty (CTRL rule: divide positive logits, multiply negative ones)
    2. temperature (T <= 0 means greedy)
    3. candidate set: tokens within ``CANDIDATE_NATS`` of the best after temperature
       (everything farther holds < vocab * e^-30 of the mass: < 6e-9 at 128k ids)
    4. min-p (p >= min_p * p_max), then top-k, then top-p over the candidates, ordered
       by (logit desc, id asc); min-p and top-k commute since both keep the best token
       (the order comes from a sort of the logits alone: ties are placed by id after)
    5. inverse-CDF draw with the step's uniform number
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, RowError
from .compact import MIN_K, CompactRow, check_covered

CANDIDATE_NATS = 30.0
_SAMPLE = 2048  # entries sampled to place the top-k window


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0.0 and np.isfinite(self.temperature), ">= 0"),
            ("top_k", 0 <= self.top_k < 2**32, "in [0, 2^32)"),  # u32 in the genesis bytes
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p < 1.0, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0.0 and np.isfinite(self.repetition_penalty), "> 0"),
            ("repetition_window", 0 <= self.repetition_window < 2**32, "in [0, 2^32)"),
            ("seed", 0 <= self.seed < 2**64, "in [0, 2^64)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"sampling.{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def canonical_bytes(self) -> bytes:
        """f64 temperature | u32 top_k | f64 top_p | f64 min_p | f64 repetition_penalty
        | u32 repetition_window | u64 seed: the effective values (VERDICT.md, genesis)."""
        return struct.pack(
            "<dIdddIQ",
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
            self.repetition_window,
            self.seed,
        )


def uniform(seed: int, step: int) -> float:
    """The step's uniform draw in [0, 1): the top 53 bits of SHA-256("fse.v1.rng"|seed|step)."""
    digest = hashlib.sha256(b"fse.v1.rng" + struct.pack("<QQ", seed, step)).digest()
    return (int.from_bytes(digest[:8], "little") >> 11) * (1.0 / (1 << 53))


def penalized(row: np.ndarray, history: Sequence[int], penalty: float, window: int) -> np.ndarray:
    """The row with the repetition penalty applied to ids in the last ``window`` tokens.

    Returns ``row`` itself when nothing changes (no copy on the common greedy path).
    """
    if penalty == 1.0 or window == 0 or not history:
        return row
    n = row.shape[0]
    recent = np.asarray(history[-window:], dtype=np.int64)
    recent = recent[(recent >= 0) & (recent < n)]
    out = np.array(row, dtype=np.float32, copy=True)
    # Values come from ``row``, not ``out``: a repeated id writes the same value twice,
    # so no de-duplication is needed.
    vals = row[recent]
    out[recent] = np.where(vals > 0, vals / np.float32(penalty), vals * np.float32(penalty))
    return out


def masked(row: np.ndarray, banned: Sequence[int]) -> np.ndarray:
    """The row with the ``banned`` ids at -inf (a copy; ``row`` itself when none are)."""
    if not banned:
        return row
    out = np.array(row, dtype=np.float32, copy=True)
    out[np.asarray(banned, dtype=np.int64)] = -np.inf
    return out


Row = np.ndarray | CompactRow  # a FULL row (vocab,) float32, or a COMPACT one


def prepared(row: Row, history: Sequence[int], params: SamplingParams, banned: Sequence[int]) -> tuple[np.ndarray, float]:
    """The row the draw runs on, penalised and masked, and the bound no token missing from
    it can exceed (-inf for a FULL row: none is missing). A COMPACT row's shipped entries are
    in id order, so every tie rule below (lowest id first) holds for them as it is."""
    if not isinstance(row, CompactRow):
        _check_row(row)
        return masked(penalized(row, history, params.repetition_penalty, params.repetition_window), banned), -math.inf
    y, bound = row.logits, row.floor
    recent = history[-params.repetition_window :] if params.repetition_window and params.repetition_penalty != 1.0 else ()
    if recent:
        pos, hit = _positions(row, recent)
        y = penalized(y, pos[hit].tolist(), params.repetition_penalty, len(recent))
        if params.repetition_penalty < 1.0 and not hit.all() and bound > -math.inf:
            # A penalty below 1 raises repeated tokens, shipped or not: bound what it can
            # make of a missing one (at most the floor, before the penalty).
            f = np.float32(bound)
            bound = float(f / np.float32(params.repetition_penalty) if f > 0 else f * np.float32(params.repetition_penalty))
    if banned:
        pos, hit = _positions(row, banned)
        y = masked(y, pos[hit].tolist())  # a banned token that was not shipped cannot be drawn anyway
    return y, bound


def _positions(row: CompactRow, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``ids`` among the row's shipped ids, and which of them were shipped."""
    want = np.asarray(ids, dtype=np.int64)
    pos = np.minimum(np.searchsorted(row.ids, want), row.k - 1)
    return pos, row.ids[pos] == want


def _token(row: Row, position: int) -> int:
    return int(row.ids[position]) if isinstance(row, CompactRow) and position >= 0 else position


def sample_strict(row: Row, history: Sequence[int], params: SamplingParams, banned: Sequence[int] = ()) -> int:
    """Greedy under the same repetition penalty, never one of ``banned``; -1 when every
    token is banned or at -inf."""
    y, bound = prepared(row, history, params, banned)
    best, y_max = _best(y)
    if isinstance(row, CompactRow):
        check_covered(row, y_max, "strict", bound)
    return _token(row, best)


def sample_normal(row: Row, history: Sequence[int], params: SamplingParams, step: int, banned: Sequence[int] = ()) -> int:
    """Draw a token with the request's parameters; deterministic in (inputs, seed, step).

    ``banned`` ids (tokens a policy rule excluded in this step) are masked before the
    draw, so with the same uniform number the draw moves to the next candidate of the
    renormalised distribution. -1 when every token is banned or at -inf.
    """
    return draw_normal(row, history, params, step, banned)[0]


def draw_normal(
    row: Row, history: Sequence[int], params: SamplingParams, step: int, banned: Sequence[int] = ()
) -> tuple[int, float]:
    """:func:`sample_normal`'s token and its *tail*: the probability that this sampler, at
    this step, draws a token no more probable than the one it drew (1.0 for a greedy draw,
    which could not have drawn anything else). A far-tail token with a small tail is a rare
    draw of a sampler that seldom goes there; with a large one, the sampler goes there often
    (it is hot)."""
    y, bound = prepared(row, history, params, banned)
    best, y_max = _best(y)
    if best < 0 or params.greedy:
        if isinstance(row, CompactRow):
            check_covered(row, y_max, "greedy", bound)
        return _token(row, best), 1.0
    t = params.temperature
    # Every kept token has a tempered logit within CANDIDATE_NATS of the best, and
    # min-p keeps p >= min_p * p_max, i.e. y >= y_max + T * ln(min_p): one exact floor.
    floor = y_max - t * CANDIDATE_NATS
    if params.min_p > 0.0:
        floor = max(floor, y_max + t * math.log(params.min_p))
    edge = floor  # the value that defines the support: its floor, or the top-k cut
    if params.top_k:
        # A window below the best that holds top_k tokens: one counting pass over the
        # vocabulary in the usual case, instead of a partition of all of it. The window
        # starts at an estimate of the (2 * top_k)-th best logit from a strided sample and
        # widens (doubling) only while it holds too few; the exact top_k is cut from it.
        width = max(y_max - _estimate_kth(y, 2 * params.top_k), t)
        thr = max(y_max - width, floor)
        cand = _nonzero(y >= thr)
        while thr > floor and cand.size < params.top_k:
            width *= 2.0
            thr = max(y_max - width, floor)
            cand = _nonzero(y >= thr)
        if cand.size > params.top_k:
            yc = y[cand]
            kth = np.partition(yc, cand.size - params.top_k)[cand.size - params.top_k]
            above = _nonzero(yc > kth)
            ties = _nonzero(yc == kth)[: params.top_k - above.size]  # lowest ids win ties
            cand = cand[np.concatenate([above, ties])]
            edge = float(kth)
        elif cand.size == params.top_k:
            edge = float(y[cand].min())
    else:
        cand = _nonzero(y >= floor)
    if isinstance(row, CompactRow):
        check_covered(row, edge, "normal", bound)
    # The canonical order is logit descending, id ascending. The weights and their sums
    # depend only on the logits in that order, so a sort of the float32 values gives them
    # (a SIMD sort: ~0.1 ms for 48k candidates, where np.lexsort of (id, logit) took 3 ms
    # for a temperature without top-k); the drawn place is mapped back to its id after,
    # within its run of equal logits by ascending id.
    yc = y[cand]
    asc = np.sort(yc)
    z = asc[::-1].astype(np.float64) / t
    w = np.exp(z - z[0])
    cdf = np.cumsum(w)
    if params.top_p < 1.0:
        cdf = cdf[: int(np.searchsorted(cdf, params.top_p * cdf[-1], side="left")) + 1]
    u = uniform(params.seed, step) * cdf[-1]
    idx = min(int(np.searchsorted(cdf, u, side="right")), cdf.size - 1)
    v = asc[asc.size - 1 - idx]
    # the first place of the drawn logit's run: the candidates above it
    first = asc.size - int(np.searchsorted(asc, v, side="right"))
    token = int(cand[_nonzero(yc == v)[idx - first]])
    # the mass from the first candidate as improbable as the drawn one (ties included) on
    below = float(cdf[first - 1]) if first else 0.0
    return _token(row, token), (float(cdf[-1]) - below) / float(cdf[-1])


def _best(y: np.ndarray) -> tuple[int, float]:
    """(argmax, max) of a row that can be sampled: argmax stops at the first NaN, so a NaN
    or +Inf anywhere shows in the max. -Inf entries are fine (probability 0); (-1, -inf)
    when every entry is -Inf."""
    best = int(y.argmax())
    y_max = float(y[best])
    if y_max == -math.inf:
        return -1, y_max
    if not math.isfinite(y_max):
        raise RowError(f"a logits row holding NaN or +Inf (here {y_max} at id {best}) cannot be sampled")
    return best, y_max


def _nonzero(mask: np.ndarray) -> np.ndarray:
    return mask.nonzero()[0]  # np.flatnonzero without its wrapper's overhead (1-D masks only)


def _estimate_kth(y: np.ndarray, k: int) -> float:
    """About the ``k``-th largest value of ``y``, from a strided sample of ~2048 entries."""
    n = y.shape[0]
    stride = max(n // _SAMPLE, 1)
    sub = y[::stride]
    r = min(max(-(-k * sub.shape[0] // n), 1), sub.shape[0])  # ceil(k * |sub| / n)
    return float(np.partition(sub, sub.shape[0] - r)[sub.shape[0] - r])


def _check_row(row: np.ndarray) -> None:
    if row.ndim != 1:
        raise RowError(f"a sampler takes one row (vocab,), got shape {row.shape}")


def entries_needed(params: SamplingParams, history: Sequence[int]) -> int:
    """How many entries a COMPACT row needs so that ``params``'s sampler is covered, or 0
    when no k short of the vocabulary is sure to (a temperature without top-k: its support
    reaches 30 nats below the best; a penalty below 1, which can lift any repeated token).

    The sampler's top-k (1 for greedy), plus every distinct token the repetition penalty can
    push down out of it, plus one below the cut so that a tie at the cut shows: an engine
    that ships this many top entries is never refused for coverage (RING.md), short of a
    policy rule blocking more than one token of the step."""
    if params.repetition_penalty < 1.0 or (not params.greedy and params.top_k == 0):
        return 0
    base = 1 if params.greedy else params.top_k
    window = history[-params.repetition_window :] if params.repetition_window and params.repetition_penalty != 1.0 else ()
    return max(base + len(set(window)) + 2, MIN_K)
