"""Triton ``segment_outer``: out[b] = Σ_{t: seg_t=b} u_t w_tᵀ, [B, ku, kw] — the Kronecker sketch's accumulation.

Uniform segments (an int T) are one batched GEMM (:func:`geffect_fast.ops.gemm.segment_outer_bmm`). Ragged
ones (a Tensor of ids, checked to lie in [0, B) first) go to a kernel over (token tiles, ku tiles, kw
tiles): a program forms the [BLOCK_N, BLOCK_U, BLOCK_W] outer products of its tokens and adds them to
out[seg_t] with atomic adds (64-bit offsets); nothing of size [N, ku, kw] exists beyond one tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import Seg, check_seg_values, check_segment_outer
from ..gemm import segment_outer_bmm
from . import _common


@triton.jit
def _segment_outer_kernel(
    u_ptr, w_ptr, seg_ptr, out_ptr,
    N, KU, KW,
    su0, su1, sw0, sw1, sseg,
    BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_u = tl.program_id(1)
    pid_w = tl.program_id(2)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_u = pid_u.to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U).to(tl.int64)
    offs_w = pid_w.to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    mn, mu, mw = offs_n < N, offs_u < KU, offs_w < KW
    u = tl.load(u_ptr + offs_n[:, None] * su0 + offs_u[None, :] * su1, mask=mn[:, None] & mu[None, :], other=0.0)
    w = tl.load(w_ptr + offs_n[:, None] * sw0 + offs_w[None, :] * sw1, mask=mn[:, None] & mw[None, :], other=0.0)
    prod = u.to(tl.float32)[:, :, None] * w.to(tl.float32)[:, None, :]
    seg = tl.load(seg_ptr + offs_n * sseg, mask=mn, other=0).to(tl.int64)
    ptrs = out_ptr + (seg[:, None, None] * KU + offs_u[None, :, None]) * KW + offs_w[None, None, :]
    tl.atomic_add(ptrs, prod, mask=mn[:, None, None] & mu[None, :, None] & mw[None, None, :], sem="relaxed")


def segment_outer(u: Tensor, w: Tensor, seg: Seg, B: int) -> Tensor:
    """Triton implementation of :func:`geffect_fast.ops.pairwise.segment_outer` (float32 output)."""
    N, ku, kw = check_segment_outer(u, w, seg, B)
    if isinstance(seg, int):
        return segment_outer_bmm(u, w, seg, B).float()
    check_seg_values(seg, B)
    out = torch.zeros((B, ku, kw), dtype=torch.float32, device=u.device)
    if N == 0:
        return out
    bn, bu, bw = 16, 32, 32
    grid = (triton.cdiv(N, bn), triton.cdiv(ku, bu), triton.cdiv(kw, bw))
    with _common.on_device(u):
        _segment_outer_kernel[grid](
            u, w, seg, out, N, ku, kw, u.stride(0), u.stride(1), w.stride(0), w.stride(1), seg.stride(0),
            BLOCK_N=bn, BLOCK_U=bu, BLOCK_W=bw,
        )  # fmt: skip
    return out
