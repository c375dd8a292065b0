"""One guarded decoding step of a batched engine, shared by the transformers and vLLM adapters.

:class:`BatchGuard` takes the rows of a logits batch that belong to guarded, running
requests; ships each as COMPACT (moments and top-k computed on the batch's device, where
the request's sampler allows) or FULL into one ring frame; sends one batch message;
verifies every row's signed verdict; and leaves each row one finite score, 0 at the
verdict's token, -inf elsewhere, so that whatever the engine's sampler does next it can
only pick that token. A row without a valid verdict (ABORT, refused, not verified, no
answer in time) gets the end-of-sequence token instead and its request is over; the
other rows are not touched by its fault.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar.core.sampling import SamplingParams
from sidecar.errors import GuardAbort, GuardError
from sidecar.ring import RingWriter

from .client import Compact, GuardClient, GuardedSession
from .torch_rows import compact_k, compact_rows

log = logging.getLogger("fse.adapter")


@dataclass
class GuardedRequest:
    """One guarded request of a batch: its session and what it has produced so far."""

    session: GuardedSession
    params: SamplingParams
    history: list[int]  # the prompt's ids, then every forced token (the penalty's window)
    tokens: list[int] = field(default_factory=list)  # tokens forced by verified verdicts
    verdicts: list[pb.Verdict] = field(default_factory=list)
    finish_reason: str | None = None  # None while running; "stop", "guard_abort", "guard_error"
    error: GuardError | None = None

    def end(self, why: str, error: GuardError | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = why, error


def force(logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int]) -> None:
    """Leave each of ``rows`` one finite score, 0 at its token: two indexed writes for all of them."""
    if not rows:
        return
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logits.index_fill_(0, idx, float("-inf"))
    logits[idx, torch.tensor(tokens, dtype=torch.long, device=logits.device)] = 0.0


class BatchGuard:
    """Guards rows of a logits batch in place through one ``client`` and one ``ring``."""

    def __init__(self, client: GuardClient, ring: RingWriter, eos_token_id: int) -> None:
        self.client = client
        self.ring = ring
        self.eos = eos_token_id
        self.rows_sent = {"compact": 0, "full": 0}  # guarded rows, by the kind shipped

    def guard(self, logits: torch.Tensor, rows: Sequence[tuple[int, GuardedRequest]]) -> None:
        """Force every listed row of ``logits`` (rows, vocab) to its verdict's token, or to
        end-of-sequence when it has none; rows not listed are left as they are."""
        live = [(r, q) for r, q in rows if q.finish_reason is None]
        if not live:
            return
        cap = self.ring.layout.topk_capacity
        ks = [compact_k(q.params, q.history, cap) for _, q in live]
        shipped: list[np.ndarray | Compact | None] = [None] * len(live)
        compact_at = [n for n, k in enumerate(ks) if k]
        if compact_at:  # one device pass and one transfer for every COMPACT row
            at = [live[n][0] for n in compact_at]
            picked = compact_rows(logits if at == list(range(logits.shape[0])) else logits[at], max(ks[n] for n in compact_at))
            for n, c in zip(compact_at, picked, strict=True):
                shipped[n] = c
        full_at = [n for n, k in enumerate(ks) if not k]
        if full_at:
            host = logits[[live[n][0] for n in full_at]].float().cpu().numpy()
            for j, n in enumerate(full_at):
                shipped[n] = host[j]
        self.rows_sent["compact"] += len(compact_at)
        self.rows_sent["full"] += len(full_at)
        outcomes = self.client.step_batch([(q.session, s) for (_, q), s in zip(live, shipped, strict=True)], self.ring)  # type: ignore[misc]
        forced = []
        for (_, q), got in zip(live, outcomes, strict=True):
            if isinstance(got, pb.Verdict):
                token = int(got.token_id)
                q.verdicts.append(got)
                q.tokens.append(token)
                q.history.append(token)
                if token == self.eos:
                    q.end("stop")
            else:
                token = self.eos  # this request ends here; the others go on
                q.end("guard_abort" if isinstance(got, GuardAbort) else "guard_error", got)
                log.warning("fse: session %s ends: %s", q.session.session_id, got)
            forced.append(token)
        force(logits, [r for r, _ in live], forced)
