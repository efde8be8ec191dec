"""``linear_dot`` by a library GEMM and a fused epilogue (the cuBLAS route; Liger-Kernel's fused linear
cross-entropy has the same shape).

With r the contracted (larger) of the layer's two widths and c the other::

    i ≥ o:  P_k = a V_kᵀ   [N, o]  (GEMM over i),   out_w[k, b] = Σ_{t∈b} P_k[t] · g_t
    i < o:  P_k = g V_k    [N, i]  (GEMM over o),   out_w[k, b] = Σ_{t∈b} P_k[t] · a_t
            out_b[k, b] = Σ_{t∈b} vb_k · g_t       (the bias direction broadcast to every row)

Both equal Σ_{t∈b} g_tᵀ V_k a_t (``reference.linear_dot``). P is formed in chunks of tokens — a bounded
buffer of at most ``CHUNK_BYTES`` in the accumulation dtype, float32 (float64 for float64 inputs) — and
each chunk is consumed at once by the epilogue ``row_dot_tokens(p, x, out)``, which writes the per-token
values out[k, t] = p[k, t] · x[t]. The per-sample sums come last (``contract.segment_sum``: a reshape-sum
for uniform segments, deterministic). Costs: the GEMM's 2·N·i·o·K FLOPs, plus one write and one read of P
(8·N·c·K bytes) — about 15% of the GEMM's time at N = 8192, i = o = 4096 on an H100-class card.

Precision of P (:func:`matmul_acc`): same-dtype 16-bit operands multiply on the tensor cores with float32
output (``torch.mm(..., out_dtype=float32)`` where torch has it, else an upcast copy); a float32 direction
with 16-bit activations is split as V = V_hi + V_lo, both in the activations' 16-bit type, and P =
x V_hi + x V_lo: two tensor-core GEMMs instead of a float32 one, with an error of at most 2^-16·|V|
(bfloat16) or 2^-22·max|V| (float16, scaled by max|V| per direction first) per element of V — the
products x·V_hi and x·V_lo are exact in float32, so the split is the only rounding beyond the summation.
The split is done per call: one read of V and a write of two half-size copies (memory-bound, about 6% of
a 1B model's forward+backward at 4k tokens).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .contract import Seg, acc_dtype, check_linear, segment_sum

#: bound on the P buffer of one chunk, in bytes
CHUNK_BYTES = 64 << 20
#: rows per chunk never fall below this (GEMMs of fewer rows waste the tensor cores)
MIN_CHUNK_ROWS = 256

HALF = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE: dict[torch.device, bool] = {}


def _mm_out_dtype_ok(device: torch.device) -> bool:
    """Whether ``torch.mm(x, w, out_dtype=torch.float32)`` runs for 16-bit x, w on ``device``."""
    ok = _MM_OUT_DTYPE.get(device)
    if ok is None:
        try:
            x = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            ok = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE[device] = ok
    return ok


def _mm(x: Tensor, w: Tensor, acc: torch.dtype) -> Tensor:
    """x [n, r] @ w [r, c] in ``acc`` (float32 output of 16-bit operands where torch can, else an upcast)."""
    if x.dtype == w.dtype == acc:
        return torch.mm(x, w)
    if x.dtype == w.dtype and x.dtype in HALF and acc == torch.float32 and _mm_out_dtype_ok(x.device):
        return torch.mm(x, w, out_dtype=torch.float32)
    return torch.mm(x.to(acc), w.to(acc))  # products of 16-bit values are exact in float32


def split_half(m: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """m [K, r, c] (float32) as (hi, lo, scale) in the 16-bit ``dtype``: m ≈ scale_k·(hi_k + lo_k).

    bfloat16: hi = bf16(m), lo = bf16(m − hi), no scale (|m − hi − lo| ≤ 2^-16·|m|: two roundings to 8
    significant bits). float16 has too little range for gradients (subnormal below 6e-5), so m is first
    divided by its max per direction (then |m − scale·(hi + lo)| ≤ 2^-22·max|m|).
    """
    scale = None
    if dtype == torch.float16:
        scale = m.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        m = m / scale
    hi = m.to(dtype)
    lo = (m - hi.to(m.dtype)).to(dtype)
    return hi, lo, scale


def matmul_acc(x: Tensor, m: Tensor, acc: torch.dtype, split: tuple | None = None) -> Tensor:
    """P = x m_k for every k: x [n, r], m [K, r, c] -> [K, n, c] in ``acc``.

    A float32 ``m`` with 16-bit ``x`` goes through ``split`` (from :func:`split_half`, computed once per
    call by the caller) as two 16-bit GEMMs; see the module docstring for the error.
    """
    K = m.shape[0]
    if split is None and x.dtype == m.dtype == acc:
        return torch.matmul(x, m)
    out = torch.empty(K, x.shape[0], m.shape[2], dtype=acc, device=x.device)
    for k in range(K):
        if split is not None:
            hi, lo, scale = split
            out[k] = _mm(x, hi[k], acc)
            out[k] += _mm(x, lo[k], acc)
            if scale is not None:
                out[k] *= scale[k].to(acc)
        else:
            out[k] = _mm(x, m[k] if m.dtype == x.dtype else m[k].to(x.dtype), acc)
    return out


def needs_split(x_dtype: torch.dtype, m_dtype: torch.dtype) -> bool:
    """16-bit activations with a float32 direction: split the direction (never a float32 GEMM)."""
    return x_dtype in HALF and m_dtype == torch.float32


def linear_dot_gemm(
    a: Tensor | None,
    g: Tensor,
    v: Tensor | None,
    seg: Seg,
    B: int,
    vb: Tensor | None,
    row_dot_tokens: Callable[[Tensor, Tensor, Tensor], object],
    empty: Callable[[tuple[int, ...], torch.dtype, torch.device], Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``linear_dot`` (contract in ``reference.linear_dot``) as chunked GEMMs + the ``row_dot_tokens``
    epilogue; outputs [K, B] in the accumulation dtype. ``empty(shape, dtype, device)`` allocates the
    per-token values (default ``torch.empty``; the epilogue writes every element)."""
    N, i, o, K = check_linear(a, g, v, seg, B, vb)
    acc = acc_dtype(a, g, v, vb)
    if empty is None:
        empty = _torch_empty
    out_w = out_b = None
    if v is not None:
        tok = empty((K, N), acc, g.device)
        if N:
            x1, x2, m = (a, g, v.transpose(1, 2)) if i >= o else (g, a, v)  # m [K, r, c]
            if x1.dtype != x2.dtype:
                x1 = x1.to(x2.dtype)
            split = split_half(m, x1.dtype) if needs_split(x1.dtype, m.dtype) else None
            if split is None and x1.dtype != acc and m.dtype != x1.dtype:
                m = m.to(acc)
                x1 = x1.to(acc)  # e.g. float32 activations with a bf16 direction: plain float32
            c = m.shape[2]
            rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, K * c * (torch.finfo(acc).bits // 8)))
            for n0 in range(0, N, rows):
                n1 = min(N, n0 + rows)
                p = matmul_acc(x1[n0:n1], m, acc, split)
                row_dot_tokens(p, x2[n0:n1], tok[:, n0:n1])
                del p
        out_w = segment_sum(tok, seg, B)
    if vb is not None:
        tok = empty((K, N), acc, g.device)
        if N:
            row_dot_tokens(vb[:, None, :].expand(K, N, o), g, tok)
        out_b = segment_sum(tok, seg, B)
    return out_w, out_b


def _torch_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def torch_row_dot_tokens(p: Tensor, x: Tensor, out: Tensor) -> None:
    """The epilogue in plain torch (tiles of rows): out[k, t] = p[k, t] · x[t]."""
    rows = max(1, (8 << 20) // max(1, p.shape[0] * p.shape[2] * out.element_size()))
    for n0 in range(0, x.shape[0], rows):
        n1 = min(x.shape[0], n0 + rows)
        out[:, n0:n1] = (p[:, n0:n1].to(out.dtype) * x[n0:n1].to(out.dtype)).sum(-1)


def segment_outer_bmm(u: Tensor, w: Tensor, T: int, B: int) -> Tensor:
    """``segment_outer`` over uniform segments (T rows per sample) as one batched GEMM:
    out[b] = U_bᵀ W_b with U_b = u[b·T:(b+1)·T], [B, k_u, k_w] in the accumulation dtype."""
    acc = acc_dtype(u, w)
    return torch.bmm(u.reshape(B, T, -1).transpose(1, 2).to(acc), w.reshape(B, T, -1).to(acc))
