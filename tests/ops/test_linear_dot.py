"""linear_dot: every backend against the reference; Triton's two routes and its tile configs; the hi + lo split
of float32 directions on 16-bit activations."""

import pytest
import torch
from conftest import DTYPES, SPLIT_TOL, TOL, assert_matches, rel_err, segments, skip_unsupported, to

from geffect_fast.ops import dispatch
from geffect_fast.ops import reference as ref

# N not a multiple of any block; B = 1; a sample spanning several token blocks; odd feature sizes; uniform
# segments (an int, as measure() passes them)
SHAPES = [
    # N, i, o, K, B, segments
    (37, 33, 5, 1, 4, "contiguous"),
    (53, 257, 33, 3, 3, "packed"),
    (100, 16, 70, 1, 1, "contiguous"),
    (9, 7, 300, 2, 5, "packed"),
    (60, 24, 40, 2, 5, "uniform"),
    (36, 90, 13, 5, 4, "uniform"),
]


def _inputs(N, i, o, K, dtype, seed, vdtype=None):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N, i, generator=gen).to(dtype)
    g = torch.randn(N, o, generator=gen).to(dtype)
    v = torch.randn(K, o, i, generator=gen).to(vdtype or dtype)
    vb = torch.randn(K, o, generator=gen).to(vdtype or dtype)
    return a, g, v, vb, gen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,i,o,K,B,kind", SHAPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["V[k,o,i]", "conv1d-view"])
def test_linear_dot(backend, dtype, N, i, o, K, B, kind, transposed):
    name, ops, dev = backend
    skip_unsupported(name, dtype)
    a, g, v, vb, gen = _inputs(N, i, o, K, dtype, N * 7 + o)
    if transposed:
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    seg = segments(N, B, kind, gen)
    want_w, want_b = ref.linear_dot(a, g, v, seg, B, vb)
    got_w, got_b = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), to(seg, dev), B, vb.to(dev))
    assert got_w.dtype == want_w.dtype
    assert_matches(got_w, want_w, dtype, f"{name} weight")
    assert_matches(got_b, want_b, dtype, f"{name} bias")
    if kind == "packed" and B > 1:
        assert torch.all(got_w.cpu()[:, B - 1] == 0)  # the empty sample
    # weight only, bias only
    w_only, none = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), to(seg, dev), B)
    assert none is None
    assert_matches(w_only, want_w, dtype, f"{name} weight only")
    none, b_only = ops.linear_dot(None, g.to(dev), None, to(seg, dev), B, vb.to(dev))
    assert none is None
    assert_matches(b_only, want_b, dtype, f"{name} bias only")


def test_uniform_segments_equal_their_ids(backend):
    """seg = T (an int) is exactly the id vector [0]*T + [1]*T + …"""
    name, ops, dev = backend
    a, g, v, vb, _ = _inputs(48, 20, 12, 2, torch.float32, 11)
    ids = torch.arange(4).repeat_interleave(12)
    got = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), 12, 4, vb.to(dev))
    want = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), ids.to(dev), 4, vb.to(dev))
    for x, y in zip(got, want):
        assert_matches(x, y, torch.float32, name)


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1e-6], ids=["unit", "gradient-sized"])
def test_float32_direction_on_half_activations(backend, act, scale):
    """A float32 direction on a bf16/fp16 model: never rounded to the model's dtype (that errs by ~1e-3),
    never an IEEE-FMA dot on a GPU: split as hi + lo (Triton, cuBLAS route) within SPLIT_TOL."""
    name, ops, dev = backend
    skip_unsupported(name, act)
    a, g, _, _, gen = _inputs(64, 96, 40, 2, act, 3)
    v = torch.randn(2, 40, 96, generator=gen) * scale
    vb = torch.randn(2, 40, generator=gen) * scale
    want_w, want_b = ref.linear_dot(a, g, v, 8, 8, vb)
    got_w, got_b = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), 8, 8, vb.to(dev))
    assert got_w.dtype == torch.float32
    tol = SPLIT_TOL[act]
    assert rel_err(got_w, want_w) <= tol, f"{name}: {rel_err(got_w, want_w):.1e} > {tol:.0e}"
    assert rel_err(got_b, want_b) <= TOL[torch.float32]
    # the test can fail: rounding the direction to the activations' dtype is far outside the bound
    naive, _ = ref.linear_dot(a, g, v.to(act), 8, 8)
    assert rel_err(naive, want_w) > 10 * tol


def test_float32_activations_with_a_float64_direction(backend):
    name, ops, dev = backend
    if not dispatch._module(name).supports(torch.float64):
        pytest.skip(f"{name} does not take float64 directions (the dispatcher sends them elsewhere)")
    a, g, _, _, gen = _inputs(29, 40, 24, 2, torch.float32, 4)
    v, vb = torch.randn(2, 24, 40, generator=gen, dtype=torch.float64), torch.randn(2, 24, generator=gen).double()
    seg = torch.arange(29) % 3
    want = ref.linear_dot(a, g, v, seg, 3, vb)
    got = ops.linear_dot(a.to(dev), g.to(dev), v.to(dev), seg.to(dev), 3, vb.to(dev))
    for x, y in zip(got, want):
        assert x.dtype == torch.float64
        assert_matches(x, y, torch.float64, name)


# --- Triton: both routes, every config auto can pick, both orientations, multi-tile, even and ragged r ---


@pytest.fixture
def triton_ops():
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    why = dispatch.backends(dev)["triton"]["reason"]
    if why:
        pytest.skip(f"triton: {why}")
    from geffect_fast.ops.triton import _common
    from geffect_fast.ops.triton import linear_dot as mod

    return mod, _common, dev


TILED = [
    # N, i, o, K, B, segments: several 128-token tiles and column bands; r = max(i, o) even (256) or not
    (300, 200, 160, 2, 3, "uniform"),
    (257, 96, 256, 1, 2, "packed"),
    (130, 256, 64, 3, 1, "contiguous"),
]


@pytest.mark.parametrize("route_config", ["fused/large", "fused/large_s4", "fused/small", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,i,o,K,B,kind", TILED)
def test_triton_routes_and_configs(triton_ops, monkeypatch, route_config, dtype, N, i, o, K, B, kind):
    mod, _common, dev = triton_ops
    route, _, config = route_config.partition("/")
    monkeypatch.setattr(_common, "LINEAR_ROUTE", route)
    if config:
        monkeypatch.setattr(_common, "linear_config", lambda *args: config)
    a, g, v, vb, gen = _inputs(N, i, o, K, dtype, N + i + o)
    seg = segments(N, B, kind, gen)
    want_w, want_b = ref.linear_dot(a, g, v, seg, B, vb)
    got_w, got_b = mod.linear_dot(a.to(dev), g.to(dev), v.to(dev), to(seg, dev), B, vb.to(dev))
    assert_matches(got_w, want_w, dtype, route_config)
    assert_matches(got_b, want_b, dtype, route_config)


def test_triton_linear_config_heuristic():
    from geffect_fast.ops.triton import _common

    cpu = torch.device("cpu")
    assert _common.linear_config(8192, 4096, 1, cpu) == "large"  # 2048 tiles for 132 SMs
    assert _common.linear_config(256, 1024, 1, cpu) == "small"  # 16 tiles of 128×128: too few
    assert set(_common.LINEAR_CONFIGS) >= {"large", "small"}
    big = _common.LINEAR_CONFIGS["large"]
    assert (big.BLOCK_M, big.BLOCK_N, big.BLOCK_K, big.num_warps) == (128, 128, 64, 8)


def test_triton_autotune_on_a_gpu(monkeypatch):
    """LINEAR_TUNING = "autotune" times every config once per shape bucket (a GPU feature: the interpreter has
    no timings); the tuned launch must give the same numbers as the heuristic one."""
    if not torch.cuda.is_available():
        pytest.skip("autotuning times kernels on a GPU (this machine has none; benchmarks/gpu_check.sh runs it)")
    from geffect_fast.ops.triton import _common
    from geffect_fast.ops.triton import linear_dot as mod

    monkeypatch.setattr(_common, "LINEAR_TUNING", "autotune")
    dev = torch.device("cuda")
    a, g, v, vb, gen = _inputs(600, 256, 192, 2, torch.bfloat16, 9)
    want_w, want_b = ref.linear_dot(a, g, v, 100, 6, vb)
    got_w, got_b = mod.linear_dot(a.to(dev), g.to(dev), v.to(dev), 100, 6, vb.to(dev))
    assert_matches(got_w, want_w, torch.bfloat16, "autotuned")
    assert_matches(got_b, want_b, torch.bfloat16, "autotuned")
