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
    # N, i, o, K, B, segments: several 128-token tiles and column bands; r = max(i, o) a multiple of every
    # BLOCK_K (256), or not (200: a peeled partial step), or below one BLOCK_K (24)
    (300, 200, 160, 2, 3, "uniform"),
    (257, 96, 256, 1, 2, "packed"),
    (130, 256, 64, 3, 1, "contiguous"),
    (70, 24, 20, 1, 2, "uniform"),
]
#: per dot mode (``_common.half_split_mode``): the (activations, direction) dtypes that give it
MODE_DTYPES = {
    0: [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
    1: [(torch.bfloat16, torch.float32)],
    2: [(torch.float16, torch.float32)],
    3: [(torch.float32, torch.float32)],
}


def _config_cases():
    from geffect_fast.ops.triton._common import LINEAR_CONFIGS

    return [
        pytest.param(name, act, vdt, id=f"{name}-{str(act)[6:]}-{str(vdt)[6:]}")
        for name, c in LINEAR_CONFIGS.items()
        for mode in c.modes
        for act, vdt in MODE_DTYPES[mode]
    ]


@pytest.mark.parametrize("tma", ["off", "force"], ids=["pointer-loads", "tma-descriptors"])
@pytest.mark.parametrize("config,act,vdt", _config_cases())
@pytest.mark.parametrize("N,i,o,K,B,kind", TILED)
def test_triton_fused_every_config(triton_ops, monkeypatch, tma, config, act, vdt, N, i, o, K, B, kind):
    """Every config of the one table, in each dot mode it serves, with pointer loads (the last partial BLOCK_K
    step peeled off) and with TMA descriptors (out-of-range reads as zeros), against the reference."""
    mod, _common, dev = triton_ops
    # TMA where the strides allow it (16-byte rows of x1, M and x2), never in the IEEE float32 mode
    aligned = max(i, o) * act.itemsize % 16 == 0 and min(i, o) * act.itemsize % 16 == 0
    hopper = dev.type == "cpu" or _common.arch_of(dev) >= 9  # the interpreter runs sm_90's configs
    tma_ok = tma == "force" and aligned and act != torch.float32 and hopper
    if not tma_ok and _common.LINEAR_CONFIGS[config].tma_only:
        pytest.skip(f"{config} is launched with TMA descriptors only")
    monkeypatch.setattr(mod, "LINEAR_TMA", tma)
    monkeypatch.setattr(_common, "linear_config", lambda *args: config)
    ran = []
    launch = mod._launch_fused
    monkeypatch.setattr(mod, "_launch_fused", lambda *a, **k: ran.append(launch(*a, **k)))
    a, g, v, vb, gen = _inputs(N, i, o, K, act, N + i + o, vdtype=vdt)
    seg = segments(N, B, kind, gen)
    want_w, want_b = ref.linear_dot(a.double(), g.double(), v.double(), seg, B, vb.double())
    got_w, got_b = mod.linear_dot(a.to(dev), g.to(dev), v.to(dev), to(seg, dev), B, vb.to(dev))
    assert ran == [f"{config} {'tma' if tma_ok else 'ptr'}"], ran
    if act == vdt:
        assert_matches(got_w, want_w, act, config)
    else:
        assert rel_err(got_w, want_w) <= SPLIT_TOL[act], (config, rel_err(got_w, want_w))
    assert_matches(got_b, want_b, torch.float32 if act != vdt else act, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,i,o,K,B,kind", TILED[:3])
def test_triton_gemm_route(triton_ops, monkeypatch, dtype, N, i, o, K, B, kind):
    mod, _common, dev = triton_ops
    monkeypatch.setattr(_common, "LINEAR_ROUTE", "gemm")
    a, g, v, vb, gen = _inputs(N, i, o, K, dtype, N + i + o)
    seg = segments(N, B, kind, gen)
    want_w, want_b = ref.linear_dot(a, g, v, seg, B, vb)
    got_w, got_b = mod.linear_dot(a.to(dev), g.to(dev), v.to(dev), to(seg, dev), B, vb.to(dev))
    assert_matches(got_w, want_w, dtype, "gemm")
    assert_matches(got_b, want_b, dtype, "gemm")


def test_triton_tma_falls_back_to_pointer_loads_where_strides_do_not_allow_it(triton_ops, monkeypatch):
    """Rows of 33 bf16 values (66 bytes) and a non-unit inner stride cannot be TMA tiles: pointer loads run."""
    mod, _common, dev = triton_ops
    if dev.type == "cuda":
        pytest.skip("checks the launcher's choice on the interpreter")
    monkeypatch.setattr(mod, "LINEAR_TMA", "force")
    a, g, v, _, _ = _inputs(40, 33, 16, 1, torch.bfloat16, 1)
    m = v.transpose(1, 2)
    tok = torch.empty(1, 40)
    assert mod._launch_fused(a, m, g, tok, config="small").endswith(" ptr")
    want = ref.linear_dot(a, g, v, 1, 40)[0]
    assert_matches(tok, want, torch.bfloat16)
    a2 = torch.randn(40, 64, 2).to(torch.bfloat16)[:, :, 0]  # inner stride 2
    v2 = torch.randn(1, 16, 64).to(torch.bfloat16)
    assert mod._launch_fused(a2, v2.transpose(1, 2), g, tok, config="small").endswith(" ptr")
    assert_matches(tok, ref.linear_dot(a2, g, v2, 1, 40)[0], torch.bfloat16)
    a3 = torch.randn(40, 64).to(torch.bfloat16)
    assert mod._launch_fused(a3, v2.transpose(1, 2), g, tok, config="small").endswith(" tma")
    assert_matches(tok, ref.linear_dot(a3, g, v2, 1, 40)[0], torch.bfloat16)
    g3 = torch.randn(40, 17).to(torch.bfloat16)  # x2 rows of 34 bytes
    v3 = torch.randn(1, 17, 64).to(torch.bfloat16)
    assert mod._launch_fused(a3, v3.transpose(1, 2), g3, tok, config="small").endswith(" ptr")
    assert_matches(tok, ref.linear_dot(a3, g3, v3, 1, 40)[0], torch.bfloat16)
    with pytest.raises(ValueError, match="not launched"):  # the 128×256 tile needs TMA
        mod._launch_fused(a3, v3.transpose(1, 2), g3, tok, config="wide")


def test_triton_linear_config_heuristic(monkeypatch):
    from geffect_fast.ops.triton import _common

    cpu = torch.device("cpu")  # configs as on an sm_90 card with 132 SMs
    assert _common.linear_config(8192, 4096, 1, cpu) == "wide"  # 1024 tiles of 128×256
    assert _common.linear_config(8192, 4096, 1, cpu, mode=1) == "split_wide"
    assert _common.linear_config(8192, 4096, 1, cpu, mode=3) == "fp32_large"  # no wide fp32 tile
    assert _common.linear_config(2048, 2048, 1, cpu) == "large"  # 128 wide tiles: too few; 256 of 128×128: enough
    assert _common.linear_config(256, 1024, 1, cpu) == "small"  # 16 tiles of 128×128: too few
    assert _common.linear_config(256, 1024, 1, cpu, mode=2) == "split_small"
    monkeypatch.setattr(_common, "arch_of", lambda dev: 8)  # an sm_80 card: no 128×256 tiles
    assert _common.linear_config(8192, 4096, 1, cpu) == "large"
    assert "wide" not in _common.linear_configs(0, 8) and "wide" in _common.linear_configs(0, 9)
    for mode in range(4):
        for arch in (8, 9):
            table = _common.linear_configs(mode, arch)
            assert table and all(mode in c.modes for c in table.values())
            want_bk = {0: 64, 1: _common.SPLIT_BLOCK_K, 2: _common.SPLIT_BLOCK_K, 3: _common.FP32_BLOCK_K}[mode]
            assert all(c.BLOCK_K == want_bk for c in table.values())
            assert "wide" not in "".join(_common.linear_configs(mode, arch, tma=False))  # 128×256: TMA only
    big = _common.LINEAR_CONFIGS["wide"]
    assert (big.BLOCK_M, big.BLOCK_N, big.BLOCK_K, big.num_warps) == (128, 256, 64, 8)


def test_triton_config_not_launched_on_this_arch_is_refused(triton_ops, monkeypatch):
    mod, _common, dev = triton_ops
    monkeypatch.setattr(_common, "arch_of", lambda dev: 8)
    a, g, v, _, _ = _inputs(40, 64, 16, 1, torch.bfloat16, 1)
    with pytest.raises(ValueError, match="not launched"):
        mod._launch_fused(a.to(dev), v.transpose(1, 2).to(dev), g.to(dev), torch.empty(1, 40, device=dev), "wide")


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
