"""The ``triton`` backend: one kernel per op file (linear_dot.py, embedding_dot.py, norm_dot.py,
segment_outer.py, and row_dot.py, the epilogue of linear_dot's GEMM route).

Runs on CUDA GPUs (sm_80/sm_90), and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported), which is how the tests run it here. float32, bfloat16 and float16 inputs
(activations and directions), float32 accumulation and outputs. ``_common.py`` holds the launch
configurations and what the kernels share (64-bit offsets, per-token outputs, no atomics on uniform segments).
"""

from __future__ import annotations

import importlib.util

import torch

from ._common import DTYPES, interpreting

NAME = "triton"


def built() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, ""


def unusable_reason(device: torch.device) -> str | None:
    ok, why = built()
    if not ok:
        return why
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (
        f"Triton kernels need a CUDA device (got {device.type}); on CPU they run only under the interpreter "
        "(TRITON_INTERPRET=1 before triton is imported)"
    )


def supports(dtype: torch.dtype) -> bool:
    return dtype in DTYPES


#: the ops, each in its own file; linear_dot, embedding_dot and norm_dot also as ``<op>_kernel`` (no checks)
_OPS = ("linear_dot", "embedding_dot", "norm_dot", "segment_outer", "row_dot")
_KERNELS = ("linear_dot_kernel", "embedding_dot_kernel", "norm_dot_kernel")


def get_op(name: str):
    """The kernel wrapper ``name``, an op or an ``<op>_kernel`` (imports triton on first use)."""
    if name in _OPS:
        return getattr(importlib.import_module(f"{__name__}.{name}"), name)
    if name in _KERNELS:
        return getattr(importlib.import_module(f"{__name__}.{name.removesuffix('_kernel')}"), name)
    raise AttributeError(name)
