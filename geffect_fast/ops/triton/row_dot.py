"""Triton ``row_dot``, the GEMM route's epilogue: tok[k, t] = p[k, t] · x[t], then per-sample sums.

Grid: token tiles of BLOCK_N rows. A program reads its x tile once per feature step and dots it with the
matching rows of all its KP directions (a [KP, BLOCK_N, BLOCK_D] tile of p; p may have stride 0 over rows, a
bias direction broadcast). Offsets are 64-bit. Each program writes its per-token values; no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import Seg, check_row_dot, segment_sum
from . import _common


@triton.jit
def _row_dot_kernel(
    p_ptr, x_ptr, out_ptr,
    N, C, K,
    sp0, sp1, sp2, sx0, sx1, so0, so1,
    KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, KP).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, C, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        m = mask_n[:, None] & (offs_d[None, :] < C)
        x = tl.load(x_ptr + offs_n[:, None] * sx0 + offs_d[None, :] * sx1, mask=m, other=0.0).to(tl.float32)
        p = tl.load(
            p_ptr + offs_k[:, None, None] * sp0 + offs_n[None, :, None] * sp1 + offs_d[None, None, :] * sp2,
            mask=mask_k[:, None, None] & m[None, :, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(p * x[None, :, :], axis=2)
    tl.store(out_ptr + offs_k[:, None] * so0 + offs_n[None, :] * so1, acc, mask=mask_k[:, None] & mask_n[None, :])


def row_dot_tokens(p: Tensor, x: Tensor, out: Tensor) -> None:
    """out[k, t] = p[k, t] · x[t] for p [K, n, C], x [n, C] into ``out`` [K, n] (float32, any strides)."""
    K, n, C = p.shape
    if n == 0:
        return
    if out.dtype != torch.float32:
        raise TypeError(f"the Triton row_dot writes float32, got an output of {out.dtype}")
    cfg = _common.rows_config(n, C, K)
    grid = (triton.cdiv(n, cfg.BLOCK_N),)
    with _common.on_device(x):
        for k0, k1 in _common.k_groups(K, cfg.KP):
            pk, ok = p[k0:k1], out[k0:k1]
            _row_dot_kernel[grid](
                pk, x, ok, n, C, k1 - k0,
                pk.stride(0), pk.stride(1), pk.stride(2), x.stride(0), x.stride(1), ok.stride(0), ok.stride(1),
                KP=cfg.KP, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps,
            )  # fmt: skip


def row_dot(p: Tensor, x: Tensor, seg: Seg, B: int) -> Tensor:
    """Triton implementation of :func:`geffect_fast.ops.reference.row_dot` (float32 output)."""
    N, C, K = check_row_dot(p, x, seg, B)
    tok = torch.empty(K, N, dtype=torch.float32, device=x.device)
    row_dot_tokens(p, x, tok)
    return segment_sum(tok, seg, B)
