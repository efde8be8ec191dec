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
from dataclasses import asdict, dataclass

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
    contracted dim per step; GROUP_M token tiles share each column band (grouped order, for L2 reuse).
    ``modes``: the dot modes (:func:`half_split_mode`) it serves; ``archs``: the compute-capability majors it is
    launched on (8: sm_80-class, 9: sm_90); ``tma_only``: launched only with TMA descriptors (whose loads need
    no per-element addresses: with pointer loads the 128×256 tiles run out of registers); ``programs_per_sm``:
    the persistent grid's programs per SM."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    programs_per_sm: int = 1
    modes: tuple[int, ...] = (0,)
    archs: tuple[int, ...] = (8, 9)
    tma_only: bool = False

    def kwargs(self) -> dict[str, int]:
        """The kernel's tile constexprs and launch options."""
        d = asdict(self)
        for k in ("programs_per_sm", "modes", "archs", "tma_only"):
            d.pop(k)
        return d

    def label(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K} w{self.num_warps} s{self.num_stages}"


#: BLOCK_K of the split dot modes (1, 2): their float32 direction tile goes through registers (the hi/lo split)
#: before shared memory, and at 64 the 128×128 tile spills on sm_80 (ptxas: 255 registers, 184 bytes)
SPLIT_BLOCK_K = 32
#: BLOCK_K of the IEEE float32 mode (3): its dots are FMAs on register operands; at 32 the peeled 64×128 tile
#: spills on sm_80 (ptxas: 255 registers, 136 bytes)
FP32_BLOCK_K = 16

#: THE table of the fused kernel's configs: the launcher takes a config from here and nowhere else, and
#: benchmarks/gpu_static.py compiles each of them for sm_90a and sm_80 in every dot mode it serves, marking as
#: launched those :func:`linear_configs` gives for that arch. Per dot mode a "wide" (128×256, sm_90 with TMA
#: only: its 128 float32 accumulators per thread leave no registers for per-element addresses), a "large"
#: (128×128) and a "small" (64×128, small batches) tile; ``GEFFECT_FAST_AUTOTUNE=1`` times those of the
#: pointer path once per shape instead of the heuristic's pick.
LINEAR_CONFIGS: dict[str, LinearConfig] = {
    # 16-bit activations and direction of one dtype (mode 0): plain tensor-core dots
    "wide": LinearConfig(128, 256, 64, num_warps=8, num_stages=3, programs_per_sm=1, archs=(9,), tma_only=True),
    "large": LinearConfig(128, 128, 64, num_warps=8, num_stages=3, programs_per_sm=2),
    "small": LinearConfig(64, 128, 64, num_warps=8, num_stages=4, programs_per_sm=2),
    # a float32 direction on 16-bit activations (modes 1, 2): hi + lo, two tensor-core dots per step
    "split_wide": LinearConfig(
        128, 256, SPLIT_BLOCK_K, num_warps=8, num_stages=3, modes=(1, 2), archs=(9,), tma_only=True
    ),
    "split_large": LinearConfig(128, 128, SPLIT_BLOCK_K, num_warps=8, num_stages=3, programs_per_sm=2, modes=(1, 2)),
    "split_small": LinearConfig(64, 128, SPLIT_BLOCK_K, num_warps=8, num_stages=4, programs_per_sm=2, modes=(1, 2)),
    # float32 (IEEE dots; also mixed dtypes after upcasting): mode 3, pointer loads only (see uses_tma)
    "fp32_large": LinearConfig(128, 128, FP32_BLOCK_K, num_warps=8, num_stages=3, programs_per_sm=1, modes=(3,)),
    "fp32_small": LinearConfig(64, 128, FP32_BLOCK_K, num_warps=4, num_stages=4, programs_per_sm=2, modes=(3,)),
}
#: the prefix of each mode's configs in LINEAR_CONFIGS ("" for mode 0)
_MODE_PREFIX = {0: "", 1: "split_", 2: "split_", 3: "fp32_"}


def arch_of(device: torch.device) -> int:
    """The compute-capability major a launch on ``device`` compiles for: the GPU's, or 9 (an H100-class card)
    on the CPU under the interpreter, so the interpreter runs the configs a Hopper GPU would."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0]
    return 9


def uses_tma(mode: int, arch: int) -> bool:
    """Whether the fused kernel loads its tiles through TMA descriptors in dot ``mode`` on compute-capability
    major ``arch`` (where the tensors' strides allow it; the launcher checks them): on sm_90 and later, except in
    the IEEE float32 mode, whose FMA dots gain nothing from it (and spill from shared-memory operands)."""
    return arch >= 9 and mode != 3


def linear_configs(mode: int, arch: int | None = None, tma: bool | None = None) -> dict[str, LinearConfig]:
    """The configs of LINEAR_CONFIGS the fused kernel can launch in dot ``mode`` (see :func:`half_split_mode`)
    on compute-capability major ``arch`` (None: on any; architectures past 9 take sm_90's configs, before 8
    sm_80's), with TMA descriptors (``tma`` True) or pointer loads (False; None: either)."""
    out = {}
    for name, c in LINEAR_CONFIGS.items():
        if mode not in c.modes:
            continue
        if arch is not None and min(max(arch, 8), 9) not in c.archs:
            continue
        if tma is False and c.tma_only:
            continue
        out[name] = c
    return out


#: streaming multiprocessors assumed when no GPU can be asked (an H100 SXM has 132)
DEFAULT_SMS = 132


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def linear_config(N: int, C: int, K: int, device: torch.device, mode: int = 0, tma: bool | None = None) -> str:
    """Name of the fused kernel's config for N tokens, C epilogue features, K directions and dot ``mode`` (with
    TMA descriptors or not; None: as :func:`uses_tma` says for the device): the widest tile of the mode on this
    arch (128×256 on sm_90 with TMA, else 128×128) when its tiles give every SM one, else 128×128 if those do,
    else 64-token tiles (small batches)."""
    arch = arch_of(device)
    sms = sm_count(device)
    prefix = _MODE_PREFIX[mode]
    avail = linear_configs(mode, arch, uses_tma(mode, arch) if tma is None else tma)
    for name in ("wide", "large"):
        c = LINEAR_CONFIGS.get(prefix + name)
        if prefix + name in avail and -(-N // c.BLOCK_M) * -(-C // c.BLOCK_N) * K >= sms:
            return prefix + name
    return prefix + "small"


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
