"""Backend selection, and measure() end to end with each usable backend against the reference backend."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, assert_close_per_group, make_batch, make_model, random_direction

import geffect_fast as gf
from geffect_fast.ops import dispatch


def _nvcc_present() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def test_backends_report():
    info = gf.backends()
    assert set(info) == {"reference", "native", "cuda", "triton"}
    for name, d in info.items():
        assert set(d) == {"built", "usable", "reason", "auto_ops"}
        assert d["usable"] == (d["reason"] == ""), name
        assert not d["auto_ops"] or d["usable"], name  # auto never picks a backend that cannot run
    assert info["reference"]["usable"]
    assert info["native"]["built"], info["native"]["reason"]  # the CPU module always builds
    # the test extras install triton, and conftest turns its interpreter on where there is no GPU: the Triton
    # kernels must run in every test session, never be skipped quietly
    assert info["triton"]["built"], info["triton"]["reason"]
    assert gf.backends("cuda" if torch.cuda.is_available() else "cpu")["triton"]["usable"]
    if _nvcc_present():
        # CI compiles the CUDA part wherever nvcc is; it must import without a GPU
        assert info["cuda"]["built"], info["cuda"]["reason"]
    if not torch.cuda.is_available():
        assert not info["cuda"]["usable"] and info["cuda"]["reason"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backends_say_what_auto_picks_per_op_here(device):
    """Every op goes to exactly one backend, the one resolve("auto") uses for that device and dtype."""
    from geffect_fast.ops.contract import OPS

    for dtype in (torch.float32, torch.float64):
        info = gf.backends(device, dtype)
        picked = [op for d in info.values() for op in d["auto_ops"]]
        assert sorted(picked) == sorted(OPS)
        label = dispatch.resolve("auto", torch.device(device), dtype, dtype).name
        for name, d in info.items():
            for op in d["auto_ops"]:
                assert f"{op}={name}" in label
    if device == "cpu":
        assert gf.backends("cpu")["reference"]["auto_ops"] == ["linear_dot"]  # the measured CPU table
        if gf.backends("cpu")["native"]["usable"]:
            assert gf.backends("cpu")["native"]["auto_ops"] == ["embedding_dot", "norm_dot", "segment_outer"]


def test_cuda_reason_on_a_machine_without_any_driver(monkeypatch):
    """The static CUDA runtime calls a machine with no NVIDIA driver at all "driver version is insufficient";
    backends() says there is no driver instead, and keeps the runtime's words when a driver is too old."""
    import types

    from geffect_fast.ops import cuda

    fake = types.SimpleNamespace(
        device_count=lambda: (0, "CUDA driver version is insufficient for CUDA runtime version"),
        runtime_version=lambda: 12080,
    )
    monkeypatch.setattr(cuda, "_ext", fake)
    monkeypatch.setattr(cuda, "_load_driver", lambda: None)
    why = cuda.unusable_reason(torch.device("cuda"))
    assert "no NVIDIA driver on this machine" in why and "insufficient" not in why
    dispatch._reason.cache_clear()  # reasons are kept per process; this one is made up
    try:
        assert gf.backends("cpu")["cuda"]["reason"] == why and not gf.backends("cpu")["cuda"]["usable"]
    finally:
        dispatch._reason.cache_clear()

    class OldDriver:
        @staticmethod
        def cuDriverGetVersion(ptr):
            ptr._obj.value = 11040
            return 0

    monkeypatch.setattr(cuda, "_load_driver", lambda: OldDriver())
    why = cuda.unusable_reason(torch.device("cuda"))
    assert "driver supports CUDA 11.4, older than the CUDA 12.8 runtime" in why and "insufficient" in why


def test_cuda_module_loads_without_a_gpu():
    if not _nvcc_present():
        pytest.skip("built without nvcc: there is no CUDA module to load")
    from geffect_fast import _C_cuda

    n, why = _C_cuda.device_count()
    assert _C_cuda.runtime_version() >= 12000
    if not torch.cuda.is_available():
        assert n == 0 and why


def test_naming_a_backend_that_cannot_run_is_a_clear_error():
    model = make_model("llama")
    V = {n: t[0] for n, t in random_direction(model).items()}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
            gf.measure(model, V, make_batch(model), backend="cuda")
    with pytest.raises(RuntimeError, match="triton backend does not support torch.float64"):
        dispatch.resolve("triton", torch.device("cpu"), torch.float64)


def test_auto_follows_the_measured_table():
    b = dispatch.resolve("auto", torch.device("cpu"), torch.float32)
    for op in ("linear_dot", "embedding_dot", "norm_dot"):
        first_usable = next(n for n in dispatch.AUTO["cpu"][op] if gf.backends()[n]["usable"])
        assert f"{op}={first_usable}" in b.name
    model = make_model("llama")
    V = {n: t[0] for n, t in random_direction(model).items()}
    want = dispatch.resolve("auto", torch.device("cpu"), torch.float64).name
    assert gf.measure(model, V, make_batch(model)).meta["backend"] == want


def _usable_cpu_backends():
    return [n for n, d in gf.backends("cpu").items() if d["usable"] and n != "reference"]


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_measure_with_each_backend_equals_reference(backend, family):
    if backend not in _usable_cpu_backends():
        pytest.skip(f"{backend}: {gf.backends()[backend]['reason']}")
    dtype = torch.float64 if dispatch._module(backend).supports(torch.float64) else torch.float32
    model = make_model(family, dtype=dtype)
    batch = make_batch(model)
    v = gf.Direction(random_direction(model, K=2), names=["a", "b"])
    ref = gf.measure(model, v, {"r": batch}, per_instance=True, backend="reference")
    ours = gf.measure(model, v, {"r": batch}, per_instance=True, backend=backend)
    assert ours.meta["backend"] == backend
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_per_group(ours.instances["r"], ref.instances["r"], tol, f"{backend} {family}")


def test_auto_looks_at_the_direction_dtype_too(monkeypatch):
    """A float64 direction on a float32 model goes past Triton (float32/bf16/fp16 only), not into it."""
    if not gf.backends("cpu")["triton"]["usable"]:
        pytest.skip(f"triton: {gf.backends('cpu')['triton']['reason']}")
    monkeypatch.setitem(dispatch.AUTO["cpu"], "linear_dot", ("triton", "reference"))
    cpu = torch.device("cpu")
    assert "linear_dot=triton" in dispatch.resolve("auto", cpu, torch.float32, torch.float32).name
    assert "linear_dot=triton" in dispatch.resolve("auto", cpu, torch.bfloat16, torch.float32).name
    assert "linear_dot=reference" in dispatch.resolve("auto", cpu, torch.float32, torch.float64).name
    with pytest.raises(RuntimeError, match="triton backend does not support torch.float64"):
        dispatch.resolve("triton", cpu, torch.float32, torch.float64)
