"""Triton ``norm_dot``: out_w[k, b] = Σ_{t: seg_t=b} (g_t ⊙ x̂_t) · vw_k and out_b[k, b] = Σ g_t · vb_k.

Grid: token tiles of BLOCK_N rows; the feature dim in BLOCK_D steps. A program reads g and x̂ once per step
for all its KP directions and writes one value per token and direction (64-bit offsets, no atomics);
:func:`~geffect_fast.ops.contract.segment_sum` reduces them per sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..contract import Seg, check_norm, segment_sum
from . import _common


@triton.jit
def _norm_dot_kernel(
    x_ptr, g_ptr, vw_ptr, vb_ptr, ow_ptr, ob_ptr,
    N, D, K,
    sx0, sx1, sg0, sg1, svw0, svw1, svb0, svb1, so0,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, KP).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    aw = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
    ab = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        m = mask_n[:, None] & mask_d[None, :]
        mkd = mask_k[:, None] & mask_d[None, :]
        g = tl.load(g_ptr + offs_n[:, None] * sg0 + offs_d[None, :] * sg1, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            x = tl.load(x_ptr + offs_n[:, None] * sx0 + offs_d[None, :] * sx1, mask=m, other=0.0).to(tl.float32)
            vw = tl.load(vw_ptr + offs_k[:, None] * svw0 + offs_d[None, :] * svw1, mask=mkd, other=0.0).to(tl.float32)
            aw += tl.sum(vw[:, None, :] * (g * x)[None, :, :], axis=2)
        if HAS_B:
            vb = tl.load(vb_ptr + offs_k[:, None] * svb0 + offs_d[None, :] * svb1, mask=mkd, other=0.0).to(tl.float32)
            ab += tl.sum(vb[:, None, :] * g[None, :, :], axis=2)
    mo = mask_k[:, None] & mask_n[None, :]
    if HAS_W:
        tl.store(ow_ptr + offs_k[:, None] * so0 + offs_n[None, :], aw, mask=mo)
    if HAS_B:
        tl.store(ob_ptr + offs_k[:, None] * so0 + offs_n[None, :], ab, mask=mo)


def norm_dot(
    xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Seg, B: int
) -> tuple[Tensor | None, Tensor | None]:
    """Triton implementation of :func:`geffect_fast.ops.reference.norm_dot` (float32 outputs)."""
    check_norm(xhat, g, vw, vb, seg, B)
    return norm_dot_kernel(xhat, g, vw, vb, seg, B)


def norm_dot_kernel(
    xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Seg, B: int
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`norm_dot` without the argument checks (``contract.check_norm`` holds for them)."""
    N, d = g.shape
    K = (vw if vw is not None else vb).shape[0]
    tw = None if vw is None else torch.empty(K, N, dtype=torch.float32, device=g.device)
    tb = None if vb is None else torch.empty(K, N, dtype=torch.float32, device=g.device)
    if N:
        cfg = _common.rows_config(N, d, K, tiles_per_k=(vw is not None) + (vb is not None))
        grid = (triton.cdiv(N, cfg.BLOCK_N),)
        with _common.on_device(g):
            for k0, k1 in _common.k_groups(K, cfg.KP):
                w = None if vw is None else vw[k0:k1]
                b = None if vb is None else vb[k0:k1]
                ow = None if tw is None else tw[k0:k1]
                ob = None if tb is None else tb[k0:k1]
                some = ow if ow is not None else ob
                _norm_dot_kernel[grid](
                    xhat, g, w if w is not None else g, b if b is not None else g,
                    ow if ow is not None else some, ob if ob is not None else some,
                    N, d, k1 - k0,
                    xhat.stride(0), xhat.stride(1), g.stride(0), g.stride(1),
                    w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
                    b.stride(0) if b is not None else 0, b.stride(1) if b is not None else 0, some.stride(0),
                    HAS_W=w is not None, HAS_B=b is not None,
                    KP=cfg.KP, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps,
                )  # fmt: skip
    return (
        None if tw is None else segment_sum(tw, seg, B),
        None if tb is None else segment_sum(tb, seg, B),
    )
