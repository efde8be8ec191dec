"""Triton ``embedding_dot``: out[k, b] = Σ_{t: seg_t=b, ids_t ≠ padding_idx} g_t · V_k[ids_t].

Grid (token tiles, K). A program walks the feature dim in BLOCK_D steps, gathering V_k[ids] rows tile by
tile (never all of V[ids]), and adds one per-token sum to out[k, seg[t]] atomically.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..contract import check_embedding
from . import _common


@triton.jit
def _embedding_dot_kernel(
    ids_ptr, g_ptr, v_ptr, seg_ptr, out_ptr,
    N, D, B, PAD,
    sids, sg0, sg1, sv0, sv1, sv2, sseg,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ids = tl.load(ids_ptr + offs_n * sids, mask=mask_n, other=0)
    valid = mask_n & (ids != PAD)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = valid[:, None] & (offs_d[None, :] < D)
        g = tl.load(g_ptr + offs_n[:, None] * sg0 + offs_d[None, :] * sg1, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + k * sv0 + ids[:, None] * sv1 + offs_d[None, :] * sv2, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(g * v, axis=1)
    seg = tl.load(seg_ptr + offs_n * sseg, mask=mask_n, other=0)
    tl.atomic_add(out_ptr + k * B + seg, acc, mask=valid)


def embedding_dot(ids: Tensor, g: Tensor, v: Tensor, seg: Tensor, B: int, padding_idx: int | None = None) -> Tensor:
    """Triton implementation of :func:`geffect_fast.ops.reference.embedding_dot` (float32 output)."""
    N, d, K, _ = check_embedding(ids, g, v, seg, B)
    out = _common.zeros_out(K, B, g.device)
    if N == 0:
        return out
    BLOCK_N, BLOCK_D = _common.rows_config(g.device)
    grid = (triton.cdiv(N, BLOCK_N), K)
    _embedding_dot_kernel[grid](
        ids, g, v, seg, out, N, d, B, -1 if padding_idx is None else int(padding_idx),
        ids.stride(0), g.stride(0), g.stride(1), v.stride(0), v.stride(1), v.stride(2), seg.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out
