"""The ``native`` backend: C++/OpenMP CPU kernels from ``csrc/cpu`` (module ``geffect_fast._C_cpu``).

Fused loops with no gathered or upcast copies of the inputs: V_k[ids] is read in place (embedding_dot),
g ⊙ x̂ is formed one row at a time (norm_dot), and linear_dot streams token tiles past a thread's block of
V rows. Runs on CPU tensors of float32, float64, bfloat16 and float16 with float32 (float64)
accumulation, on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import torch

from ._native_common import KernelOps, supports  # noqa: F401  (re-exported: the backend interface)

try:
    from .. import _C_cpu as _ext

    _IMPORT_ERROR = None
except ImportError as e:  # not built (e.g. a source checkout used without pip install)
    _ext = None
    _IMPORT_ERROR = str(e)

NAME = "native"


def built() -> tuple[bool, str]:
    return (_ext is not None, "" if _ext is not None else f"extension geffect_fast._C_cpu not built: {_IMPORT_ERROR}")


def unusable_reason(device: torch.device) -> str | None:
    ok, why = built()
    if not ok:
        return why
    if device.type != "cpu":
        return f"the native backend runs on CPU tensors, not {device.type}"
    return None


def _call(fn, *args, device):
    if device.type != "cpu":
        raise ValueError(f"the native backend takes CPU tensors, got {device}")
    fn(*args, torch.get_num_threads())


_ops = KernelOps(_ext, lambda: built()[1], _call)
linear_dot = _ops.linear_dot
embedding_dot = _ops.embedding_dot
norm_dot = _ops.norm_dot
segment_outer = _ops.segment_outer
#: the ops without their argument checks (the engine calls these once its plan has checked the shapes)
linear_dot_kernel = _ops.linear_dot_kernel
embedding_dot_kernel = _ops.embedding_dot_kernel
norm_dot_kernel = _ops.norm_dot_kernel
