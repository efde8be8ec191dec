"""embedding_dot: every backend against the reference."""

import pytest
import torch
from conftest import DTYPES, assert_matches, segments, skip_unsupported, to

from geffect_fast.ops import reference as ref

SHAPES = [
    # N, vocab, d, K, B, padding_idx, segments
    (41, 13, 33, 1, 5, None, "contiguous"),
    (70, 257, 6, 3, 1, 3, "contiguous"),
    (33, 50, 257, 2, 4, 0, "packed"),
    (60, 31, 40, 5, 4, 7, "uniform"),  # K = 5: more directions than one program takes
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,vocab,d,K,B,pad,kind", SHAPES)
def test_embedding_dot(backend, dtype, N, vocab, d, K, B, pad, kind):
    name, ops, dev = backend
    skip_unsupported(name, dtype)
    gen = torch.Generator().manual_seed(N + vocab)
    ids = torch.randint(0, vocab, (N,), generator=gen)
    if pad is not None:
        ids[::4] = pad
    ids = ids.to(torch.int32 if N % 2 else torch.int64)
    g = torch.randn(N, d, generator=gen).to(dtype)
    v = torch.randn(K, vocab, d, generator=gen).to(dtype)
    seg = segments(N, B, kind, gen)
    want = ref.embedding_dot(ids, g, v, seg, B, pad)
    got = ops.embedding_dot(ids.to(dev), g.to(dev), v.to(dev), to(seg, dev), B, pad)
    assert_matches(got, want, dtype, name)


def test_embedding_dot_strided_direction(backend):
    """A direction that is a view (e.g. one slice of a stacked tensor) is read through its strides."""
    name, ops, dev = backend
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(3, 20, 17, generator=gen)
    v = big[1:3, :, ::2]  # [2, 20, 9], strided in every dim
    ids = torch.randint(0, 20, (25,), generator=gen)
    g = torch.randn(25, 9, generator=gen)
    seg = torch.arange(25) // 9
    want = ref.embedding_dot(ids, g, v, seg, 3)
    got = ops.embedding_dot(
        ids.to(dev), g.to(dev), v.to(dev) if dev.type == "cpu" else v.contiguous().to(dev), seg.to(dev), 3
    )
    assert_matches(got, want, torch.float32, name)
