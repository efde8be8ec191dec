"""Triton ``embedding_dot``: out[k, b] = Σ_{t: seg_t=b, ids_t ≠ padding_idx} g_t · V_k[ids_t].

Grid: token tiles of BLOCK_N rows. A program walks the feature dim in BLOCK_D steps, reads its g tile once
per step and gathers the matching rows V_k[ids] of all its KP directions (never all of V[ids]); it writes
one value per token and direction, which :func:`~geffect_fast.ops.contract.segment_sum` reduces per sample.
Offsets are 64-bit (a 128256 × 4096 table passes 2^31 elements at K ≥ 5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import Seg, check_embedding, segment_sum
from . import _common


@triton.jit
def _embedding_dot_kernel(
    ids_ptr, g_ptr, v_ptr, out_ptr,
    N, D, K, PAD,
    sids, sg0, sg1, sv0, sv1, sv2, so0,
    KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, KP).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    ids = tl.load(ids_ptr + offs_n * sids, mask=mask_n, other=0).to(tl.int64)
    valid = mask_n & (ids != PAD)
    acc = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        m = valid[:, None] & (offs_d[None, :] < D)
        g = tl.load(g_ptr + offs_n[:, None] * sg0 + offs_d[None, :] * sg1, mask=m, other=0.0).to(tl.float32)
        v = tl.load(
            v_ptr + offs_k[:, None, None] * sv0 + ids[None, :, None] * sv1 + offs_d[None, None, :] * sv2,
            mask=mask_k[:, None, None] & m[None, :, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(v * g[None, :, :], axis=2)
    tl.store(out_ptr + offs_k[:, None] * so0 + offs_n[None, :], acc, mask=mask_k[:, None] & mask_n[None, :])


def embedding_dot(ids: Tensor, g: Tensor, v: Tensor, seg: Seg, B: int, padding_idx: int | None = None) -> Tensor:
    """Triton implementation of :func:`geffect_fast.ops.reference.embedding_dot` (float32 output)."""
    check_embedding(ids, g, v, seg, B)
    return embedding_dot_kernel(ids, g, v, seg, B, padding_idx)


def embedding_dot_kernel(ids: Tensor, g: Tensor, v: Tensor, seg: Seg, B: int, padding_idx: int | None = None) -> Tensor:
    """:func:`embedding_dot` without the argument checks (``contract.check_embedding`` holds for them)."""
    N, d = g.shape
    K = v.shape[0]
    tok = torch.empty(K, N, dtype=torch.float32, device=g.device)
    if N:
        cfg = _common.rows_config(N, d, K)
        pad = -1 if padding_idx is None else int(padding_idx)
        grid = (triton.cdiv(N, cfg.BLOCK_N),)
        with _common.on_device(g):
            for k0, k1 in _common.k_groups(K, cfg.KP):
                vk, tk = v[k0:k1], tok[k0:k1]
                _embedding_dot_kernel[grid](
                    ids, g, vk, tk, N, d, k1 - k0, pad,
                    ids.stride(0), g.stride(0), g.stride(1), vk.stride(0), vk.stride(1), vk.stride(2), tk.stride(0),
                    KP=cfg.KP, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps,
                )  # fmt: skip
    return segment_sum(tok, seg, B)
