"""Reference implementations of the kernel contract (docs/design.md §4), in plain torch.

These functions are the *specification* every other backend is tested against. They never form a
per-sample gradient and never hold more than one tile of intermediates: tokens are processed in tiles of
at most ``TILE_BYTES`` of transient memory, whatever N is.

Common conventions
------------------
* ``seg``: the sample id of each token row, in ``[0, B)`` — a Tensor [N] (int32 or int64; rows of one sample
  need not be contiguous: packed sequences work), or an int T for uniform segments (sample b owns rows
  [b·T, (b+1)·T)). Per-position values are the special case ``seg = arange(N)`` (or ``1``), ``B = N``.
* ``v`` holds K directions stacked on dim 0.
* Accumulation dtype: float64 if any input is float64, else float32 (bf16 / fp16 / fp32 inputs are upcast
  tile by tile). Outputs are [K, B] in the accumulation dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import (
    FLOAT_DTYPES,
    Seg,
    acc_dtype,
    check_embedding,
    check_linear,
    check_norm,
    check_row_dot,
    segment_sum,
)
from .pairwise import segment_outer  # noqa: E402,F401  (the sketch op's spec lives beside the pairwise ops)

NAME = "reference"

#: upper bound on the transient memory of one tile, in bytes
TILE_BYTES = 4 << 20


def built() -> tuple[bool, str]:
    return True, ""


def unusable_reason(device: torch.device) -> str | None:
    return None  # runs wherever torch runs


def supports(dtype: torch.dtype) -> bool:
    return dtype in FLOAT_DTYPES


def _rows_per_tile(row_elems: int, itemsize: int) -> int:
    return max(1, TILE_BYTES // max(1, row_elems * itemsize))


def linear_dot(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample inner products of a linear layer's gradient with K fixed directions.

    For y_t = W a_t + b with input rows a [N, i] and output gradients g [N, o]::

        out_w[k, b] = Σ_{t: seg_t = b} g_tᵀ V_k a_t        = ⟨Σ_t g_t a_tᵀ, V_k⟩   (weight)
        out_b[k, b] = Σ_{t: seg_t = b} g_t · vb_k                                     (bias)

    ``v`` is [K, o, i] (any strides; HF ``Conv1D`` passes a transposed view) or None (bias only, ``a`` may
    then be None too), ``vb`` [K, o] or None; the matching output is None when its direction is.
    Cost: 2·N·i·o·K FLOPs, the same as the weight-gradient GEMM; the contraction runs over whichever of
    i and o is larger so the tile intermediate is [K, n, min(i, o)].
    """
    check_linear(a, g, v, seg, B, vb)
    return linear_dot_kernel(a, g, v, seg, B, vb)


def linear_dot_kernel(
    a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`linear_dot` without the argument checks (``contract.check_linear`` holds for the arguments)."""
    N, o = g.shape
    i = 0 if v is None else a.shape[1]
    K = (v if v is not None else vb).shape[0]
    f64 = torch.float64
    acc = (
        f64
        if g.dtype is f64
        or (v is not None and (v.dtype is f64 or a.dtype is f64))
        or (vb is not None and vb.dtype is f64)
        else torch.float32
    )
    # per-token values [K, N], summed per sample at the end (a reshape-sum for uniform segments)
    vbc = None if vb is None else vb.to(acc)
    if v is None:
        tok_b = torch.empty(K, N, dtype=acc, device=g.device)
        n = _rows_per_tile(o + K, 8 if acc is f64 else 4)
        for n0 in range(0, N, n):
            tok_b[:, n0 : n0 + n] = (g[n0 : n0 + n].to(acc) @ vbc.T).T
        return None, segment_sum(tok_b, seg, B)
    itemsize = 8 if acc is f64 else 4
    g_side = i <= o  # contract g with V over o (result [K, n, i]); else a with Vᵀ over i
    inner, outer = (o, i) if g_side else (i, o)
    # V is converted to the accumulation dtype in chunks of the contracted dim, so that the converted
    # chunk is itself bounded by one tile; no copy at all when V already has that dtype.
    if v.dtype is acc:
        vchunk = inner
    else:
        vchunk = max(1, min(inner, TILE_BYTES // max(1, K * outer * itemsize)))
    # per-row transients: the product p [K, n, outer], plus the upcast copies of a and g when they need one
    row = K * outer + (0 if a.dtype is acc else i) + (0 if g.dtype is acc else o)
    n = TILE_BYTES // (row * itemsize) or 1
    if N <= n and vchunk == inner and seg.__class__ is int:  # one tile (a small batch): the fewest ops
        gt = g if g.dtype is acc else g.to(acc)
        at = a if a.dtype is acc else a.to(acc)
        vv = v if v.dtype is acc else v.to(acc)
        p = torch.matmul(gt, vv) if g_side else torch.matmul(at, vv.transpose(1, 2))
        out_w = p.mul_(at if g_side else gt).sum(-1).view(K, B, seg).sum(-1)
        return out_w, None if vbc is None else (gt @ vbc.T).T.reshape(K, B, seg).sum(-1)
    tok_w = torch.empty(K, N, dtype=acc, device=g.device)
    tok_b = None if vb is None else torch.empty(K, N, dtype=acc, device=g.device)
    for n0 in range(0, N, n):
        n1 = min(N, n0 + n)
        gt = g[n0:n1].to(acc)
        at = a[n0:n1].to(acc)
        p = None
        for c0 in range(0, inner, vchunk):
            c1 = min(inner, c0 + vchunk)
            if g_side:
                part = torch.matmul(gt[:, c0:c1], v[:, c0:c1, :].to(acc))  # [K, n, i]
            else:
                part = torch.matmul(at[:, c0:c1], v[:, :, c0:c1].to(acc).transpose(1, 2))  # [K, n, o]
            p = part if p is None else p.add_(part)
        tok_w[:, n0:n1] = p.mul_(at if g_side else gt).sum(-1)  # [K, n]
        if vbc is not None:
            tok_b[:, n0:n1] = (gt @ vbc.T).T
    return segment_sum(tok_w, seg, B), None if tok_b is None else segment_sum(tok_b, seg, B)


def embedding_dot(ids: Tensor, g: Tensor, v: Tensor, seg: Seg, B: int, padding_idx: int | None = None) -> Tensor:
    """Per-sample inner products of an embedding table's gradient with K fixed directions.

    For y_t = E[x_t] with ids x [N] and output gradients g [N, d], ``v`` [K, vocab, d]::

        out[k, b] = Σ_{t: seg_t = b, x_t ≠ padding_idx} g_t · V_k[x_t]

    (torch gives the ``padding_idx`` row no gradient). A gather-dot: V[ids] is gathered one tile at a time,
    never for all N tokens.
    """
    check_embedding(ids, g, v, seg, B)
    return embedding_dot_kernel(ids, g, v, seg, B, padding_idx)


def embedding_dot_kernel(ids: Tensor, g: Tensor, v: Tensor, seg: Seg, B: int, padding_idx: int | None = None) -> Tensor:
    """:func:`embedding_dot` without the argument checks (``contract.check_embedding`` holds for them)."""
    N, d = g.shape
    K = v.shape[0]
    acc = acc_dtype(g, v)
    tok = torch.empty(K, N, dtype=acc, device=g.device)
    n = _rows_per_tile(K * d + d, torch.finfo(acc).bits // 8)
    for n0 in range(0, N, n):
        n1 = min(N, n0 + n)
        it = ids[n0:n1].long()
        r = (v[:, it, :].to(acc) * g[n0:n1].to(acc)).sum(-1)  # [K, n]
        tok[:, n0:n1] = r if padding_idx is None else r.masked_fill(it == padding_idx, 0)
    return segment_sum(tok, seg, B)


def norm_dot(
    xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Seg, B: int
) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample inner products of a normalisation layer's affine gradients with K directions.

    For y_t = γ ⊙ x̂_t + β (LayerNorm), y_t = γ ⊙ x̂_t (RMSNorm) or y_t = (1 + γ) ⊙ x̂_t (Gemma), with the
    normalised inputs x̂ [N, d] and output gradients g [N, d]; the gradient with respect to γ is the same
    Σ_t g_t ⊙ x̂_t in all three forms::

        out_w[k, b] = Σ_{t: seg_t = b} (g_t ⊙ x̂_t) · vw_k         vw [K, d]
        out_b[k, b] = Σ_{t: seg_t = b} g_t · vb_k                  vb [K, d]
    """
    check_norm(xhat, g, vw, vb, seg, B)
    return norm_dot_kernel(xhat, g, vw, vb, seg, B)


def norm_dot_kernel(
    xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Seg, B: int
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`norm_dot` without the argument checks (``contract.check_norm`` holds for them)."""
    N, d = g.shape
    K = (vw if vw is not None else vb).shape[0]
    acc = acc_dtype(xhat, g, vw, vb)
    tok_w = None if vw is None else torch.empty(K, N, dtype=acc, device=g.device)
    tok_b = None if vb is None else torch.empty(K, N, dtype=acc, device=g.device)
    vwc = None if vw is None else vw.to(acc)
    vbc = None if vb is None else vb.to(acc)
    n = _rows_per_tile(2 * d + 2 * K, torch.finfo(acc).bits // 8)
    for n0 in range(0, N, n):
        n1 = min(N, n0 + n)
        gt = g[n0:n1].to(acc)
        if vwc is not None:
            tok_w[:, n0:n1] = ((gt * xhat[n0:n1].to(acc)) @ vwc.T).T
        if vbc is not None:
            tok_b[:, n0:n1] = (gt @ vbc.T).T
    return tuple(None if t is None else segment_sum(t, seg, B) for t in (tok_w, tok_b))


def row_dot(p: Tensor, x: Tensor, seg: Seg, B: int) -> Tensor:
    """The GEMM route's epilogue: per-sample sums of row-wise inner products.

    For p [K, N, C] (e.g. P_k = a V_kᵀ from a GEMM; any strides, stride 0 over rows for a broadcast bias
    direction) and x [N, C]::

        out[k, b] = Σ_{t: seg_t = b} p[k, t] · x[t]

    Output [K, B] in the accumulation dtype.
    """
    N, C, K = check_row_dot(p, x, seg, B)
    acc = acc_dtype(p, x)
    tok = torch.empty(K, N, dtype=acc, device=x.device)
    n = _rows_per_tile(K * C + C, torch.finfo(acc).bits // 8)
    for n0 in range(0, N, n):
        n1 = min(N, n0 + n)
        tok[:, n0:n1] = (p[:, n0:n1].to(acc) * x[n0:n1].to(acc)).sum(-1)
    return segment_sum(tok, seg, B)
