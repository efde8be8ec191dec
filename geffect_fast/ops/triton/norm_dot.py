"""Triton ``norm_dot``: out_w[k, b] = Σ_{t: seg_t=b} (g_t ⊙ x̂_t) · vw_k and out_b[k, b] = Σ g_t · vb_k.

Grid (token tiles, K); the feature dim in BLOCK_D steps; one atomic add per token and output.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..contract import check_norm
from . import _common


@triton.jit
def _norm_dot_kernel(
    x_ptr, g_ptr, vw_ptr, vb_ptr, seg_ptr, outw_ptr, outb_ptr,
    N, D, B,
    sx0, sx1, sg0, sg1, svw0, svw1, svb0, svb1, sseg,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    aw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ab = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        m = mask_n[:, None] & mask_d[None, :]
        g = tl.load(g_ptr + offs_n[:, None] * sg0 + offs_d[None, :] * sg1, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            x = tl.load(x_ptr + offs_n[:, None] * sx0 + offs_d[None, :] * sx1, mask=m, other=0.0).to(tl.float32)
            vw = tl.load(vw_ptr + k * svw0 + offs_d * svw1, mask=mask_d, other=0.0).to(tl.float32)
            aw += tl.sum(g * x * vw[None, :], axis=1)
        if HAS_B:
            vb = tl.load(vb_ptr + k * svb0 + offs_d * svb1, mask=mask_d, other=0.0).to(tl.float32)
            ab += tl.sum(g * vb[None, :], axis=1)
    seg = tl.load(seg_ptr + offs_n * sseg, mask=mask_n, other=0)
    if HAS_W:
        tl.atomic_add(outw_ptr + k * B + seg, aw, mask=mask_n)
    if HAS_B:
        tl.atomic_add(outb_ptr + k * B + seg, ab, mask=mask_n)


def norm_dot(
    xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Tensor, B: int
) -> tuple[Tensor | None, Tensor | None]:
    """Triton implementation of :func:`geffect_fast.ops.reference.norm_dot` (float32 outputs)."""
    N, d, K = check_norm(xhat, g, vw, vb, seg, B)
    out_w = None if vw is None else _common.zeros_out(K, B, g.device)
    out_b = None if vb is None else _common.zeros_out(K, B, g.device)
    if N == 0:
        return out_w, out_b
    BLOCK_N, BLOCK_D = _common.rows_config(g.device)
    dummy = g
    grid = (triton.cdiv(N, BLOCK_N), K)
    _norm_dot_kernel[grid](
        xhat, g, vw if vw is not None else dummy, vb if vb is not None else dummy, seg,
        out_w if out_w is not None else dummy, out_b if out_b is not None else dummy,
        N, d, B,
        xhat.stride(0), xhat.stride(1), g.stride(0), g.stride(1),
        vw.stride(0) if vw is not None else 0, vw.stride(1) if vw is not None else 0,
        vb.stride(0) if vb is not None else 0, vb.stride(1) if vb is not None else 0, seg.stride(0),
        HAS_W=vw is not None, HAS_B=vb is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out_w, out_b
