"""Triton ``segment_outer``: out[b] = Σ_{t: seg_t=b} u_t w_tᵀ, [B, ku, kw] — the Kronecker sketch's accumulation.

Uniform segments (an int T) are one batched GEMM (:func:`geffect_fast.ops.gemm.segment_outer_bmm`). Ragged
ones (a Tensor of ids, checked to lie in [0, B) first) go to a kernel over (ku tiles, kw tiles, chunks of TOK
tokens): a program sums u_t w_tᵀ over its tokens in a [BLOCK_U, BLOCK_W] register tile and adds the sum to
out[seg] with one atomic add per run of one sample's tokens (runs are long: tokens of a sample are usually
contiguous), 64-bit offsets; nothing of size [N, ku, kw] exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import Seg, check_seg_values, check_segment_outer
from ..gemm import segment_outer_bmm
from . import _common

#: (TOK tokens per program, BLOCK_U, BLOCK_W) of the ragged kernel
SEGMENT_OUTER_CONFIG = (64, 32, 32)


@triton.jit
def _segment_outer_kernel(
    u_ptr, w_ptr, seg_ptr, out_ptr,
    N, KU, KW,
    su0, su1, sw0, sw1, sseg,
    TOK: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_u = tl.program_id(0)
    pid_w = tl.program_id(1)
    t0 = tl.program_id(2).to(tl.int64) * TOK
    t1 = tl.minimum(t0 + TOK, N)
    offs_u = pid_u.to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U).to(tl.int64)
    offs_w = pid_w.to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    mu, mw = offs_u < KU, offs_w < KW
    tile = offs_u[:, None] * KW + offs_w[None, :]
    mask = mu[:, None] & mw[None, :]
    acc = tl.zeros((BLOCK_U, BLOCK_W), dtype=tl.float32)
    cur = tl.load(seg_ptr + t0 * sseg).to(tl.int64)
    for i in range(0, t1 - t0):
        t = t0 + i  # int64
        s = tl.load(seg_ptr + t * sseg).to(tl.int64)
        if s != cur:  # a run of one sample's tokens ends: one atomic add of its [BLOCK_U, BLOCK_W] sum
            tl.atomic_add(out_ptr + cur * KU * KW + tile, acc, mask=mask, sem="relaxed")
            acc = tl.zeros((BLOCK_U, BLOCK_W), dtype=tl.float32)
            cur = s
        u = tl.load(u_ptr + t * su0 + offs_u * su1, mask=mu, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + t * sw0 + offs_w * sw1, mask=mw, other=0.0).to(tl.float32)
        acc += u[:, None] * w[None, :]
    tl.atomic_add(out_ptr + cur * KU * KW + tile, acc, mask=mask, sem="relaxed")


def segment_outer(u: Tensor, w: Tensor, seg: Seg, B: int) -> Tensor:
    """Triton implementation of :func:`geffect_fast.ops.pairwise.segment_outer` (float32 output)."""
    N, ku, kw = check_segment_outer(u, w, seg, B)
    if isinstance(seg, int):
        return segment_outer_bmm(u, w, seg, B).float()
    check_seg_values(seg, B)
    out = torch.zeros((B, ku, kw), dtype=torch.float32, device=u.device)
    if N == 0:
        return out
    tok, bu, bw = SEGMENT_OUTER_CONFIG
    grid = (triton.cdiv(ku, bu), triton.cdiv(kw, bw), triton.cdiv(N, tok))
    with _common.on_device(u):
        _segment_outer_kernel[grid](
            u, w, seg, out, N, ku, kw, u.stride(0), u.stride(1), w.stride(0), w.stride(1), seg.stride(0),
            TOK=tok, BLOCK_U=bu, BLOCK_W=bw,
        )  # fmt: skip
    return out
