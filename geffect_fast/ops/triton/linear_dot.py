"""Triton ``linear_dot``: out_w[k, b] = Σ_{t: seg_t=b} g_tᵀ V_k a_t and out_b[k, b] = Σ g_t · vb_k.

Two routes (``_common.LINEAR_ROUTE``):

* ``"fused"`` (default) — one tensor-core kernel. With r the contracted (larger) width and c the other, x1 the
  activations of width r, x2 those of width c and M_k the direction as [r, c] (Vᵀ when r = i, V when r = o;
  g_tᵀ V a_t = a_tᵀ Vᵀ g_t), a tile computes P = x1[tokens] M_k[:, cols] over r in BLOCK_K steps (tl.dot,
  float32 accumulation: wgmma on sm_90, mma on sm_80), then reads its x2 tile in the epilogue and writes
  Σ_cols P ⊙ x2, one partial per token and column band. The schedule is persistent: a grid of about
  ``programs_per_sm`` programs per SM walks the tiles (direction-major, then grouped order: GROUP_M token tiles
  per column band share M's tiles in L2), so one tile's epilogue overlaps the next tile's first loads. On sm_90
  the operand tiles come through TMA descriptors (the bulk tensor copy engine; out-of-range rows and columns
  read as zeros, so no step is masked) wherever the strides allow it (unit stride inside a row, 16-byte aligned
  rows and base); elsewhere, and on sm_80, through pointer loads in which only the last, partial BLOCK_K step
  (peeled off the loop) is masked along r. The partials [K, bands, N] are summed over bands and then per
  sample (a reshape-sum for uniform segments): deterministic, no atomics. Nothing of size [N, c] exists.
  Configs: ``_common.LINEAR_CONFIGS``, the one table benchmarks/gpu_static.py checks.
  A float32 direction with 16-bit activations is split in registers as M = M_hi + M_lo (bf16: two tl.dot of
  bf16 operands; fp16: M scaled by max|M_k| first), never an IEEE-FMA dot; its error is at most
  2^-16·|M| (bf16) or 2^-22·max|M_k| (fp16) per element of M (``geffect_fast.ops.gemm`` states the same
  split; Triton's CPU interpreter converts to bf16 by truncation, 2^-14·|M|). float32 activations with a
  float32 direction use IEEE dots (exact float32).
* ``"gemm"`` — torch's GEMM in token chunks (cuBLAS on a GPU) and the Triton ``row_dot`` epilogue
  (:func:`geffect_fast.ops.gemm.linear_dot_gemm`).

The bias term is the ``row_dot`` epilogue with vb broadcast to every row. Offsets are 64-bit throughout.
:func:`linear_dot` checks its arguments; :func:`linear_dot_kernel` is the same without the checks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import Seg, acc_dtype, check_linear, segment_sum
from ..gemm import linear_dot_gemm_kernel
from . import _common
from .row_dot import row_dot_tokens

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

#: use TMA descriptors on sm_90 where the strides allow ("auto"), never ("off"), or also on the CPU interpreter
#: ("force": the interpreter runs the descriptor path, as the tests do); never in the IEEE float32 mode
LINEAR_TMA = "auto"


@triton.jit
def _mac(acc, x, w, inv, MODE: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x @ w in dot ``MODE`` (see ``_common.half_split_mode``); ``inv`` = 1/max|M_k| in mode 2."""
    if MODE == 0:  # same 16-bit dtype: tensor cores directly
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    elif MODE == 3:  # float32 (or upcast mixed dtypes): exact IEEE dot
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:  # float32 direction, 16-bit activations: w = hi + lo in the activations' dtype
        if MODE == 2:
            w = w * inv
        w_hi = w.to(x.dtype, fp_downcast_rounding="rtne")
        w_lo = (w - w_hi.to(tl.float32)).to(x.dtype, fp_downcast_rounding="rtne")
        if UPCAST:
            xf = x.to(tl.float32)
            acc = tl.dot(xf, w_hi.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(xf, w_lo.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w_hi, acc)
            acc = tl.dot(x, w_lo, acc)
    return acc


@triton.jit
def _linear_dot_kernel(
    x1_ptr, m_ptr, x2_ptr, scale_ptr, part_ptr, x1_desc, m_desc, x2_desc,
    N, R, C, K,
    s10, s11, smk, smr, smc, s20, s21, spk, spb, N_BUCKET,
    MODE: tl.constexpr, UPCAST: tl.constexpr, EVEN_R: tl.constexpr, TMA: tl.constexpr, M_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(C, BLOCK_N)
    per_k = num_m * num_n
    width = GROUP_M * num_n
    offs_r = tl.arange(0, BLOCK_K).to(tl.int64)
    if EVEN_R:
        r_main = R
    else:
        r_main = R - R % BLOCK_K  # full BLOCK_K steps; the partial last one is peeled off the loop
    for tile in tl.range(tl.program_id(0), per_k * K, tl.num_programs(0)):
        k = (tile // per_k).to(tl.int64)
        t = tile % per_k
        # grouped order: GROUP_M consecutive token tiles walk the column bands together
        first_m = (t // width) * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (t % width) % gsize
        pid_n = (t % width) // gsize
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_m = offs_m < N
        mask_n = offs_n < C
        inv = 1.0
        if MODE == 2:
            inv = 1.0 / tl.load(scale_ptr + k)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if TMA:  # out-of-range rows and columns of a tile read as zeros: no masks
            for r0 in range(0, R, BLOCK_K):
                x = x1_desc.load([pid_m * BLOCK_M, r0])
                if M_T:  # M stored as [K, c, r] (unit stride over r)
                    w = tl.trans(tl.reshape(m_desc.load([k.to(tl.int32), pid_n * BLOCK_N, r0]), (BLOCK_N, BLOCK_K)))
                else:
                    w = tl.reshape(m_desc.load([k.to(tl.int32), r0, pid_n * BLOCK_N]), (BLOCK_K, BLOCK_N))
                acc = _mac(acc, x, w, inv, MODE, UPCAST)
        else:
            x_ptrs = x1_ptr + offs_m[:, None] * s10 + offs_r[None, :] * s11
            m_ptrs = m_ptr + k * smk + offs_r[:, None] * smr + offs_n[None, :] * smc
            for _r0 in range(0, r_main, BLOCK_K):  # masked along tokens and columns only (loop-invariant masks)
                x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                w = tl.load(m_ptrs, mask=mask_n[None, :], other=0.0)
                acc = _mac(acc, x, w, inv, MODE, UPCAST)
                x_ptrs += BLOCK_K * s11
                m_ptrs += BLOCK_K * smr
            if not EVEN_R:  # the peeled partial step
                mask_r = (r_main + offs_r) < R
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                w = tl.load(m_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                acc = _mac(acc, x, w, inv, MODE, UPCAST)
        if MODE == 2:
            acc = acc * tl.load(scale_ptr + k)
        if TMA:  # no per-element addresses (with them the 128×256 tile runs out of registers)
            x2 = x2_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N]).to(tl.float32)
        else:
            x2_ptrs = x2_ptr + offs_m[:, None] * s20 + offs_n[None, :] * s21
            x2 = tl.load(x2_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        part = tl.sum(acc * x2, axis=1)
        tl.store(part_ptr + k * spk + pid_n.to(tl.int64) * spb + offs_m, part, mask=mask_m)


_autotuned: dict[tuple[str, int], object] = {}


def _tuned_kernel(mode: int, arch: int):
    """The fused kernel under ``triton.autotune`` over every config of ``linear_configs(mode, arch)``, keyed by
    the shape (N rounded up to a power of two, R, C, K) and the dot mode: each key is timed once per process."""
    key = (_common._MODE_PREFIX[mode], arch)
    if key not in _autotuned:
        configs = [
            triton.Config(
                {"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K, "GROUP_M": c.GROUP_M},
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )
            for c in _common.linear_configs(mode, arch).values()
        ]
        _autotuned[key] = triton.autotune(configs, key=["N_BUCKET", "R", "C", "K", "MODE"])(_linear_dot_kernel)
    return _autotuned[key]


def _aligned(t: Tensor, strides: tuple[int, ...]) -> bool:
    """What a TMA descriptor over ``t``'s storage needs: a 16-byte aligned base, unit stride in the last dim and
    16-byte aligned other strides."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and strides[-1] == 1 and all(s * size % 16 == 0 for s in strides[:-1])


def _use_tma(x1: Tensor, m: Tensor, x2: Tensor, mode: int) -> tuple[bool, bool]:
    """(whether the tiles of x1, m and x2 come through TMA descriptors here, whether m is read as [K, c, r])."""
    m_t = m.stride(1) == 1 and m.stride(2) != 1
    if TensorDescriptor is None or LINEAR_TMA == "off":
        return False, m_t
    on_cpu = LINEAR_TMA == "force" and x1.device.type == "cpu"
    if not _common.uses_tma(mode, _common.arch_of(x1.device)) or not (on_cpu or x1.device.type == "cuda"):
        return False, m_t
    mt = (m.stride(0), m.stride(2), 1) if m_t else (m.stride(0), m.stride(1), m.stride(2))
    ok = _aligned(x1, (x1.stride(0), x1.stride(1))) and _aligned(m, mt) and _aligned(x2, (x2.stride(0), x2.stride(1)))
    return ok, m_t


def _launch_fused(x1: Tensor, m: Tensor, x2: Tensor, tok: Tensor, config: str | None = None) -> str:
    """tok[k, t] = (x1[t] M_k) · x2[t] for x1 [N, R], m [K, R, C], x2 [N, C] into tok [K, N] (float32).

    ``config``: a name from ``_common.LINEAR_CONFIGS`` launched in this dot mode on this arch (None: the
    heuristic's, or every one of them timed once per shape under ``LINEAR_TUNING = "autotune"``, with pointer
    loads). Returns what ran: "<config> tma", "<config> ptr" or "autotune ptr"."""
    N, R = x1.shape
    K, _, C = m.shape
    mode = _common.half_split_mode(x1.dtype, m.dtype)
    if mode == 3 and x1.dtype != m.dtype and torch.float32 not in (x1.dtype, m.dtype):
        x1, m = x1.float(), m.float()  # e.g. bf16 activations with an fp16 direction
    scale = m.abs().amax(dim=(1, 2)).float().clamp_min(torch.finfo(torch.float32).tiny) if mode == 2 else tok
    arch = _common.arch_of(x1.device)
    tune = config is None and _common.LINEAR_TUNING == "autotune" and x1.device.type == "cuda"
    tma, m_t = (False, m.stride(1) == 1 and m.stride(2) != 1) if tune else _use_tma(x1, m, x2, mode)
    table = _common.linear_configs(mode, arch, tma)
    if config is not None and config not in table:
        raise ValueError(f"config {config!r} is not launched in dot mode {mode} on compute capability {arch}.x "
                         f"with {'TMA' if tma else 'pointer loads'}; those that are: {list(table)}")  # fmt: skip
    cfgs = list(table.values()) if tune else [table[config or _common.linear_config(N, C, K, x1.device, mode, tma)]]
    bands = max(triton.cdiv(C, c.BLOCK_N) for c in cfgs)
    # a config with narrower bands leaves the extra band rows untouched: start from zeros when configs differ
    alloc = torch.zeros if len({c.BLOCK_N for c in cfgs}) > 1 else torch.empty
    part = alloc(K, bands, N, dtype=torch.float32, device=x1.device)
    sms = _common.sm_count(x1.device)
    cfg = cfgs[0]
    xd, md, x2d = x1, m, x2  # unused by the pointer path
    if tma:
        xd = TensorDescriptor(x1, [N, R], [x1.stride(0), 1], [cfg.BLOCK_M, cfg.BLOCK_K])
        x2d = TensorDescriptor(x2, [N, C], [x2.stride(0), 1], [cfg.BLOCK_M, cfg.BLOCK_N])
        if m_t:
            md = TensorDescriptor(m, [K, C, R], [m.stride(0), m.stride(2), 1], [1, cfg.BLOCK_N, cfg.BLOCK_K])
        else:
            md = TensorDescriptor(m, [K, R, C], [m.stride(0), m.stride(1), 1], [1, cfg.BLOCK_K, cfg.BLOCK_N])
    args = (
        x1, m, x2, scale, part, xd, md, x2d, N, R, C, K,
        x1.stride(0), x1.stride(1), m.stride(0), m.stride(1), m.stride(2), x2.stride(0), x2.stride(1),
        part.stride(0), part.stride(1),
    )  # fmt: skip
    flags = dict(MODE=mode, UPCAST=_common.interpreting(), TMA=tma, M_T=m_t)

    def programs(meta) -> tuple[int]:  # the persistent grid: programs_per_sm per SM at most, one per tile at most
        tiles = triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]) * K
        per_sm = next((c.programs_per_sm for c in cfgs if c.BLOCK_M == meta["BLOCK_M"]
                       and c.BLOCK_N == meta["BLOCK_N"]), 1)  # fmt: skip
        return (min(tiles, sms * per_sm),)

    if tune:
        even = all(R % c.BLOCK_K == 0 for c in cfgs)
        _tuned_kernel(mode, arch)[programs](*args, N_BUCKET=1 << max(0, (N - 1).bit_length()), EVEN_R=even, **flags)
        ran = "autotune ptr"
    else:
        kw = cfg.kwargs()
        _linear_dot_kernel[programs(kw)](*args, N_BUCKET=0, EVEN_R=tma or R % cfg.BLOCK_K == 0, **flags, **kw)
        ran = next(name for name, c in table.items() if c == cfg) + (" tma" if tma else " ptr")
    torch.sum(part, dim=1, out=tok)
    return ran


def linear_dot(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Triton implementation of :func:`geffect_fast.ops.reference.linear_dot` (float32 outputs)."""
    check_linear(a, g, v, seg, B, vb)
    return linear_dot_kernel(a, g, v, seg, B, vb)


def linear_dot_kernel(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`linear_dot` without the argument checks (``contract.check_linear`` holds for them)."""
    if _common.LINEAR_ROUTE == "gemm":
        with _common.on_device(g):
            return linear_dot_gemm_kernel(a, g, v, seg, B, vb, row_dot_tokens)
    if _common.LINEAR_ROUTE != "fused":
        raise ValueError(f"unknown LINEAR_ROUTE {_common.LINEAR_ROUTE!r}; use 'fused' or 'gemm'")
    if acc_dtype(a, g, v, vb) != torch.float32:
        raise TypeError("the Triton backend takes float32, bfloat16 and float16 (float64 goes to another backend)")
    N, o = g.shape
    K = (v if v is not None else vb).shape[0]
    out_w = out_b = None
    with _common.on_device(g):
        if v is not None:
            tok = torch.empty(K, N, dtype=torch.float32, device=g.device)
            if N:
                if a.dtype != g.dtype:
                    a = a.to(g.dtype)
                x1, x2, m = (a, g, v.transpose(1, 2)) if a.shape[1] >= o else (g, a, v)
                _launch_fused(x1, m, x2, tok)
            out_w = segment_sum(tok, seg, B)
        if vb is not None:
            tok = torch.empty(K, N, dtype=torch.float32, device=g.device)
            row_dot_tokens(vb[:, None, :].expand(K, N, o), g, tok)
            out_b = segment_sum(tok, seg, B)
    return out_w, out_b
