"""Triton ``linear_dot``: out_w[k, b] = Σ_{t: seg_t=b} g_tᵀ V_k a_t and out_b[k, b] = Σ g_t · vb_k.

Two routes (``_common.LINEAR_ROUTE``):

* ``"fused"`` (default) — one tensor-core kernel. With r the contracted (larger) width and c the other, x1 the
  activations of width r, x2 those of width c and M_k the direction as [r, c] (Vᵀ when r = i, V when r = o;
  g_tᵀ V a_t = a_tᵀ Vᵀ g_t), a program computes the tile P = x1[tokens] M_k[:, cols] over r in BLOCK_K steps
  (tl.dot, float32 accumulation: wgmma on sm_90, mma on sm_80), then reads its x2 tile in the epilogue and
  writes Σ_cols P ⊙ x2, one partial per token and column band. Tiles go in grouped order (GROUP_M token
  tiles per column band share M's tiles in L2). The partials [K, bands, N] are summed over bands and then
  per sample (a reshape-sum for uniform segments): deterministic, no atomics. Nothing of size [N, c] exists.
  A float32 direction with 16-bit activations is split in registers as M = M_hi + M_lo (bf16: two tl.dot of
  bf16 operands; fp16: M scaled by max|M_k| first), never an IEEE-FMA dot; its error is at most
  2^-16·|M| (bf16) or 2^-22·max|M_k| (fp16) per element of M (``geffect_fast.ops.gemm`` states the same
  split; Triton's CPU interpreter converts to bf16 by truncation, 2^-14·|M|). float32 activations with a
  float32 direction use IEEE dots (exact float32).
* ``"gemm"`` — torch's GEMM in token chunks (cuBLAS on a GPU) and the Triton ``row_dot`` epilogue
  (:func:`geffect_fast.ops.gemm.linear_dot_gemm`).

The bias term is the ``row_dot`` epilogue with vb broadcast to every row. Offsets are 64-bit throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import Seg, acc_dtype, check_linear, segment_sum
from ..gemm import linear_dot_gemm
from . import _common
from .row_dot import row_dot_tokens


@triton.jit
def _linear_dot_kernel(
    x1_ptr, m_ptr, x2_ptr, scale_ptr, part_ptr,
    N, R, C,
    s10, s11, smk, smr, smc, s20, s21, spk, spb, N_BUCKET,
    MODE: tl.constexpr, UPCAST: tl.constexpr, EVEN_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    # grouped order: GROUP_M consecutive token tiles walk the column bands together
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(C, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < N
    mask_n = offs_n < C
    if MODE == 2:
        inv = 1.0 / tl.load(scale_ptr + k)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rr = r0 + offs_r
        x_ptrs = x1_ptr + offs_m[:, None] * s10 + rr[None, :] * s11
        m_ptrs = m_ptr + k * smk + rr[:, None] * smr + offs_n[None, :] * smc
        if EVEN_R:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(m_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_r = rr < R
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            w = tl.load(m_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
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
    if MODE == 2:
        acc = acc * tl.load(scale_ptr + k)
    x2 = tl.load(
        x2_ptr + offs_m[:, None] * s20 + offs_n[None, :] * s21, mask=mask_m[:, None] & mask_n[None, :], other=0.0
    ).to(tl.float32)
    part = tl.sum(acc * x2, axis=1)
    tl.store(part_ptr + k * spk + pid_n.to(tl.int64) * spb + offs_m, part, mask=mask_m)


_autotuned: dict[bool, object] = {}


def _tuned_kernel(split: bool):
    """The fused kernel under ``triton.autotune`` over every config of ``linear_configs`` (native dots, or the
    split/IEEE modes), keyed by the shape (N rounded up to a power of two, R, C) and the dot mode: each key is
    timed once per process."""
    if split not in _autotuned:
        configs = [
            triton.Config(
                {"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N, "BLOCK_K": c.BLOCK_K, "GROUP_M": c.GROUP_M},
                num_warps=c.num_warps,
                num_stages=c.num_stages,
            )
            for c in _common.linear_configs(1 if split else 0).values()
        ]
        _autotuned[split] = triton.autotune(configs, key=["N_BUCKET", "R", "C", "MODE"])(_linear_dot_kernel)
    return _autotuned[split]


def _launch_fused(x1: Tensor, m: Tensor, x2: Tensor, tok: Tensor, config: str | None = None) -> None:
    """tok[k, t] = (x1[t] M_k) · x2[t] for x1 [N, R], m [K, R, C], x2 [N, C] into tok [K, N] (float32)."""
    N, R = x1.shape
    K, _, C = m.shape
    mode = _common.half_split_mode(x1.dtype, m.dtype)
    if mode == 3 and x1.dtype != m.dtype and torch.float32 not in (x1.dtype, m.dtype):
        x1, m = x1.float(), m.float()  # e.g. bf16 activations with an fp16 direction
    scale = m.abs().amax(dim=(1, 2)).float().clamp_min(torch.finfo(torch.float32).tiny) if mode == 2 else tok
    tune = config is None and _common.LINEAR_TUNING == "autotune" and x1.device.type == "cuda"
    cfgs = (
        list(_common.LINEAR_CONFIGS.values())
        if tune
        else [_common.LINEAR_CONFIGS[config or _common.linear_config(N, C, K, x1.device)]]
    )
    bands = max(triton.cdiv(C, c.BLOCK_N) for c in cfgs)
    # a config with wider bands leaves the extra band rows untouched: start from zeros when configs differ
    alloc = torch.zeros if len({c.BLOCK_N for c in cfgs}) > 1 else torch.empty
    part = alloc(K, bands, N, dtype=torch.float32, device=x1.device)
    args = (
        x1, m, x2, scale, part, N, R, C,
        x1.stride(0), x1.stride(1), m.stride(0), m.stride(1), m.stride(2), x2.stride(0), x2.stride(1),
        part.stride(0), part.stride(1),
    )  # fmt: skip
    if tune:

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]), K)

        even = all(R % c.BLOCK_K == 0 for c in cfgs)
        _tuned_kernel(mode != 0)[grid](
            *args, N_BUCKET=1 << max(0, (N - 1).bit_length()), MODE=mode, UPCAST=False, EVEN_R=even
        )
    else:
        cfg = cfgs[0]
        grid = (triton.cdiv(N, cfg.BLOCK_M) * triton.cdiv(C, cfg.BLOCK_N), K)
        _linear_dot_kernel[grid](
            *args, N_BUCKET=0, MODE=mode, UPCAST=_common.interpreting(), EVEN_R=R % cfg.BLOCK_K == 0, **cfg.kwargs()
        )
    torch.sum(part, dim=1, out=tok)


def linear_dot(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Triton implementation of :func:`geffect_fast.ops.reference.linear_dot` (float32 outputs)."""
    if _common.LINEAR_ROUTE == "gemm":
        with _common.on_device(g):
            return linear_dot_gemm(a, g, v, seg, B, vb, row_dot_tokens)
    if _common.LINEAR_ROUTE != "fused":
        raise ValueError(f"unknown LINEAR_ROUTE {_common.LINEAR_ROUTE!r}; use 'fused' or 'gemm'")
    N, i, o, K = check_linear(a, g, v, seg, B, vb)
    if acc_dtype(a, g, v, vb) != torch.float32:
        raise TypeError("the Triton backend takes float32, bfloat16 and float16 (float64 goes to another backend)")
    out_w = out_b = None
    with _common.on_device(g):
        if v is not None:
            tok = torch.empty(K, N, dtype=torch.float32, device=g.device)
            if N:
                if a.dtype != g.dtype:
                    a = a.to(g.dtype)
                x1, x2, m = (a, g, v.transpose(1, 2)) if i >= o else (g, a, v)
                _launch_fused(x1, m, x2, tok)
            out_w = segment_sum(tok, seg, B)
        if vb is not None:
            tok = torch.empty(K, N, dtype=torch.float32, device=g.device)
            row_dot_tokens(vb[:, None, :].expand(K, N, o), g, tok)
            out_b = segment_sum(tok, seg, B)
    return out_w, out_b
