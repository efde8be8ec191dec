"""The torch reference ops against the materialised definition (per-sample gradients formed in float64),
over shapes that are not multiples of anything, tiny tiles (many tiles, chunked V), packed segments, B = 1,
empty samples and several dtypes."""

import pytest
import torch

from geffect_fast.ops import reference as ref

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _seg(N, B, gen, packed):
    if packed:  # tokens of a sample scattered, as in packed sequences; sample B-1 left empty when B > 1
        return torch.randint(0, max(1, B - 1), (N,), generator=gen)
    return torch.arange(B).repeat_interleave(N // B + 1)[:N]


def _check(ours, want, dtype):
    assert ours.shape == want.shape, (ours.shape, want.shape)
    scale = want.abs().max().clamp_min(1e-30)
    assert ((ours.double() - want).abs().max() / scale) <= TOL[dtype]


@pytest.fixture(params=[4 << 20, 512], ids=["tile4M", "tile512B"])
def tile(request, monkeypatch):
    monkeypatch.setattr(ref, "TILE_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "N,i,o,K,B,packed", [(37, 33, 5, 1, 4, False), (53, 5, 257, 3, 3, True), (9, 7, 7, 2, 1, False)]
)
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_dot(tile, dtype, N, i, o, K, B, packed, transposed):
    gen = torch.Generator().manual_seed(N * i + o)
    a = torch.randn(N, i, generator=gen, dtype=torch.float64)
    g = torch.randn(N, o, generator=gen, dtype=torch.float64)
    V = torch.randn(K, o, i, generator=gen, dtype=torch.float64)
    vb = torch.randn(K, o, generator=gen, dtype=torch.float64)
    seg = _seg(N, B, gen, packed)
    # the definition: materialise G_b = Σ g_t a_tᵀ, then dot
    Gb = torch.zeros(B, o, i, dtype=torch.float64).index_add_(0, seg, g[:, :, None] * a[:, None, :])
    bb = torch.zeros(B, o, dtype=torch.float64).index_add_(0, seg, g)
    want_w = torch.einsum("boi,koi->kb", Gb, V)
    want_b = (bb @ vb.T).T
    Vin = V.to(dtype)
    if transposed:  # as HF Conv1D stores it: a [K, i, o] tensor seen through a transposed view
        Vin = Vin.transpose(1, 2).contiguous().transpose(1, 2)
    out_w, out_b = ref.linear_dot(a.to(dtype), g.to(dtype), Vin, seg.int(), B, vb.to(dtype))
    assert out_w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # with low-precision inputs the definition is taken on the rounded inputs
    if dtype != torch.float64:
        a_, g_, V_, vb_ = (t.to(dtype).double() for t in (a, g, V, vb))
        Gb = torch.zeros(B, o, i, dtype=torch.float64).index_add_(0, seg, g_[:, :, None] * a_[:, None, :])
        want_w = torch.einsum("boi,koi->kb", Gb, V_)
        want_b = (torch.zeros(B, o, dtype=torch.float64).index_add_(0, seg, g_) @ vb_.T).T
    _check(out_w, want_w, dtype)
    _check(out_b, want_b, dtype)
    if packed and B > 1:
        assert torch.all(out_w[:, B - 1] == 0)
    # bias only, and weight only
    w_only, none_b = ref.linear_dot(a.to(dtype), g.to(dtype), Vin, seg, B)
    assert none_b is None and torch.equal(w_only, out_w)
    none_w, b_only = ref.linear_dot(None, g.to(dtype), None, seg, B, vb.to(dtype))
    assert none_w is None
    _check(b_only, want_b, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "N,vocab,d,K,B,padding_idx", [(41, 13, 33, 1, 5, None), (17, 257, 6, 3, 1, 3), (8, 5, 5, 2, 2, 0)]
)
def test_embedding_dot(tile, dtype, N, vocab, d, K, B, padding_idx):
    gen = torch.Generator().manual_seed(N + vocab)
    ids = torch.randint(0, vocab, (N,), generator=gen)
    if padding_idx is not None:
        ids[::3] = padding_idx
    g = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype).double()
    V = torch.randn(K, vocab, d, generator=gen, dtype=torch.float64).to(dtype).double()
    seg = torch.arange(B).repeat_interleave(N // B + 1)[:N]
    Gb = torch.zeros(B, vocab, d, dtype=torch.float64)
    for t in range(N):
        if ids[t] != padding_idx:
            Gb[seg[t], ids[t]] += g[t]
    want = torch.einsum("bvd,kvd->kb", Gb, V)
    out = ref.embedding_dot(ids, g.to(dtype), V.to(dtype), seg, B, padding_idx)
    _check(out, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("N,d,K,B", [(29, 33, 1, 3), (64, 257, 3, 1), (5, 4, 2, 5)])
def test_norm_dot(tile, dtype, N, d, K, B):
    gen = torch.Generator().manual_seed(N + d)
    xh = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype).double()
    g = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype).double()
    vw = torch.randn(K, d, generator=gen, dtype=torch.float64).to(dtype).double()
    vb = torch.randn(K, d, generator=gen, dtype=torch.float64).to(dtype).double()
    seg = torch.arange(B).repeat_interleave(N // B + 1)[:N]
    gw = torch.zeros(B, d, dtype=torch.float64).index_add_(0, seg, g * xh)
    gb = torch.zeros(B, d, dtype=torch.float64).index_add_(0, seg, g)
    ow, ob = ref.norm_dot(xh.to(dtype), g.to(dtype), vw.to(dtype), vb.to(dtype), seg, B)
    _check(ow, (gw @ vw.T).T, dtype)
    _check(ob, (gb @ vb.T).T, dtype)
    ow2, ob2 = ref.norm_dot(xh.to(dtype), g.to(dtype), vw.to(dtype), None, seg, B)
    assert ob2 is None and torch.equal(ow2, ow)


def test_contract_errors():
    a, g = torch.randn(4, 3), torch.randn(4, 2)
    seg = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"v must be \[K, 2, 3\]"):
        ref.linear_dot(a, g, torch.randn(1, 3, 2), seg, 1)
    with pytest.raises(ValueError, match="seg must have shape"):
        ref.linear_dot(a, g, torch.randn(1, 2, 3), seg[:3], 1)
    with pytest.raises(TypeError, match="seg must be int32 or int64"):
        ref.linear_dot(a, g, torch.randn(1, 2, 3), seg.float(), 1)
    with pytest.raises(ValueError, match="at least one"):
        ref.linear_dot(a, g, None, seg, 1)
    with pytest.raises(ValueError, match="at least one"):
        ref.norm_dot(g, g, None, None, seg, 1)
    with pytest.raises(TypeError, match="ids must be int"):
        ref.embedding_dot(torch.zeros(4), g, torch.randn(1, 5, 2), seg, 1)


def test_tiles_bound_transient_memory(monkeypatch):
    """The tile size is what bounds the intermediates: tiny tiles give the same numbers."""
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(300, 40, generator=gen), torch.randn(300, 50, generator=gen)
    V = torch.randn(2, 50, 40, generator=gen, dtype=torch.bfloat16)  # converted chunk by chunk
    seg = torch.arange(300) // 100
    big, _ = ref.linear_dot(a, g, V, seg, 3)
    monkeypatch.setattr(ref, "TILE_BYTES", 256)
    small, _ = ref.linear_dot(a, g, V, seg, 3)
    assert (big - small).abs().max() <= 1e-5 * big.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,i,o,K", [(3, 7, 33, 5, 1), (2, 11, 5, 19, 3), (1, 13, 9, 9, 2)])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_kernels_with_uniform_segments_equal_the_checked_ops_with_ids(tile, dtype, B, T, i, o, K, backend):
    """The engine calls each op's unchecked kernel with uniform segments (an int T): the one-tile fast path and
    the tiled one (tile512B) give what the checked op gives with the equivalent ids."""
    from geffect_fast.ops import resolve

    ops = resolve(backend, torch.device("cpu"), dtype, dtype)
    kern = ops.unchecked
    assert kern is not ops and kern.linear_dot is not ops.linear_dot
    gen = torch.Generator().manual_seed(B * T + i)
    N = B * T
    a, g = torch.randn(N, i, generator=gen).to(dtype), torch.randn(N, o, generator=gen).to(dtype)
    V, vb = torch.randn(K, o, i, generator=gen).to(dtype), torch.randn(K, o, generator=gen).to(dtype)
    ids_seg = torch.arange(B).repeat_interleave(T)
    for got, want in zip(kern.linear_dot(a, g, V, T, B, vb), ops.linear_dot(a, g, V, ids_seg, B, vb)):
        _check(got, want.double(), dtype)
    got = kern.linear_dot(None, g, None, T, B, vb)[1]
    _check(got, ops.linear_dot(None, g, None, ids_seg, B, vb)[1].double(), dtype)
    ids = torch.randint(0, 17, (N,), generator=gen)
    E = torch.randn(K, 17, o, generator=gen).to(dtype)
    _check(kern.embedding_dot(ids, g, E, T, B, 3), ops.embedding_dot(ids, g, E, ids_seg, B, 3).double(), dtype)
    x = torch.randn(N, o, generator=gen).to(dtype)
    for got, want in zip(kern.norm_dot(x, g, vb, vb, T, B), ops.norm_dot(x, g, vb, vb, ids_seg, B)):
        _check(got, want.double(), dtype)
