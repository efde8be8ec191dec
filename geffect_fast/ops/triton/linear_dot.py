"""Triton ``linear_dot``: out_w[k, b] = Σ_{t: seg_t=b} g_tᵀ V_k a_t and out_b[k, b] = Σ g_t · vb_k.

Grid (token tiles, output-feature tiles, K). A program computes P = a_tile V_kᵀ over the input features in
BLOCK_I steps (tl.dot, float32 accumulation), multiplies by its g tile in the epilogue and reduces over
its outputs, giving one partial per token; the partials reach out[k, seg[t]] by atomic adds (or, with
SEGMENT_MODE = "two_pass", through a [K, tiles, N] buffer that torch sums and scatters). Nothing of size
[N, o] or [N, i] is formed beyond one tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import check_linear
from . import _common


@triton.jit
def _linear_dot_kernel(
    a_ptr, g_ptr, v_ptr, vb_ptr, seg_ptr, outw_ptr, outb_ptr,
    N, n_in, n_out, B,
    sa0, sa1, sg0, sg1, sv0, sv1, sv2, svb0, svb1, sseg,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_n = offs_n < N
    mask_o = offs_o < n_out
    mask_no = mask_n[:, None] & mask_o[None, :]
    g = tl.load(g_ptr + offs_n[:, None] * sg0 + offs_o[None, :] * sg1, mask=mask_no, other=0.0).to(tl.float32)
    seg = tl.load(seg_ptr + offs_n * sseg, mask=mask_n, other=0)
    n_tiles_o = tl.num_programs(1)
    if HAS_W:
        acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
        for i0 in range(0, n_in, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < n_in
            a = tl.load(
                a_ptr + offs_n[:, None] * sa0 + offs_i[None, :] * sa1, mask=mask_n[:, None] & mask_i[None, :], other=0.0
            )
            # Vᵀ tile [BLOCK_I, BLOCK_O] of V_k [n_out, n_in]
            vt = tl.load(
                v_ptr + k * sv0 + offs_o[None, :] * sv1 + offs_i[:, None] * sv2,
                mask=mask_i[:, None] & mask_o[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                vt = vt.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, vt, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, vt, acc)
        rw = tl.sum(acc * g, axis=1)
        if ATOMIC:
            tl.atomic_add(outw_ptr + k * B + seg, rw, mask=mask_n)
        else:
            tl.store(outw_ptr + (k * n_tiles_o + pid_o) * N + offs_n, rw, mask=mask_n)
    if HAS_B:
        vb = tl.load(vb_ptr + k * svb0 + offs_o * svb1, mask=mask_o, other=0.0).to(tl.float32)
        rb = tl.sum(g * vb[None, :], axis=1)
        if ATOMIC:
            tl.atomic_add(outb_ptr + k * B + seg, rb, mask=mask_n)
        else:
            tl.store(outb_ptr + (k * n_tiles_o + pid_o) * N + offs_n, rb, mask=mask_n)


def linear_dot(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Tensor, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Triton implementation of :func:`geffect_fast.ops.reference.linear_dot` (float32 outputs)."""
    N, i, o, K = check_linear(a, g, v, seg, B, vb)
    cfg = _common.linear_config(g.device)
    n_tiles_o = triton.cdiv(o, cfg.BLOCK_O)
    atomic = _common.SEGMENT_MODE == "atomic"
    out_w = None if v is None else _common.zeros_out(K, B, g.device)
    out_b = None if vb is None else _common.zeros_out(K, B, g.device)
    if N == 0:
        return out_w, out_b
    buf_w = out_w if atomic or v is None else torch.empty(K, n_tiles_o, N, device=g.device)
    buf_b = out_b if atomic or vb is None else torch.empty(K, n_tiles_o, N, device=g.device)
    has_w = v is not None
    dtypes = (g.dtype,) + ((a.dtype, v.dtype) if has_w else ())
    upcast = _common.upcast_needed(*dtypes)
    ieee = _common.FP32_PRECISION == "ieee" and (upcast or g.dtype == torch.float32)
    dummy = g  # placeholder pointer for absent operands (never read: the constexpr flags skip them)
    grid = (triton.cdiv(N, cfg.BLOCK_N), n_tiles_o, K)
    _linear_dot_kernel[grid](
        a if has_w else dummy, g, v if has_w else dummy, vb if vb is not None else dummy, seg,
        buf_w if buf_w is not None else dummy, buf_b if buf_b is not None else dummy,
        N, i, o, B,
        a.stride(0) if has_w else 0, a.stride(1) if has_w else 0, g.stride(0), g.stride(1),
        v.stride(0) if has_w else 0, v.stride(1) if has_w else 0, v.stride(2) if has_w else 0,
        vb.stride(0) if vb is not None else 0, vb.stride(1) if vb is not None else 0, seg.stride(0),
        HAS_W=has_w, HAS_B=vb is not None, UPCAST=upcast, IEEE=ieee, ATOMIC=atomic,
        BLOCK_N=cfg.BLOCK_N, BLOCK_O=cfg.BLOCK_O, BLOCK_I=cfg.BLOCK_I,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not atomic:
        s = seg.long()
        if out_w is not None:
            out_w.index_add_(1, s, buf_w.sum(1))
        if out_b is not None:
            out_b.index_add_(1, s, buf_b.sum(1))
    return out_w, out_b
