"""COMPACT rows: the top-k of a logits row plus the whole row's moments (pure).

A GPU engine computes, on its device, the moments of the full row (log-sum-exp, entropy,
varentropy, mean, variance, L2 norm, max) and its k largest logits with their ids, and
ships those instead of the vocabulary (DESIGN §3, RING.md "COMPACT rows"): a few hundred
bytes a row instead of 256-512 KB at 128k ids.

Every statistic the guards read comes from the moments; every sampler runs on the shipped
entries, kept in id order so that the dense code's tie rules (lowest id first) hold as
they are. The decision equals the FULL row's exactly when the shipped entries hold the
sampler's whole support: no token outside them could be drawn. That is checked on every
draw (:func:`check_covered`): the smallest shipped logit bounds every token that was not
shipped, so a support whose defining threshold lies strictly above that bound is covered.
A row that does not cover it is refused (:class:`~sidecar.errors.CoverageError`), never
judged on a guess; the engine sends that row FULL (engine_adapters choose by the request's
sampler: greedy or top-k).

Example:
    >>> import numpy as np
    >>> x = np.log(np.array([0.5, 0.2, 0.2, 0.1], dtype=np.float32))
    >>> c = compact_from_logits(x, 2)
    >>> c.ids.tolist(), round(c.stats().entropy, 4)
    ([0, 1], 1.2206)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np

from ..errors import CoverageError, RowError
from .metrics import Candidate, RowStats, candidate_at
from .values import Value

MIN_K = 2  # the top token's margin needs its runner-up
# Slack for float32 arithmetic on the engine's device when checking its moments against the
# shipped entries (a log-sum-exp over 128k float32 terms is good to ~1e-5 relative).
_TOL = 1e-3


class Moments(NamedTuple):
    """Full-vocabulary moments of a row, in the ring's order (RING.md ``MOMENTS``)."""

    log_sum_exp: float
    entropy: float  # nats, of softmax(x)
    varentropy: float  # Var[-log p]
    mean: float  # of the logits
    variance: float  # population variance of the logits
    l2_norm: float
    max: float


@dataclass(frozen=True, slots=True)
class CompactRow:
    """The shipped entries of a row, in ascending id order, and the row's moments.

    Build it with :meth:`from_top` (which validates); ``floor`` is the smallest shipped
    logit, an upper bound on every logit that was not shipped (-inf when all were).
    """

    vocab_size: int
    ids: np.ndarray  # int64 (k,), strictly ascending
    logits: np.ndarray  # float32 (k,), aligned with ids
    moments: Moments
    floor: float

    @property
    def k(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_top(cls, vocab_size: int, moments: np.ndarray, top_logits: np.ndarray, top_ids: np.ndarray) -> CompactRow:
        """Validate what an engine shipped: ``top_logits`` highest first (ties in any
        order), ``top_ids`` their distinct ids below ``vocab_size``, ``moments`` the 7
        values of :class:`Moments` (an 8th, reserved, is ignored).

        A NaN or Inf anywhere is not an error here: the row is non-finite, which the guards
        turn into an ABORT, as for a FULL row.
        """
        m = np.asarray(moments, dtype=np.float64).reshape(-1)
        vals = np.asarray(top_logits)
        ids = np.asarray(top_ids)
        k = vals.shape[0] if vals.ndim == 1 else -1
        if m.shape[0] not in (7, 8):
            raise RowError(f"a COMPACT row carries 7 moments, got {m.shape[0]}")
        if k < MIN_K or ids.shape != (k,):
            raise RowError(f"a COMPACT row needs k >= {MIN_K} logits and as many ids, got {vals.shape} and {ids.shape}")
        if k > vocab_size:
            raise RowError(f"a COMPACT row of {k} entries exceeds the vocabulary of {vocab_size}")
        if ids.dtype.kind not in "iu" or vals.dtype.kind != "f":
            raise RowError(f"COMPACT ids must be integers and logits floating point, got {ids.dtype} and {vals.dtype}")
        ids64 = ids.astype(np.int64)
        if int(ids64.min()) < 0 or int(ids64.max()) >= vocab_size:
            raise RowError(f"COMPACT token ids must be in [0, {vocab_size}), got [{int(ids64.min())}, {int(ids64.max())}]")
        v32 = vals.astype(np.float32)
        order = np.argsort(ids64, kind="stable")
        sid = ids64[order]
        if (sid[1:] == sid[:-1]).any():
            raise RowError(f"COMPACT token ids must be distinct; {int(sid[1:][sid[1:] == sid[:-1]][0])} repeats")
        mom = Moments(*[float(x) for x in m[:7]])
        finite = bool(np.isfinite(v32).all()) and all(math.isfinite(x) for x in mom)
        if finite:
            if (np.diff(v32) > 0).any():
                raise RowError("COMPACT logits must be shipped highest first")
            if abs(mom.max - float(v32[0])) > _TOL * max(1.0, abs(mom.max)):
                raise RowError(f"COMPACT moments disagree with the entries: max {mom.max} but the top logit is {float(v32[0])}")
            shipped = float(v32[0]) + math.log(float(np.exp(v32.astype(np.float64) - float(v32[0])).sum()))
            if mom.log_sum_exp < shipped - _TOL or mom.log_sum_exp > mom.max + math.log(vocab_size) + _TOL:
                raise RowError(
                    f"COMPACT log_sum_exp {mom.log_sum_exp} is impossible: the shipped entries alone give {shipped}, "
                    f"a vocabulary of {vocab_size} at most {mom.max + math.log(vocab_size)}"
                )
            if mom.entropy < -_TOL or mom.varentropy < -_TOL or mom.variance < -_TOL or mom.l2_norm < 0:
                raise RowError("COMPACT moments must have non-negative entropy, varentropy, variance and L2 norm")
        floor = float(v32[-1]) if k < vocab_size else -math.inf
        return cls(vocab_size, sid, np.ascontiguousarray(v32[order]), mom, floor)

    def stats(self) -> RowStats:
        """The row's :class:`RowStats`, from the moments (no pass over the vocabulary)."""
        m = self.moments
        if not (math.isfinite(self.floor) or self.k == self.vocab_size) or not all(math.isfinite(x) for x in m):
            return RowStats(False, int(self.ids[0]), *(math.nan,) * 7)
        if not np.isfinite(self.logits).all():
            return RowStats(False, int(self.ids[0]), *(math.nan,) * 7)
        i = int(self.logits.argmax())  # first in id order on ties, as argmax over the vocabulary
        top = float(self.logits[i])
        return RowStats(
            finite=True,
            top1=int(self.ids[i]),
            top1_logit=top,
            lse=m.log_sum_exp,
            entropy=max(m.entropy, 0.0),
            varentropy=max(m.varentropy, 0.0),
            max_prob=min(math.exp(top - m.log_sum_exp), 1.0),
            variance=max(m.variance, 0.0),
            l2_norm=m.l2_norm,
        )

    def position(self, token: int) -> int:
        """Where ``token`` is among the shipped entries; CoverageError if it was not shipped."""
        p = int(np.searchsorted(self.ids, token))
        if p >= self.k or int(self.ids[p]) != token:
            raise CoverageError(f"token {token} is not among the COMPACT row's {self.k} entries; send the row FULL")
        return p

    def candidate(self, st: RowStats, token: int) -> Candidate:
        """:func:`sidecar.core.metrics.candidate` for a shipped token. Exact: every token
        that was not shipped is at most ``floor``, which is at most the token's logit."""
        if not st.finite:
            return Candidate(token, math.nan, math.nan, -1, math.nan)
        return candidate_at(self.logits, self.position(token), st, token)

    def tail_log_mass(self) -> float:
        """log of the probability mass (times e^lse) the shipped entries do not hold; -inf if none."""
        if self.k == self.vocab_size:
            return -math.inf
        lse = self.moments.log_sum_exp
        top = float(self.logits.max())
        shipped = top + math.log(float(np.exp(self.logits.astype(np.float64) - top).sum()))
        rest = -math.expm1(shipped - lse)  # 1 - Z_shipped / Z
        return lse + math.log(rest) if rest > 0 else -math.inf


@dataclass(frozen=True, slots=True)
class CompactBatch:
    """Many COMPACT rows of one k, validated in one pass (a batched engine's frame).

    Arrays hold one row each, in the layout of :class:`CompactRow` (entries in ascending
    id order); ``errors`` holds, per row, the :class:`~sidecar.errors.RowError` that
    :meth:`CompactRow.from_top` raises for it, or None. A row with an error refuses that
    row alone. :meth:`row` gives the row as a :class:`CompactRow`, equal to what
    ``from_top`` builds from the same entries.
    """

    vocab_size: int
    ids: np.ndarray  # int64 (B, k), each row strictly ascending
    logits: np.ndarray  # float32 (B, k), aligned with ids
    moments: np.ndarray  # float64 (B, 7)
    floor: np.ndarray  # float64 (B,): the smallest shipped logit (-inf when k is the vocabulary)
    finite: np.ndarray  # bool (B,): every moment and entry finite (what the guards need to judge it)
    errors: tuple[RowError | None, ...]
    # The samplers' order, kept from the engine's own (highest first) instead of sorted again:
    # per row, the places in id order of the entries by logit descending, lowest id first on
    # ties, and the logits in that order (meaningful for the rows without an error).
    desc: np.ndarray  # intp (B, k)
    desc_logits: np.ndarray  # float32 (B, k)

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_top(cls, vocab_size: int, moments: np.ndarray, top_logits: np.ndarray, top_ids: np.ndarray) -> CompactBatch:
        """:meth:`CompactRow.from_top` for B rows at once: ``moments`` (B, 7 or 8),
        ``top_logits`` (B, k) highest first, ``top_ids`` (B, k). Each rule is checked for
        every row with the same arithmetic as the single row's (so the same rows pass);
        a row that breaks one gets the single row's own error."""
        m = np.asarray(moments, dtype=np.float64)
        vals, ids = np.asarray(top_logits), np.asarray(top_ids)
        if m.ndim != 2 or vals.ndim != 2 or ids.shape != vals.shape or m.shape[0] != vals.shape[0]:
            shapes = f"{m.shape}, {vals.shape}, {ids.shape}"
            raise RowError(f"a COMPACT batch takes (B, 8) moments, (B, k) logits and ids; got {shapes}")
        rows, k = vals.shape
        if rows == 0:
            raise RowError("a COMPACT batch needs at least one row")
        if m.shape[1] not in (7, 8) or k < MIN_K or k > vocab_size or ids.dtype.kind not in "iu" or vals.dtype.kind != "f":
            CompactRow.from_top(vocab_size, m[0], vals[0], ids[0])  # raises the rule all rows break alike
        ids64 = ids.astype(np.int64)
        v32 = vals.astype(np.float32)
        mom = np.ascontiguousarray(m[:, :7])
        order = np.argsort(ids64, axis=1)  # distinct in a valid row: no ties to keep in order
        flat = (order + np.arange(0, rows * k, k)[:, None]).ravel()  # `order` as places in the flat (B*k) arrays
        sid = ids64.ravel()[flat].reshape(rows, k)
        v_id = v32.ravel()[flat].reshape(rows, k)
        bad = (ids64.min(axis=1) < 0) | (ids64.max(axis=1) >= vocab_size) | (sid[:, 1:] == sid[:, :-1]).any(axis=1)
        finite = np.asarray(np.isfinite(v32).all(axis=1) & np.isfinite(mom).all(axis=1), dtype=bool)
        check = finite & ~bad
        if check.any():
            with np.errstate(all="ignore"):
                top = v32[:, 0].astype(np.float64)
                mx = mom[:, 6]
                # the single row's float64 sum, row by row (the same pairwise sums), and math.log
                sums = np.exp(v32.astype(np.float64) - top[:, None]).sum(axis=1)
                shipped = top + np.array([math.log(x) if x > 0 else -math.inf for x in sums.tolist()])
                bad |= check & (
                    (v32[:, 1:] > v32[:, :-1]).any(axis=1)
                    | (np.abs(mx - top) > _TOL * np.maximum(1.0, np.abs(mx)))
                    | (mom[:, 0] < shipped - _TOL)
                    | (mom[:, 0] > mx + math.log(vocab_size) + _TOL)
                    | (mom[:, 1] < -_TOL)
                    | (mom[:, 2] < -_TOL)
                    | (mom[:, 4] < -_TOL)
                    | (mom[:, 5] < 0)
                )
        errors: list[RowError | None] = [None] * rows
        for i in np.flatnonzero(bad).tolist():
            try:
                CompactRow.from_top(vocab_size, m[i], vals[i], ids[i])
            except RowError as exc:
                errors[i] = exc
            else:  # pragma: no cover - the two checks must agree
                raise AssertionError(f"COMPACT batch row {i} was refused by the batch check but not by the single one")
        floor = v32[:, -1].astype(np.float64) if k < vocab_size else np.full(rows, -math.inf)
        # A valid row is shipped highest first, so the inverse of `order` lists the entries by
        # logit descending; where two logits tie, the row is sorted again for its tie rule.
        desc = np.empty(rows * k, dtype=np.intp)
        desc[flat] = np.arange(rows * k) % k
        desc = desc.reshape(rows, k)
        for i in np.flatnonzero((v32[:, 1:] == v32[:, :-1]).any(axis=1)).tolist():
            desc[i] = np.argsort(-v_id[i], kind="stable")
        return cls(vocab_size, sid, v_id, mom, floor, finite, tuple(errors), desc, np.ascontiguousarray(v32))

    def row(self, i: int) -> CompactRow:
        """Row ``i`` as the :class:`CompactRow` that ``from_top`` builds (views of the batch)."""
        if self.errors[i] is not None:
            raise self.errors[i]  # type: ignore[misc]
        return CompactRow(self.vocab_size, self.ids[i], self.logits[i], Moments(*self.moments[i].tolist()), float(self.floor[i]))


class BatchedRow(Value):
    """Row ``index`` of a :class:`CompactBatch`; called, it is that row as a CompactRow."""

    _fields = ("batch", "index")
    __slots__ = _fields

    def __init__(self, batch: CompactBatch, index: int) -> None:
        self.batch: Final = batch
        self.index: Final = index

    def __call__(self) -> CompactRow:
        return self.batch.row(self.index)


def check_covered(row: CompactRow, edge: float, what: str, bound: float | None = None) -> None:
    """Refuse a draw whose support is not known to lie within the shipped entries.

    ``edge``: the (penalised) logit that defines the sampler's support (its lowest kept
    value, or its cut-off); ``bound``: what no token that was not shipped can exceed after
    the penalty (``row.floor`` unless the penalty raised one of them).
    """
    b = row.floor if bound is None else bound
    if b > -math.inf and not edge > b:  # -inf: every token was shipped
        raise CoverageError(
            f"the COMPACT row's {row.k} entries do not cover the {what} sampler's support "
            f"(its edge {edge:.6g} is not above the smallest shipped logit {b:.6g}); send this row FULL"
        )


def compact_from_logits(logits: np.ndarray, k: int) -> CompactRow:
    """What an engine ships for ``logits`` (vocab,): the reference computation, float64 moments
    and the top ``k`` by (logit desc, id asc). Engine adapters compute the same on their device."""
    x = np.asarray(logits, dtype=np.float32)
    m, top_vals, top_ids = moments_and_top(x, k)
    return CompactRow.from_top(x.shape[0], m, top_vals, top_ids)


def moments_and_top(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(moments f64[8], top-k logits f32 highest first, their ids u32) of one row (vocab,)."""
    x64 = x.astype(np.float64)
    mx = float(x64.max())
    s = x64 - mx
    e = np.exp(s)
    z = float(e.sum())
    p = e / z
    logp = s - math.log(z)
    ent = float(-(p * logp).sum())
    varent = float((p * logp * logp).sum()) - ent * ent
    moments = np.array(
        [mx + math.log(z), ent, max(varent, 0.0), float(x64.mean()), float(x64.var()), float(np.linalg.norm(x64)), mx, 0.0]
    )
    k = min(k, x.shape[0])
    part = np.argpartition(-x, k - 1)[:k] if k < x.shape[0] else np.arange(x.shape[0])
    order = np.lexsort((part, -x[part]))
    ids = part[order]
    return moments, x[ids].astype(np.float32), ids.astype(np.uint32)
