"""``linear_dot`` by a library GEMM and a fused epilogue (the cuBLAS route; Liger-Kernel's fused linear
cross-entropy has the same shape).

With r the contracted (larger) of the layer's two widths and c the other::

    i ≥ o:  P_k = a V_kᵀ   [N, o]  (GEMM over i),   out_w[k, b] = Σ_{t∈b} P_k[t] · g_t
    i < o:  P_k = g V_k    [N, i]  (GEMM over o),   out_w[k, b] = Σ_{t∈b} P_k[t] · a_t
            out_b[k, b] = Σ_{t∈b} vb_k · g_t       (the bias direction broadcast to every row)

Both equal Σ_{t∈b} g_tᵀ V_k a_t (``reference.linear_dot``). P is formed in chunks of tokens — equal
chunks of a multiple of ``MIN_CHUNK_ROWS`` rows (:func:`chunk_rows`), in one buffer of at most ``CHUNK_BYTES``
in the accumulation dtype, float32 (float64 for float64 inputs), allocated once per call, which the GEMM
writes straight into (``out=``) — and each chunk is consumed at once by the epilogue
``row_dot_tokens(p, x, out)``, which writes the per-token values out[k, t] = p[k, t] · x[t]. The per-sample
sums come last (``contract.segment_sum``: a reshape-sum for uniform segments, deterministic). Costs: the
GEMM's 2·N·i·o·K FLOPs, plus one write and one read of P (8·N·c·K bytes) — about 15% of the GEMM's time at
N = 8192, i = o = 4096 on an H100-class card.

Precision of P (:func:`mm_into`): same-dtype 16-bit operands multiply on the tensor cores with float32
output written into the buffer (``torch.mm(..., out_dtype=float32, out=...)`` where torch has it, else
upcast copies of the operands); a float32 direction with 16-bit activations is split as V = V_hi + V_lo,
both in the activations' 16-bit type, and P = x V_hi + x V_lo: two tensor-core GEMMs (the second
accumulated onto the first by ``addmm``) instead of a float32 one, with an error of at most 2^-16·|V|
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
#: rows per chunk are a multiple of this, and never fewer (GEMMs of fewer rows waste the tensor cores)
MIN_CHUNK_ROWS = 256

HALF = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE: dict[tuple[torch.device, str], bool] = {}


def _mm_out_dtype_ok(device: torch.device, op: str = "mm") -> bool:
    """Whether ``torch.mm`` (``op`` "mm") or ``torch.addmm`` ("addmm") with ``out_dtype=torch.float32`` and a
    preallocated ``out=`` runs for 16-bit operands on ``device`` and gives the float32 result (checked once per
    device and op on a small product)."""
    ok = _MM_OUT_DTYPE.get((device, op))
    if ok is None:
        try:
            x = (torch.arange(16, device=device, dtype=torch.float32).reshape(4, 4) / 7).to(torch.bfloat16)
            want = x.float() @ x.float()
            buf = torch.full((4, 4), 1.0, dtype=torch.float32, device=device)
            if op == "mm":
                torch.mm(x, x, out_dtype=torch.float32, out=buf)
            else:
                torch.addmm(buf, x, x, out_dtype=torch.float32, out=buf)
                want += 1
            ok = bool(torch.allclose(buf, want, rtol=1e-6, atol=0))
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE[(device, op)] = ok
    return ok


def mm_into(x: Tensor, w: Tensor, out: Tensor, accumulate: bool = False) -> None:
    """out = x @ w (``accumulate``: out += x @ w) for x [n, r], w [r, c] into the preallocated ``out`` [n, c] of
    the accumulation dtype: no intermediate product and no copy. 16-bit operands of one dtype write float32
    straight from the tensor cores (``out_dtype=torch.float32``) where torch has it, else both are upcast first
    (products of 16-bit values are exact in float32)."""
    acc = out.dtype
    if not (x.dtype == w.dtype == acc):
        if x.dtype == w.dtype and x.dtype in HALF and acc == torch.float32:
            if not accumulate and _mm_out_dtype_ok(x.device, "mm"):
                torch.mm(x, w, out_dtype=torch.float32, out=out)
                return
            if accumulate and _mm_out_dtype_ok(x.device, "addmm"):
                torch.addmm(out, x, w, out_dtype=torch.float32, out=out)
                return
            if accumulate and _mm_out_dtype_ok(x.device, "mm"):  # a torch with mm's out_dtype but not addmm's
                out.add_(torch.mm(x, w, out_dtype=torch.float32))
                return
        x, w = x.to(acc), w.to(acc)
    if accumulate:
        out.addmm_(x, w)
    else:
        torch.mm(x, w, out=out)


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


def matmul_into(x: Tensor, m: Tensor, out: Tensor, split: tuple | None = None) -> None:
    """out[k] = x m_k for every k: x [n, r], m [K, r, c] into ``out`` [K, n, c] (the accumulation dtype).

    A float32 ``m`` with 16-bit ``x`` goes through ``split`` (from :func:`split_half`, computed once per call by
    the caller) as two 16-bit GEMMs, the second accumulated onto the first; see the module docstring for the
    error."""
    for k in range(m.shape[0]):
        if split is not None:
            hi, lo, scale = split
            mm_into(x, hi[k], out[k])
            mm_into(x, lo[k], out[k], accumulate=True)
            if scale is not None:
                out[k].mul_(scale[k].to(out.dtype))
        else:
            mm_into(x, m[k] if m.dtype == x.dtype else m[k].to(x.dtype), out[k])


def needs_split(x_dtype: torch.dtype, m_dtype: torch.dtype) -> bool:
    """16-bit activations with a float32 direction: split the direction (never a float32 GEMM)."""
    return x_dtype in HALF and m_dtype == torch.float32


def chunk_rows(N: int, K: int, c: int, itemsize: int) -> int:
    """Rows per chunk of P ([K, rows, c] of ``itemsize`` bytes): the fewest chunks whose buffer stays within
    ``CHUNK_BYTES``, made equal and rounded up to a multiple of ``MIN_CHUNK_ROWS`` (never more rows than the
    bound allows, unless one multiple is already over it). E.g. N 8192, K 3, c 4096, float32: 1280 rows (6 chunks
    of 1280 and one of 512), where a plain ``CHUNK_BYTES // row`` gave 1365 rows and a last chunk of 2."""
    unit = max(1, MIN_CHUNK_ROWS)
    cap = max(unit, CHUNK_BYTES // max(1, K * c * itemsize) // unit * unit)
    chunks = -(-max(N, 1) // cap)
    rows = -(-N // chunks)
    return min(cap, -(-rows // unit) * unit)


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
    check_linear(a, g, v, seg, B, vb)
    return linear_dot_gemm_kernel(a, g, v, seg, B, vb, row_dot_tokens, empty)


def linear_dot_gemm_kernel(
    a: Tensor | None,
    g: Tensor,
    v: Tensor | None,
    seg: Seg,
    B: int,
    vb: Tensor | None,
    row_dot_tokens: Callable[[Tensor, Tensor, Tensor], object],
    empty: Callable[[tuple[int, ...], torch.dtype, torch.device], Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`linear_dot_gemm` without the argument checks (``contract.check_linear`` holds for them).

    P lives in one buffer of at most ``CHUNK_BYTES`` (:func:`chunk_rows`), allocated once per call; each chunk's
    GEMM writes into it (``out=``) and the epilogue reads it at once."""
    N, o = g.shape
    K = (v if v is not None else vb).shape[0]
    acc = acc_dtype(a, g, v, vb)
    if empty is None:
        empty = _torch_empty
    out_w = out_b = None
    if v is not None:
        i = a.shape[1]
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
            rows = chunk_rows(N, K, c, torch.finfo(acc).bits // 8)
            buf = torch.empty(K, min(rows, N), c, dtype=acc, device=g.device)
            for n0 in range(0, N, rows):
                n1 = min(N, n0 + rows)
                p = buf[:, : n1 - n0]
                matmul_into(x1[n0:n1], m, p, split)
                row_dot_tokens(p, x2[n0:n1], tok[:, n0:n1])
            del buf
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
