"""norm_dot: every backend against the reference."""

import pytest
import torch
from conftest import DTYPES, assert_matches, segments, skip_unsupported, to

from geffect_fast.ops import reference as ref

SHAPES = [
    (29, 33, 1, 3, "contiguous"),
    (64, 257, 3, 1, "contiguous"),
    (45, 40, 2, 5, "packed"),
    (48, 700, 6, 4, "uniform"),  # several feature tiles; K = 6 in two groups of directions
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,K,B,kind", SHAPES)
@pytest.mark.parametrize("which", ["both", "weight", "bias"])
def test_norm_dot(backend, dtype, N, d, K, B, kind, which):
    name, ops, dev = backend
    skip_unsupported(name, dtype)
    gen = torch.Generator().manual_seed(N + d)
    xh = torch.randn(N, d, generator=gen).to(dtype)
    g = torch.randn(N, d, generator=gen).to(dtype)
    vw = torch.randn(K, d, generator=gen).to(dtype) if which != "bias" else None
    vb = torch.randn(K, d, generator=gen).to(dtype) if which != "weight" else None
    seg = segments(N, B, kind, gen)
    want_w, want_b = ref.norm_dot(xh, g, vw, vb, seg, B)
    got_w, got_b = ops.norm_dot(
        xh.to(dev), g.to(dev), None if vw is None else vw.to(dev), None if vb is None else vb.to(dev), to(seg, dev), B
    )
    if vw is None:
        assert got_w is None
    else:
        assert_matches(got_w, want_w, dtype, f"{name} weight")
    if vb is None:
        assert got_b is None
    else:
        assert_matches(got_b, want_b, dtype, f"{name} bias")
