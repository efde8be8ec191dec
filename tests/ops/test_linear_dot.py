"""linear_dot: every backend against the reference."""

import pytest
import torch
from conftest import DTYPES, assert_matches, segments, skip_unsupported

from geffect_fast.ops import reference as ref

# N not a multiple of any block; B = 1; a sample spanning several token blocks; odd feature sizes
SHAPES = [
    # N, i, o, K, B, segments
    (37, 33, 5, 1, 4, "contiguous"),
    (53, 257, 33, 3, 3, "packed"),
    (100, 16, 70, 1, 1, "contiguous"),
    (9, 7, 300, 2, 5, "packed"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,i,o,K,B,kind", SHAPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["V[k,o,i]", "conv1d-view"])
def test_linear_dot(backend, dtype, N, i, o, K, B, kind, transposed):
    name, ops, dev = backend
    skip_unsupported(name, dtype)
    gen = torch.Generator().manual_seed(N * 7 + o)
    a = torch.randn(N, i, generator=gen).to(dtype)
    g = torch.randn(N, o, generator=gen).to(dtype)
    v = torch.randn(K, o, i, generator=gen).to(dtype)
    if transposed:
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    vb = torch.randn(K, o, generator=gen).to(dtype)
    seg = segments(N, B, kind, gen)
    want_w, want_b = ref.linear_dot(a, g, v, seg, B, vb)
    to = dict(device=dev)
    got_w, got_b = ops.linear_dot(a.to(**to), g.to(**to), v.to(**to), seg.to(**to), B, vb.to(**to))
    assert got_w.dtype == want_w.dtype
    assert_matches(got_w, want_w, dtype, f"{name} weight")
    assert_matches(got_b, want_b, dtype, f"{name} bias")
    if kind == "packed" and B > 1:
        assert torch.all(got_w.cpu()[:, B - 1] == 0)  # the empty sample
    # weight only, bias only
    w_only, none = ops.linear_dot(a.to(**to), g.to(**to), v.to(**to), seg.to(**to), B)
    assert none is None
    assert_matches(w_only, want_w, dtype, f"{name} weight only")
    none, b_only = ops.linear_dot(None, g.to(**to), None, seg.to(**to), B, vb.to(**to))
    assert none is None
    assert_matches(b_only, want_b, dtype, f"{name} bias only")


@pytest.mark.parametrize(
    "act,vdt", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64)]
)
def test_linear_dot_mixed_dtypes(backend, act, vdt):
    """Activations in the model's dtype, the direction kept in higher precision."""
    name, ops, dev = backend
    skip_unsupported(name, act)
    if not __import__("geffect_fast").ops.dispatch._module(name).supports(vdt):
        pytest.skip(f"{name} does not take {vdt}")
    gen = torch.Generator().manual_seed(3)
    a, g = torch.randn(29, 40, generator=gen).to(act), torch.randn(29, 24, generator=gen).to(act)
    v, vb = torch.randn(2, 24, 40, generator=gen).to(vdt), torch.randn(2, 24, generator=gen).to(vdt)
    seg = torch.arange(29) % 3
    want_w, want_b = ref.linear_dot(a, g, v, seg, 3, vb)
    got_w, got_b = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), seg.to(dev), 3, vb.to(dev))
    assert_matches(got_w, want_w, vdt if vdt == torch.float64 else act, name)
    assert_matches(got_b, want_b, vdt if vdt == torch.float64 else act, name)


def test_linear_dot_two_pass_segments(backend, monkeypatch):
    """Triton's second-pass segment sum (instead of atomics) gives the same numbers."""
    name, ops, dev = backend
    if name != "triton":
        pytest.skip("two_pass is a Triton option")
    from geffect_fast.ops.triton import _common

    monkeypatch.setattr(_common, "SEGMENT_MODE", "two_pass")
    gen = torch.Generator().manual_seed(5)
    a, g = torch.randn(45, 20, generator=gen), torch.randn(45, 70, generator=gen)
    v, vb = torch.randn(2, 70, 20, generator=gen), torch.randn(2, 70, generator=gen)
    seg = torch.randint(0, 4, (45,), generator=gen)
    want = ref.linear_dot(a, g, v, seg, 4, vb)
    got = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), seg.to(dev), 4, vb.to(dev))
    for x, y in zip(got, want):
        assert_matches(x, y, torch.float32, "two_pass")
