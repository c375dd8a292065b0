"""Rows of a torch logits batch as the sidecar takes them, computed on the batch's device.

A COMPACT row (RING.md) is the row's moments and its k largest logits with their ids:
computed where the logits are (the GPU for vLLM), so that only a few hundred bytes a row
cross to the host instead of the vocabulary. Shared by the transformers and vLLM adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sidecar.core.compact import entries_needed
from sidecar.core.sampling import SamplingParams

from .client import Compact

# Entries shipped beyond what the request's sampler needs: room for a few tokens that
# policy rules block in one step (each block removes one candidate from the support).
COMPACT_SLACK = 8


def compact_rows(logits: torch.Tensor, k: int) -> list[Compact]:
    """The COMPACT rows of ``logits`` (rows, vocab): moments in float32 on its device, the
    top ``k`` highest first; one transfer to the host for the whole batch."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse[:, None]
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))  # 0 log 0 = 0
    ent = -plogp.sum(-1)
    varent = (plogp * logp).nan_to_num(0.0).sum(-1) - ent * ent
    mean = x.mean(-1)
    var = x.var(-1, correction=0)
    l2 = torch.linalg.vector_norm(x, dim=-1)
    vals, ids = torch.topk(x, min(k, x.shape[-1]), dim=-1, sorted=True)
    moments = torch.stack([lse, ent, varent.clamp_min(0.0), mean, var, l2, vals[:, 0], torch.zeros_like(lse)], dim=-1)
    m = moments.double().cpu().numpy()
    v = vals.cpu().numpy().astype(np.float32)
    i = ids.cpu().numpy().astype(np.uint32)
    return [Compact(m[r], v[r], i[r]) for r in range(x.shape[0])]


def compact_k(params: SamplingParams, history: Sequence[int], capacity: int) -> int:
    """Entries to ship for this request's next row, or 0 to send it FULL (its sampler's
    support is not sure to fit in ``capacity`` entries)."""
    need = entries_needed(params, history)
    if need == 0:
        return 0
    k = need + COMPACT_SLACK
    return k if k <= capacity else 0
