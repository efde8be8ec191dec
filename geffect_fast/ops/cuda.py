"""The ``cuda`` backend: CUDA kernels from ``csrc/cuda`` (module ``geffect_fast._C_cuda``), launched on
torch's current stream of the tensors' device.

The module links the static CUDA runtime, so it builds wherever nvcc is and imports on machines without a
GPU; ``unusable_reason`` then says why it cannot run. float32, float64, bfloat16 and float16 inputs,
float32 (float64) accumulation, one atomicAdd per token and tile into the [K, B] output.
"""

from __future__ import annotations

import torch

from ._native_common import KernelOps, supports  # noqa: F401  (re-exported: the backend interface)

try:
    from .. import _C_cuda as _ext

    _IMPORT_ERROR = None
except ImportError as e:  # built without nvcc, or not built
    _ext = None
    _IMPORT_ERROR = str(e)

NAME = "cuda"


def built() -> tuple[bool, str]:
    if _ext is None:
        return False, (
            f"extension geffect_fast._C_cuda not built ({_IMPORT_ERROR}); it builds when nvcc is found at install "
            "time (GEFFECT_FAST_CUDA=1 forces it)"
        )
    return True, ""


def unusable_reason(device: torch.device) -> str | None:
    ok, why = built()
    if not ok:
        return why
    n, reason = _ext.device_count()
    if n == 0:
        return f"no CUDA device: {_driver_reason(reason)}"
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return "torch has no CUDA support in this build"
    return None


def _load_driver():
    """The NVIDIA driver library (libcuda), or None when this machine has none."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _driver_reason(runtime_reason: str) -> str:
    """The CUDA runtime's reason for seeing no device, said plainly: the statically linked runtime reports a
    machine without any NVIDIA driver as "driver version is insufficient", so look for the driver first."""
    import ctypes

    lib = _load_driver()
    if lib is None:
        return "no NVIDIA driver on this machine (libcuda could not be loaded); the cuda backend needs a CUDA GPU"
    version = ctypes.c_int(0)
    try:
        ok = lib.cuDriverGetVersion(ctypes.byref(version)) == 0
    except AttributeError:  # pragma: no cover - not a CUDA driver library
        ok = False
    if ok and "insufficient" in runtime_reason:
        v, rt = version.value, _ext.runtime_version()
        return (
            f"the NVIDIA driver supports CUDA {v // 1000}.{v % 1000 // 10}, older than the CUDA {rt // 1000}."
            f"{rt % 1000 // 10} runtime this module was built with ({runtime_reason})"
        )
    return runtime_reason


def _call(fn, *args, device):
    if device.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors, got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn(*args, index, torch.cuda.current_stream(index).cuda_stream)


_ops = KernelOps(_ext, lambda: built()[1], _call)
linear_dot = _ops.linear_dot
embedding_dot = _ops.embedding_dot
norm_dot = _ops.norm_dot
segment_outer = _ops.segment_outer
