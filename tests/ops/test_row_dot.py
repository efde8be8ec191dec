"""row_dot (the epilogue of linear_dot's GEMM route): every backend that has it against the reference."""

import pytest
import torch
from conftest import DTYPES, assert_matches, device_for, segments, skip_unsupported, to

from geffect_fast.ops import dispatch
from geffect_fast.ops import reference as ref

SHAPES = [
    # N, C, K, B, segments
    (37, 33, 1, 4, "contiguous"),
    (53, 700, 3, 3, "packed"),
    (60, 16, 5, 5, "uniform"),
]


@pytest.fixture(params=["triton", "cuda"])
def row_dot(request):
    name = request.param
    dev = device_for(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{name}: needs a CUDA GPU (this machine has none; benchmarks/gpu_check.sh runs it on one)")
    why = dispatch.backends(dev)[name]["reason"]
    if why:
        pytest.skip(f"{name}: {why}")
    return name, dispatch._op(name, "row_dot"), dev


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,K,B,kind", SHAPES)
@pytest.mark.parametrize("broadcast", [False, True], ids=["p", "bias-broadcast"])
def test_row_dot(row_dot, dtype, N, C, K, B, kind, broadcast):
    name, op, dev = row_dot
    skip_unsupported(name, dtype)
    gen = torch.Generator().manual_seed(N + C)
    x = torch.randn(N, C, generator=gen).to(dtype)
    p = torch.randn(K, 1 if broadcast else N, C, generator=gen).float()
    if dtype == torch.float64:
        p = p.double()
    p = p.expand(K, N, C)  # stride 0 over rows when broadcast
    seg = segments(N, B, kind, gen)
    want = ref.row_dot(p, x, seg, B)
    got = op(p.to(dev), x.to(dev), to(seg, dev), B)
    assert_matches(got, want, dtype, name)
    full = torch.zeros(K, B, dtype=torch.float64)
    ids = torch.arange(B).repeat_interleave(seg) if isinstance(seg, int) else seg.long()
    full.index_add_(1, ids, (p.double() * x.double()).sum(-1))
    assert_matches(want, full, dtype, "reference")
