"""COMPACT rows computed by torch on the engine's device (engine_adapters/torch_rows.py) carry
the moments the sidecar's own float64 pass computes from the full row (sidecar.core.compact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_adapters.batch import force
from engine_adapters.torch_rows import compact_rows
from sidecar.core.compact import moments_and_top


def _rows(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 4096, generator=g) * torch.tensor([0.5, 1, 2, 3, 5, 8])[:, None]
    base[3, :7] = 25.0  # a tie at the top
    base[4, 100:200] = float("-inf")  # masked ids: p = 0, never 0 * inf
    return base


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_moments_match_the_sidecars_float64_pass(seed: int) -> None:
    x = _rows(seed)
    got = compact_rows(x, 16)
    for r, c in enumerate(got):
        with np.errstate(invalid="ignore"):  # the reference meets 0 * -inf on the masked row
            want, top, ids = moments_and_top(x[r].numpy(), 16)
        finite = np.isfinite(want)
        np.testing.assert_allclose(c.moments[finite], want[finite], rtol=2e-5, atol=2e-5)
        if r == 4:  # lse, entropy, varentropy, max stay finite with masked ids; the rest are not
            assert np.isfinite(c.moments[[0, 1, 2, 6]]).all() and not np.isfinite(c.moments[[3, 4, 5]]).all()
        np.testing.assert_array_equal(np.sort(c.top_logits)[::-1], c.top_logits)  # highest first
        np.testing.assert_array_equal(c.top_logits, top)
        assert set(c.top_ids[c.top_logits > c.top_logits[-1]].tolist()) == set(ids[top > top[-1]].tolist())


def test_forcing_leaves_each_listed_row_one_finite_score_and_the_others_untouched() -> None:
    x = _rows(0)
    before = x.clone()
    force(x, [1, 4], [7, 3])
    assert torch.equal(x[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    for r, t in ((1, 7), (4, 3)):
        assert x[r, t] == 0.0 and torch.isinf(x[r]).sum() == x.shape[1] - 1
