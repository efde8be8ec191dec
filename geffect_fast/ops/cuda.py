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
        return f"no CUDA device: {reason}"
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return "torch has no CUDA support in this build"
    return None


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
