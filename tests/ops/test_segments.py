"""Segments (which sample owns each row): uniform ints and id tensors are checked, bad ids never write out of
bounds, and segment_sum is the reduction every kernel's per-token values go through."""

import pytest
import torch
from conftest import assert_matches

from geffect_fast.ops import contract


def test_check_seg():
    contract.check_seg(6, 12, 2)
    contract.check_seg(torch.zeros(5, dtype=torch.int32), 5, 1)
    with pytest.raises(ValueError, match="cannot cover 13 rows in 2 samples"):
        contract.check_seg(6, 13, 2)
    with pytest.raises(ValueError, match="cannot cover"):
        contract.check_seg(0, 0, 2)
    with pytest.raises(TypeError, match="int .rows per sample. or a Tensor"):
        contract.check_seg(True, 2, 2)
    with pytest.raises(TypeError, match="int32 or int64"):
        contract.check_seg(torch.zeros(5), 5, 1)
    with pytest.raises(ValueError, match="shape"):
        contract.check_seg(torch.zeros(4, dtype=torch.int64), 5, 1)


def test_segment_sum_uniform_equals_ids():
    tok = torch.randn(3, 24, dtype=torch.float64)
    ids = torch.arange(4).repeat_interleave(6)
    assert torch.allclose(contract.segment_sum(tok, 6, 4), contract.segment_sum(tok, ids, 4), rtol=0, atol=1e-14)
    assert torch.allclose(contract.segment_sum(tok, 6, 4), tok.view(3, 4, 6).sum(-1))
    assert torch.equal(contract.seg_tensor(6, 24, 4, torch.device("cpu")), ids)


@pytest.mark.parametrize("bad", [-1, 3])
def test_sample_ids_outside_the_batch_are_an_error(backend, bad):
    """A seg from a user with an id outside [0, B): a clear error from every backend, nothing written out of
    bounds (the native and CUDA kernels and Triton's ragged segment_outer index outputs with the ids)."""
    name, ops, dev = backend
    gen = torch.Generator().manual_seed(0)
    seg = torch.tensor([0, 1, bad, 0, 2], device=dev)
    a, g = torch.randn(5, 7, generator=gen).to(dev), torch.randn(5, 6, generator=gen).to(dev)
    v = torch.randn(1, 6, 7, generator=gen).to(dev)
    err = (ValueError, IndexError, RuntimeError)
    with pytest.raises(err, match=r"outside \[0, 3\)|out of (range|bounds)|index"):
        ops.linear_dot(a, g, v, seg, 3)
    with pytest.raises(err, match=r"outside \[0, 3\)|out of (range|bounds)|index"):
        ops.segment_outer(a, g, seg, 3)
    ids = torch.tensor([1, 0, 2, 1, 0], device=dev)
    with pytest.raises(err, match=r"outside \[0, 3\)|out of (range|bounds)|index"):
        ops.embedding_dot(ids, g, torch.randn(1, 3, 6, generator=gen).to(dev), seg, 3)


def test_seg_values_checked_once():
    with pytest.raises(ValueError, match=r"sample ids in \[0, 5\], outside \[0, 5\)"):
        contract.check_seg_values(torch.tensor([0, 5]), 5)
    contract.check_seg_values(torch.tensor([0, 4]), 5)
    contract.check_seg_values(7, 5)  # uniform segments cannot be out of range
    out = contract.segment_sum(torch.ones(1, 4), torch.tensor([0, 0, 1, 1]), 2)
    assert_matches(out, torch.tensor([[2.0, 2.0]]), torch.float32, "segment_sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,i,o,K", [(3, 7, 33, 5, 1), (2, 11, 5, 19, 3), (2, 40, 72, 48, 2)])
def test_unchecked_kernels_with_uniform_segments_equal_the_checked_ops_with_ids(backend, dtype, B, T, i, o, K):
    """What the engine calls at every tap: each backend's ``<op>_kernel`` (no argument checks) with uniform
    segments (an int T) gives what its checked op gives with the equivalent ids, on fresh random inputs."""
    name, ops, dev = backend
    kern = ops.unchecked
    assert kern is not ops
    for op in ("linear_dot", "embedding_dot", "norm_dot"):
        assert getattr(kern, op) is not getattr(ops, op), f"{name} has no unchecked {op}"
        assert getattr(kern, op).__name__ == f"{op}_kernel"
    gen = torch.Generator().manual_seed(B * T + i + K)
    N = B * T

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(dev)

    a, g, V, vb = rnd(N, i), rnd(N, o), rnd(K, o, i), rnd(K, o)
    ids_seg = torch.arange(B).repeat_interleave(T).to(dev)
    for got, want in zip(kern.linear_dot(a, g, V, T, B, vb), ops.linear_dot(a, g, V, ids_seg, B, vb)):
        assert_matches(got, want, dtype, f"{name} linear_dot_kernel")
    assert kern.linear_dot(a, g, V, T, B)[1] is None
    got = kern.linear_dot(None, g, None, T, B, vb)
    assert got[0] is None
    assert_matches(got[1], ops.linear_dot(None, g, None, ids_seg, B, vb)[1], dtype, f"{name} bias only")
    ids = torch.randint(0, 17, (N,), generator=gen).to(dev)
    E = rnd(K, 17, o)
    got = kern.embedding_dot(ids, g, E, T, B, 3)
    assert_matches(got, ops.embedding_dot(ids, g, E, ids_seg, B, 3), dtype, f"{name} embedding_dot_kernel")
    x = rnd(N, o)
    for got, want in zip(kern.norm_dot(x, g, vb, vb, T, B), ops.norm_dot(x, g, vb, vb, ids_seg, B)):
        assert_matches(got, want, dtype, f"{name} norm_dot_kernel")
    got = kern.norm_dot(x, g, None, vb, T, B)
    assert got[0] is None
    assert_matches(got[1], ops.norm_dot(x, g, None, vb, ids_seg, B)[1], dtype, f"{name} norm bias only")
