"""What the Triton kernels share: the interpreter switch, launch configurations, output allocation."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

#: dtypes the Triton kernels take (float64 goes to the reference or the compiled backends)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: how per-token sums reach out[k, seg[t]]: "atomic" (one atomic add per token and tile) or "two_pass"
#: (per-tile partials written to a buffer, then summed and scattered by torch) — measured on GPU.
SEGMENT_MODE = "atomic"
#: tl.dot precision for float32 inputs: "ieee" keeps float32 exact; "tf32" trades 1e-3 for speed
FP32_PRECISION = "ieee"


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1, which must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LinearConfig:
    BLOCK_N: int
    BLOCK_O: int
    BLOCK_I: int
    num_warps: int = 4
    num_stages: int = 3


def linear_config(device: torch.device) -> LinearConfig:
    # the interpreter pays per program and per element alike: small tiles keep its tests fast
    if device.type != "cuda":
        return LinearConfig(16, 32, 32)
    return LinearConfig(64, 64, 32, num_warps=4, num_stages=3)


def rows_config(device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the row-wise kernels (embedding_dot, norm_dot)."""
    return (16, 32) if device.type != "cuda" else (32, 128)


def zeros_out(K: int, B: int, device: torch.device) -> Tensor:
    """A float32 [K, B] output, zeroed (the kernels accumulate into it with atomics)."""
    from .._native_common import empty

    return empty((K, B), torch.float32, device).zero_()


def upcast_needed(*dtypes: torch.dtype) -> bool:
    """Upcast tiles to float32 before tl.dot: under the interpreter (its bf16 dot is wrong), for float32
    inputs, and when operand dtypes differ."""
    return interpreting() or len(set(dtypes)) > 1 or torch.float32 in dtypes
