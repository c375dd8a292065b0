"""Rows of a torch logits batch as the sidecar takes them, computed on the batch's device.

A COMPACT row (RING.md) is the row's moments and its k largest logits with their ids:
computed where the logits are (the GPU for vLLM), so that only a few hundred bytes a row
cross to the host instead of the vocabulary. Shared by the transformers and vLLM adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sidecar.core.sampling import SamplingParams, entries_needed

from .client import Compact

# Entries shipped beyond what the request's sampler needs: room for a few tokens that
# policy rules block in one step (each block removes one candidate from the support).
COMPACT_SLACK = 8


def compact_rows(logits: torch.Tensor, k: int) -> list[Compact]:
    """The COMPACT rows of ``logits`` (rows, vocab): moments in float32 on its device, the
    top ``k`` highest first; one transfer to the host for the whole batch.

    Few passes over the rows (on a CPU engine each pass over a batch is milliseconds): with
    s = x - max and e = exp(s), z = sum e, lse = max + log z, entropy = log z - E[s] and
    varentropy = E[s^2] - E[s]^2 (expectations under p = e / z), all from e in place."""
    x = logits.float()
    n = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    s = x - mean  # one scratch buffer for both centerings (a fresh one costs page faults on a CPU)
    # two passes, not torch.var: its CPU kernel is ~10x slower than a norm of x - mean
    var = torch.linalg.vector_norm(s, dim=-1).square() / n
    mx = x.amax(-1, keepdim=True)
    torch.sub(x, mx, out=s).clamp_(min=-1e4)  # exp is 0 below -104 in f32 either way; -inf would make 0 * -inf
    e = s.exp()
    z = e.sum(-1, keepdim=True)
    es_mean = e.mul_(s).sum(-1, keepdim=True) / z
    es2_mean = e.mul_(s).sum(-1, keepdim=True) / z
    logz = z.log()
    lse = (mx + logz).squeeze(-1)
    ent = (logz - es_mean).squeeze(-1)
    varent = (es2_mean - es_mean * es_mean).squeeze(-1).clamp_min(0.0)
    mean = mean.squeeze(-1)
    l2 = torch.linalg.vector_norm(x, dim=-1)
    vals, ids = torch.topk(x, min(k, x.shape[-1]), dim=-1, sorted=True)
    moments = torch.stack([lse, ent, varent, mean, var, l2, vals[:, 0], torch.zeros_like(lse)], dim=-1)
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
