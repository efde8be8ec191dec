"""segment_outer (the Kronecker sketch's accumulation): every backend against the reference."""

import pytest
import torch
from conftest import DTYPES, assert_matches, segments, skip_unsupported, to

from geffect_fast.ops import pairwise as pw
from geffect_fast.ops.contract import seg_tensor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "N,ku,kw,B,kind",
    [
        (37, 5, 33, 4, "contiguous"),
        (53, 17, 1, 3, "packed"),
        (100, 16, 16, 1, "contiguous"),
        (60, 40, 9, 5, "uniform"),  # one batched GEMM
    ],
)
def test_segment_outer(backend, dtype, N, ku, kw, B, kind):
    name, ops, dev = backend
    skip_unsupported(name, dtype)
    gen = torch.Generator().manual_seed(N + ku)
    u = torch.randn(N, ku, generator=gen).to(dtype)
    w = torch.randn(N, kw, generator=gen).to(dtype)
    seg = segments(N, B, kind, gen)
    want = pw.segment_outer(u, w, seg, B)
    got = ops.segment_outer(u.to(dev), w.to(dev), to(seg, dev), B)
    assert_matches(got, want, dtype, name)
    # the definition, materialised
    full = torch.zeros(B, ku, kw, dtype=torch.float64).index_add_(
        0, seg_tensor(seg, N, B, u.device).long(), u.double()[:, :, None] * w.double()[:, None, :]
    )
    assert_matches(want, full, dtype, "reference")


def test_project_is_the_kronecker_sketch():
    gen = torch.Generator().manual_seed(0)
    a, g = (
        torch.randn(20, 7, generator=gen, dtype=torch.float64),
        torch.randn(20, 5, generator=gen, dtype=torch.float64),
    )
    seg = torch.arange(20) // 7
    P_l, P_r = (
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
        torch.randn(4, 7, generator=gen, dtype=torch.float64),
    )
    S = pw.project(g, a, seg, 3, P_l, P_r)
    G = torch.zeros(3, 5, 7, dtype=torch.float64).index_add_(0, seg, g[:, :, None] * a[:, None, :])
    assert torch.allclose(S, P_l @ G @ P_r.T)
    ids = torch.randint(0, 9, (20,), generator=gen)
    P_v = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    S = pw.project(ids, a, seg, 3, P_v, P_r, pad=2)
    onehot = torch.nn.functional.one_hot(ids, 9).double() * (ids != 2).double()[:, None]
    G = torch.zeros(3, 9, 7, dtype=torch.float64).index_add_(0, seg, onehot[:, :, None] * a[:, None, :])
    assert torch.allclose(S, P_v @ G @ P_r.T)
