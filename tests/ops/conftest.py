"""Every compiled/JIT backend against the torch reference (Liger-Kernel style: one test file per op)."""

import pytest
import torch

import geffect_fast.ops._native_common as native_common
from geffect_fast.ops import dispatch

KERNEL_BACKENDS = ["native", "triton", "cuda"]


def device_for(backend: str) -> torch.device:
    """Where a backend's tensors live: cuda on CUDA; triton on CUDA where there is a GPU, else on the CPU
    (Triton's interpreter); native and reference on the CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """(name, ops, device) of a backend usable here; skipped with the backend's own reason otherwise."""
    name = request.param
    dev = device_for(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{name}: needs a CUDA GPU (this machine has none; benchmarks/gpu_check.sh runs it on one)")
    why = dispatch.backends(dev)[name]["reason"]
    if why:
        pytest.skip(f"{name}: {why}")
    return name, dispatch.resolve(name, dev), dev


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Outputs start as NaN: a kernel that does not write (or zero) every element fails."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(native_common, "empty", poisoned)


# float64 runs on the reference, native and cuda backends; Triton takes float32/bf16/fp16
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
#: a float32 direction with 16-bit activations, split as hi + lo in the activations' dtype (ops/gemm.py):
#: ≤ 2^-16·|V| per element on hardware (bf16), 2^-14 under Triton's interpreter (it truncates); fp16 2^-22
SPLIT_TOL = {torch.bfloat16: 4e-5, torch.float16: 1e-6}


def skip_unsupported(name: str, dtype: torch.dtype) -> None:
    mod = dispatch._module(name)
    if not mod.supports(dtype):
        pytest.skip(f"{name} does not take {dtype} (the dispatcher sends it to another backend)")


def assert_matches(ours, ref, dtype, what=""):
    """Both computed from the same (rounded) inputs with float32/float64 accumulation: only the order of
    summation differs."""
    assert ours is not None and ref is not None
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ours).all(), f"{what}: non-finite output (an element was never written)"
    ours = ours.double().cpu()
    ref = ref.double().cpu()
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((ours - ref).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def segments(N: int, B: int, kind: str, gen: torch.Generator) -> torch.Tensor | int:
    """Sample ids: uniform (an int T, N = B·T: what measure() passes), contiguous runs (one sample spanning
    several blocks), or packed/shuffled with the last sample empty; int32 (the kernel contract) or int64
    alternate."""
    if kind == "uniform":
        assert N % B == 0, (N, B)
        return N // B
    if kind == "contiguous":
        seg = torch.arange(B).repeat_interleave((N + B - 1) // B)[:N]
    else:
        seg = torch.randint(0, max(1, B - 1), (N,), generator=gen)
    return seg.to(torch.int32 if N % 2 else torch.int64)


def to(seg, dev: torch.device):
    """``seg`` on ``dev`` (an int stays an int)."""
    return seg if isinstance(seg, int) else seg.to(dev)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max |ref|, in float64."""
    ours, ref = ours.double().cpu(), ref.double().cpu()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
