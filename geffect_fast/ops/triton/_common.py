"""What the Triton kernels share: the interpreter switch, launch configurations, the device a launch runs on.

Every kernel computes its offsets in 64 bits (index vectors are cast to int64 before they meet a stride), so
tensors past 2^31 elements — an lm_head's g of [N, 128k] at N ≥ 16,745 — are addressed correctly. No kernel
writes through a sample id: each writes per-token values, which :func:`geffect_fast.ops.contract.segment_sum`
reduces per sample (a reshape-sum for the uniform segments of ``measure()``: deterministic, no atomics).
The one exception is ``segment_outer`` over ragged segments (atomics, ids checked first).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, replace

import torch

#: dtypes the Triton kernels take (float64 goes to the reference or the compiled backends)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: ``linear_dot``'s route in this backend: "fused" (one tensor-core kernel, GEMM and epilogue together) or
#: "gemm" (torch's GEMM — cuBLAS on a GPU — in token chunks, then the Triton ``row_dot`` epilogue)
LINEAR_ROUTE = "fused"
#: how the fused kernel's tile shape is chosen: "heuristic" (:func:`linear_config`) or "autotune" (time
#: every config of :data:`LINEAR_CONFIGS` once per shape bucket with ``triton.autotune``; GPU only)
LINEAR_TUNING = os.environ.get("GEFFECT_FAST_AUTOTUNE", "0") == "1" and "autotune" or "heuristic"
#: directions per program of the row kernels (row_dot, embedding_dot, norm_dot); more are done in groups
MAX_K_PER_PROGRAM = 4


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1, which must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(t: torch.Tensor):
    """Launch on ``t``'s device, whatever the current CUDA device is (restored afterwards)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class LinearConfig:
    """Tile of the fused ``linear_dot`` kernel: BLOCK_M tokens × BLOCK_N epilogue features, BLOCK_K of the
    contracted dim per step; GROUP_M token tiles share each column band (grouped order, for L2 reuse)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def kwargs(self) -> dict[str, int]:
        return asdict(self)


#: every config ``auto`` can pick on a GPU (benchmarks/gpu_static.py compiles each for sm_90a and sm_80, in
#: every dot mode); "large_s4" is reached by autotuning only
LINEAR_CONFIGS: dict[str, LinearConfig] = {
    "large": LinearConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=3),
    "large_s4": LinearConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=4),
    "small": LinearConfig(64, 128, 64, GROUP_M=8, num_warps=4, num_stages=4),
}
#: BLOCK_K of the split and IEEE dot modes (1-3): their float32 direction tile goes through registers (the hi/lo
#: split) before shared memory, and at 64 the 128×128 tile spills on sm_80 (ptxas: 255 registers, 184 bytes)
SPLIT_BLOCK_K = 32


def linear_configs(mode: int) -> dict[str, LinearConfig]:
    """LINEAR_CONFIGS as the fused kernel uses them in dot ``mode`` (see :func:`half_split_mode`)."""
    if mode == 0:
        return LINEAR_CONFIGS
    return {name: replace(c, BLOCK_K=SPLIT_BLOCK_K) for name, c in LINEAR_CONFIGS.items()}


#: streaming multiprocessors assumed when no GPU can be asked (an H100 SXM has 132)
DEFAULT_SMS = 132


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def linear_config(N: int, C: int, K: int, device: torch.device) -> str:
    """Name of the fused kernel's config for N tokens, C epilogue features and K directions: 128×128 tiles
    when they give every SM a tile, else 64-token tiles (small batches)."""
    tiles = -(-N // 128) * -(-C // 128) * K
    return "large" if tiles >= sm_count(device) else "small"


@dataclass(frozen=True)
class RowsConfig:
    """Row kernels (row_dot, embedding_dot, norm_dot): BLOCK_N rows × BLOCK_D features per step, KP
    directions per program."""

    BLOCK_N: int
    BLOCK_D: int
    KP: int
    num_warps: int = 4


#: elements one program loads per step across its KP directions and its activations (registers)
ROWS_ELEMS = 8192


def rows_config(N: int, D: int, K: int, tiles_per_k: int = 1) -> RowsConfig:
    """Feature tiles of up to 512 (16-byte vector loads across 4 warps), as many rows per program as the
    register budget allows (at most 16; ``tiles_per_k`` [BLOCK_N, BLOCK_D] tiles live per direction), KP = K
    rounded up to a power of two (at most MAX_K_PER_PROGRAM)."""
    kp = 1
    while kp < min(K, MAX_K_PER_PROGRAM):
        kp *= 2
    bd = min(512, max(16, 1 << max(0, (D - 1).bit_length())))
    bn = max(1, min(16, ROWS_ELEMS // ((kp * tiles_per_k + 1) * bd)))
    bn = 1 << (bn.bit_length() - 1)  # a power of two
    return RowsConfig(bn, bd, kp)


def k_groups(K: int, kp: int):
    """(k0, k1) ranges of at most kp directions each."""
    return [(k0, min(K, k0 + kp)) for k0 in range(0, K, kp)]


def half_split_mode(x_dtype: torch.dtype, m_dtype: torch.dtype) -> int:
    """How the fused kernel multiplies x (activations) by m (direction): 0 same dtype (plain tl.dot),
    1 float32 m with bf16 x (m = hi + lo in bf16: two dots), 2 float32 m with fp16 x (m scaled by its max
    per direction, then hi + lo in fp16), 3 float32 (IEEE; also every mixed case after upcasting)."""
    if x_dtype == m_dtype and x_dtype != torch.float32:
        return 0
    if m_dtype == torch.float32 and x_dtype == torch.bfloat16:
        return 1
    if m_dtype == torch.float32 and x_dtype == torch.float16:
        return 2
    return 3
