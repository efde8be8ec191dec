"""The cuda backend's own paths: the 16-byte vector path against the scalar one, more directions than one launch
takes, the GEMM route in several token chunks, 64-bit offsets, and the device guard. The rule that picks the
vector path and the argument checks run here; the kernels need a GPU (benchmarks/gpu_check.sh runs them)."""

import pytest
import torch
from conftest import assert_matches
from cuda_cases import DTYPES, LAYOUTS, acc, nan, view, width

from geffect_fast.ops import cuda, dispatch, gemm
from geffect_fast.ops import reference as ref

CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _ext():
    ok, why = cuda.built()
    if not ok:
        pytest.skip(f"cuda: {why}")
    return cuda._ext


@pytest.fixture
def dev():
    if not torch.cuda.is_available():
        pytest.skip("cuda: needs a CUDA GPU (this machine has none; benchmarks/gpu_check.sh runs it on one)")
    why = dispatch.backends("cuda")["cuda"]["reason"]
    if why:
        pytest.fail(f"the cuda backend should run on this GPU: {why}")
    return torch.device("cuda")


def _vec16(t: torch.Tensor) -> bool:
    """The launchers' rule for one view: unit stride along rows, every row start 16-byte aligned."""
    return _ext().vec16(t.data_ptr(), CODE[t.dtype], t.stride(-1), list(t.stride()[:-1]))


def test_vector_path_rule():
    """Which views the kernels read with 16-byte loads (host code: runs without a GPU)."""
    base = torch.zeros(8, 64)
    assert _vec16(base)  # contiguous, 256-byte rows
    assert not _vec16(base[:, 1:])  # the first row starts 4 bytes in
    assert _vec16(base[:, 4:])  # ... 16 bytes in
    assert not _vec16(torch.zeros(8, 33))  # 132-byte rows: row 1 is misaligned
    assert _vec16(torch.zeros(8, 24, dtype=torch.bfloat16))  # 48-byte rows
    assert not _vec16(torch.zeros(8, 20, dtype=torch.float16))  # 40-byte rows
    assert _vec16(torch.zeros(8, 2, dtype=torch.float64))
    assert not _vec16(base.T)  # not unit-stride along the row
    assert _vec16(torch.zeros(3, 1, 64).expand(3, 8, 64))  # a direction broadcast over rows (stride 0)
    assert not _vec16(torch.zeros(2, 20, 17)[:, :, ::2])  # strided rows of a direction
    assert not _vec16(torch.zeros(5, 6))  # 24-byte rows
    assert _vec16(torch.zeros(5, 256)[:, :203])  # padded rows: aligned starts, any width
    assert _ext().vec16(0, 0, 7, [3])  # an absent operand never prevents it


def test_arguments_are_checked_before_any_launch():
    """Wrong devices and dtypes are clear errors, raised before the extension is called (run here too)."""
    p, x = torch.zeros(2, 4, 8), torch.zeros(4, 8)
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        cuda.row_dot_tokens(p, x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="accumulation dtype torch.float64"):
        cuda.row_dot_tokens(p.double(), x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"out must be \[2, 4\]"):
        cuda.row_dot_tokens(p, x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        cuda.linear_dot(torch.zeros(4, 8), torch.zeros(4, 3), torch.zeros(1, 3, 8), 2, 2)
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        cuda.embedding_dot(torch.zeros(4, dtype=torch.long), x, torch.zeros(1, 5, 8), 2, 2)
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        cuda.norm_dot(x, x, torch.zeros(1, 8), None, 2, 2)
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        cuda.segment_outer(x, x, torch.zeros(4, dtype=torch.long), 2)


# --- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,vector", LAYOUTS)
def test_row_dot_vector_and_scalar_paths(dev, dtype, layout, vector):
    gen = torch.Generator().manual_seed(1)
    n, K, C = 70, 3, width(layout)
    x = view((n, C), dtype, layout, gen, dev)
    p = view((K, n, C), acc(dtype), layout, gen, dev)
    out = nan((K, n), acc(dtype), dev)
    assert cuda.row_dot_tokens(p, x, out, vectorize=layout != "forced-scalar") == vector, layout
    assert_matches(out, (p.double() * x.double()).sum(-1), dtype, f"row_dot {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,vector", LAYOUTS)
def test_embedding_dot_vector_and_scalar_paths(dev, dtype, layout, vector):
    gen = torch.Generator().manual_seed(2)
    n, K, vocab, pad, d = 50, 2, 37, 5, width(layout)
    g = view((n, d), dtype, layout, gen, dev)
    v = view((K, vocab, d), dtype, layout, gen, dev)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    ids[::3] = pad
    out = nan((K, n), acc(dtype), dev)
    assert cuda._embedding_tokens(ids.to(dev), g, v, out, pad, vectorize=layout != "forced-scalar") == vector
    want = ref.embedding_dot(ids, g.cpu(), v.cpu(), 1, n, pad)  # per position: seg = 1, B = n
    assert_matches(out, want, dtype, f"embedding_dot {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,vector", LAYOUTS)
def test_norm_dot_vector_and_scalar_paths(dev, dtype, layout, vector):
    gen = torch.Generator().manual_seed(3)
    n, K, d = 45, 2, width(layout)
    xh, g = view((n, d), dtype, layout, gen, dev), view((n, d), dtype, layout, gen, dev)
    vw, vb = view((K, d), dtype, layout, gen, dev), view((K, d), dtype, layout, gen, dev)
    ow, ob = nan((K, n), acc(dtype), dev), nan((K, n), acc(dtype), dev)
    assert cuda._norm_tokens(xh, g, vw, vb, ow, ob, vectorize=layout != "forced-scalar") == vector, layout
    want_w, want_b = ref.norm_dot(xh.cpu(), g.cpu(), vw.cpu(), vb.cpu(), 1, n)
    assert_matches(ow, want_w, dtype, f"norm_dot weight {layout}")
    assert_matches(ob, want_b, dtype, f"norm_dot bias {layout}")


@pytest.mark.parametrize("extra", [1, 3])
def test_more_directions_than_one_launch(dev, extra):
    """K = 2·cap + extra directions: three launches, the last one partial, every output written once."""
    K = 2 * _ext().max_k_per_launch() + extra
    gen = torch.Generator().manual_seed(K)
    N, B, d, vocab = 48, 4, 40, 23
    a, g = torch.randn(N, 24, generator=gen), torch.randn(N, d, generator=gen)
    v, vb = torch.randn(K, d, 24, generator=gen), torch.randn(K, d, generator=gen)
    want = ref.linear_dot(a, g, v, 12, B, vb)
    got = cuda.linear_dot(a.to(dev), g.to(dev), v.to(dev), 12, B, vb.to(dev))
    for x, y in zip(got, want):
        assert_matches(x, y, torch.float32, "linear_dot")
    ids = torch.randint(0, vocab, (N,), generator=gen)
    E = torch.randn(K, vocab, d, generator=gen)
    got = cuda.embedding_dot(ids.to(dev), g.to(dev), E.to(dev), 12, B, 0)
    assert_matches(got, ref.embedding_dot(ids, g, E, 12, B, 0), torch.float32, "embedding_dot")
    xh, nw, nb = torch.randn(N, d, generator=gen), torch.randn(K, d, generator=gen), torch.randn(K, d, generator=gen)
    got = cuda.norm_dot(xh.to(dev), g.to(dev), nw.to(dev), nb.to(dev), 12, B)
    for x, y in zip(got, ref.norm_dot(xh, g, nw, nb, 12, B)):
        assert_matches(x, y, torch.float32, "norm_dot")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gemm_route_in_many_chunks(dev, monkeypatch, dtype):
    """P is formed MIN_CHUNK_ROWS tokens at a time: every chunk's rows of the per-token output are written (the
    outputs start as NaN) and the per-sample sums match."""
    monkeypatch.setattr(gemm, "CHUNK_BYTES", 1)
    monkeypatch.setattr(gemm, "MIN_CHUNK_ROWS", 16)
    gen = torch.Generator().manual_seed(4)
    N, i, o, K, B = 100, 48, 80, 2, 4  # 7 chunks, the last one of 4 rows
    a, g = torch.randn(N, i, generator=gen).to(dtype), torch.randn(N, o, generator=gen).to(dtype)
    v, vb = torch.randn(K, o, i, generator=gen).to(dtype), torch.randn(K, o, generator=gen).to(dtype)
    seg = torch.arange(N) * B // N
    want = ref.linear_dot(a, g, v, seg, B, vb)
    got = cuda.linear_dot(a.to(dev), g.to(dev), v.to(dev), seg.to(dev), B, vb.to(dev))
    for x, y in zip(got, want):
        assert_matches(x, y, dtype, "chunked")


def test_offsets_past_2_pow_31(dev):
    """Views whose element offsets pass 2^31 (row stride 2^31 + 64; a table of more than 2^31 elements): the
    kernels index in 64 bits. Only the rows read are written; the rest of the storage is never touched."""
    if torch.cuda.get_device_properties(dev).total_memory < 24 << 30:
        pytest.skip("needs about 13 GB of GPU memory")
    gen = torch.Generator().manual_seed(5)
    n, C, stride = 3, 64, 2**31 + 64
    src = torch.randn(n, C, generator=gen).to(torch.bfloat16)
    x = torch.empty((n - 1) * stride + C, dtype=torch.bfloat16, device=dev).as_strided((n, C), (stride, 1))
    x.copy_(src.to(dev))
    p = torch.randn(2, n, C, generator=gen)
    out = nan((2, n), torch.float32, dev)
    assert cuda.row_dot_tokens(p.to(dev), x, out)
    assert_matches(out, (p.double() * src.double()).sum(-1), torch.bfloat16, "row_dot")
    ow = nan((2, n), torch.float32, dev)
    vw = torch.randn(2, C, generator=gen)
    assert cuda._norm_tokens(x, x, vw.to(dev), None, ow, None)
    assert_matches(ow, ref.norm_dot(src, src, vw, None, 1, n)[0], torch.bfloat16, "norm_dot")
    del x
    vocab = 2**31 // C + 5  # V [1, vocab, 64]: rows past 2^31 elements
    V = torch.empty(1, vocab, C, dtype=torch.bfloat16, device=dev)
    ids = torch.tensor([vocab - 1, 0, vocab - 2])
    rows = torch.randn(1, n, C, generator=gen).to(torch.bfloat16)
    V[:, ids.to(dev)] = rows.to(dev)
    out = nan((1, n), torch.float32, dev)
    assert cuda._embedding_tokens(ids.to(dev), src.to(dev), V, out)
    assert_matches(out, (rows[0].double() * src.double()).sum(-1)[None], torch.bfloat16, "embedding_dot")
    del V
    torch.cuda.empty_cache()


def test_device_guard_restores_the_current_device(dev):
    """Each launch makes the tensors' device current and restores the previous one, also when the launcher
    raises; this module's runtime and torch agree on the current device afterwards. (With one GPU this checks
    the pairing of cudaGetDevice/cudaSetDevice leaves torch's device as it was.)"""
    ext = _ext()
    n_dev = torch.cuda.device_count()
    torch.cuda.set_device(0)
    for d in range(n_dev):
        target = torch.device("cuda", d)
        gen = torch.Generator().manual_seed(d)
        xh, g = torch.randn(20, 16, generator=gen).to(target), torch.randn(20, 16, generator=gen).to(target)
        vw = torch.randn(2, 16, generator=gen).to(target)
        got_w, _ = cuda.norm_dot(xh, g, vw, None, 5, 4)
        assert torch.cuda.current_device() == 0, f"launch on cuda:{d} moved torch's current device"
        assert ext.current_device() == 0
        assert got_w.device == target
        assert_matches(got_w, ref.norm_dot(xh.cpu(), g.cpu(), vw.cpu(), None, 5, 4)[0], torch.float32, "norm_dot")
        # a launcher that raises after the guard made cuda:d current (float32 inputs with acc64 = True)
        out = torch.empty(2, 20, device=target)
        with pytest.raises((ValueError, RuntimeError), match="acc64"):
            ext.norm_dot(
                cuda.mat(xh), cuda.mat(g), cuda.mat(vw), cuda.mat(None), cuda._out(out), cuda._out(None),
                20, 16, 2, True, True, d, torch.cuda.current_stream(d).cuda_stream,
            )  # fmt: skip
        assert torch.cuda.current_device() == 0 and ext.current_device() == 0
