"""GPU-only checks (run by benchmarks/gpu_check.sh on a lent GPU): large shapes for the CUDA and Triton
kernels, float64 on CUDA, and measure() end to end on the GPU against the CPU reference."""

import pytest
import torch
from helpers import FAMILIES, assert_close_per_group, make_batch, make_model, random_direction

import geffect_fast as gf
from geffect_fast.ops import dispatch, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none here); benchmarks/gpu_check.sh runs these on one"
)

GPU_BACKENDS = ["cuda", "triton"]


def _ops(name, dtype):
    dev = torch.device("cuda")
    why = dispatch.backends(dev)[name]["reason"]
    if why:
        pytest.fail(f"{name} should run on this GPU: {why}")
    if not dispatch._module(name).supports(dtype):
        pytest.skip(f"{name} does not take {dtype}")
    return dispatch.resolve(name, dev, dtype)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("N,i,o,K", [(4099, 1024, 4096, 1), (1000, 4096, 1031, 3), (257, 576, 49152, 1)])
def test_linear_dot_large(name, dtype, tol, N, i, o, K):
    ops = _ops(name, dtype)
    gen = torch.Generator().manual_seed(N)
    a, g = torch.randn(N, i, generator=gen).to(dtype), torch.randn(N, o, generator=gen).to(dtype)
    v, vb = torch.randn(K, o, i, generator=gen).to(dtype), torch.randn(K, o, generator=gen).to(dtype)
    seg = torch.randint(0, 16, (N,), generator=gen).sort().values.int()
    ref_w, ref_b = reference.linear_dot(a.double(), g.double(), v.double(), seg, 16, vb.double())
    w, b = ops.linear_dot(a.cuda(), g.cuda(), v.cuda(), seg.cuda(), 16, vb.cuda())
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    # bf16 inputs are exact in float32 products; only the summation order differs from the float64 reference
    assert _rel(w, ref_w) <= tol * 10 and _rel(b, ref_b) <= tol * 10


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_and_norm_large(name, dtype):
    ops = _ops(name, dtype)
    gen = torch.Generator().manual_seed(0)
    N, vocab, d, K, B = 8191, 32000, 4096, 2, 32
    ids = torch.randint(0, vocab, (N,), generator=gen)
    g = torch.randn(N, d, generator=gen).to(dtype)
    V = torch.randn(K, vocab, d, generator=gen).to(dtype)
    seg = torch.arange(N) * B // N
    want = reference.embedding_dot(ids, g.double(), V.double(), seg, B, padding_idx=7)
    got = ops.embedding_dot(ids.cuda(), g.cuda(), V.cuda(), seg.cuda(), B, padding_idx=7)
    assert _rel(got, want) <= 1e-5
    xh = torch.randn(N, d, generator=gen).to(dtype)
    vw, vb = V[:, 0], V[:, 1]
    ww, wb = reference.norm_dot(xh.double(), g.double(), vw.double(), vb.double(), seg, B)
    gw, gb = ops.norm_dot(xh.cuda(), g.cuda(), vw.cuda(), vb.cuda(), seg.cuda(), B)
    assert _rel(gw, ww) <= 1e-5 and _rel(gb, wb) <= 1e-5


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton", "reference"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_measure_on_gpu_equals_cpu_reference(backend, family):
    model = make_model(family, dtype=torch.float32)
    batch = make_batch(model)
    V = random_direction(model, K=2)
    want = gf.measure(model, gf.Direction(V, names=["a", "b"]), {"r": batch}, per_instance=True, backend="reference")
    model.cuda()
    Vc = {n: t.cuda() for n, t in V.items()}
    got = gf.measure(
        model,
        gf.Direction(Vc, names=["a", "b"]),
        {"r": {k: t.cuda() for k, t in batch.items()}},
        per_instance=True,
        backend=backend,
    )
    assert_close_per_group(got.instances["r"], want.instances["r"], 1e-4, f"{family} {backend}")


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_segment_outer_large(name, dtype):
    ops = _ops(name, dtype)
    gen = torch.Generator().manual_seed(1)
    N, ku, kw, B = 8191, 64, 64, 16
    u, w = torch.randn(N, ku, generator=gen).to(dtype), torch.randn(N, kw, generator=gen).to(dtype)
    seg = (torch.arange(N) * B // N).int()
    want = reference.segment_outer(u.double(), w.double(), seg, B)
    got = ops.segment_outer(u.cuda(), w.cuda(), seg.cuda(), B)
    assert _rel(got, want) <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_pairwise_and_sketch_on_gpu_equal_cpu():
    from geffect_fast import objectives as O

    model = make_model("gpt2", dtype=torch.float64)
    f, r = make_batch(model, B=3, seed=1), make_batch(model, B=4, seed=2)
    want = gf.measure_pairwise(model, O.get("ga"), f, {"r": r}).matrix["r"]
    s_cpu = gf.Sketcher(model, k=8, seed=0).sketch(r)
    model.cuda()
    fc, rc = ({k: t.cuda() for k, t in b.items()} for b in (f, r))
    got = gf.measure_pairwise(model, O.get("ga"), fc, {"r": rc}).matrix["r"]
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * want.abs().max())
    s_gpu = gf.Sketcher(model, k=8, seed=0).sketch(rc)
    for n in s_cpu.tensors:
        assert torch.allclose(s_gpu.tensors[n], s_cpu.tensors[n], rtol=1e-4, atol=1e-6), n


def test_nccl_group_on_one_gpu(tmp_path):
    """The collective path with CUDA tensors (NCCL): a one-rank group, DDP and FSDP2, equals no group."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = make_model("llama", dtype=torch.float32).cuda()
        batch = {k: t.cuda() for k, t in make_batch(model).items()}
        V = {n: t[0].cuda() for n, t in random_direction(model).items()}
        want = gf.measure(model, V, {"r": batch}, per_instance=True, process_group=None)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        got = gf.measure(ddp, V, {"r": batch}, per_instance=True)
        assert got.meta["world_size"] == 1
        assert torch.allclose(got.instances["r"], want.instances["r"], rtol=1e-6, atol=1e-9)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        sharded = make_model("llama", dtype=torch.float32).cuda()
        mesh = init_device_mesh("cuda", (1,))
        for block in sharded.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        for route, pi in (("sharded", False), ("taps", True)):
            res = gf.measure(sharded, V, {"r": batch}, per_instance=pi)
            assert res.meta["strategy"] == route
            assert torch.allclose(res.group_totals["r"], want.group_totals["r"], rtol=1e-4, atol=1e-7)
    finally:
        dist.destroy_process_group()
