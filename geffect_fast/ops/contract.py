"""The op contract every backend implements: names, shapes, dtypes, and the checks all backends share.

Ops (``reference.py`` holds the formulas and is the specification):

* ``linear_dot(a [N,i] | None, g [N,o], v [K,o,i] | None, seg [N], B, vb [K,o] | None) -> (out_w, out_b)``
* ``embedding_dot(ids [N], g [N,d], v [K,vocab,d], seg [N], B, padding_idx=None) -> out``
* ``norm_dot(xhat [N,d], g [N,d], vw [K,d] | None, vb [K,d] | None, seg [N], B) -> (out_w, out_b)``
* ``segment_outer(u [N,ku], w [N,kw], seg [N], B) -> [B, ku, kw]`` — Σ_{t∈b} u_t w_tᵀ, the accumulation of the
  Kronecker sketches (``pairwise.py`` holds its spec with the pairwise ops)

Outputs are [K, B] (segment_outer: [B, ku, kw]) in the accumulation dtype: float64 if any input is float64,
else float32. An output whose direction is None is None.

Segments (``seg``): which sample each of the N rows belongs to, in one of two forms:

* an ``int`` T — *uniform*: N = B·T and sample b owns rows [b·T, (b+1)·T) (what ``measure()`` passes: a batch
  [B, T] flattened). Backends reduce per-token values by a reshape-sum: deterministic, no atomics;
* a ``Tensor`` [N] of sample ids (int32 or int64) in [0, B), in any order (packed sequences, pairwise
  factors). Values are checked (:func:`check_seg_values`, one device sync) before anything is indexed with
  them; sortedness is not required by any kernel.

The GEMM route of ``linear_dot`` (:mod:`geffect_fast.ops.gemm`) also has an epilogue with a spec here:

* ``row_dot(p [K,N,C], x [N,C], seg, B) -> [K, B]`` — out[k, b] = Σ_{t∈b} p[k, t] · x[t] (``p`` may have
  stride 0 over t: a bias direction broadcast to every row)
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

#: a row -> sample map: an int T (uniform, N = B·T) or a Tensor [N] of sample ids (see the module docstring)
Seg = Union[Tensor, int]

OPS = ("linear_dot", "embedding_dot", "norm_dot", "segment_outer")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    f64 = torch.float64
    for t in tensors:
        if t is not None and t.dtype is f64:
            return f64
    return torch.float32


def check_seg(seg: Seg, n: int, B: int) -> None:
    """Shape, type and values of ``seg`` for n rows and B samples (the values: :func:`check_seg_values`, one device
    sync for ids — the checked ops pay it; their unchecked kernels take segments made valid by construction)."""
    if B < 1:
        raise ValueError(f"B must be >= 1, got {B}")
    if isinstance(seg, int) and not isinstance(seg, bool):
        if seg < 1 or n != B * seg:
            raise ValueError(f"uniform segments of {seg} rows cannot cover {n} rows in {B} samples (need N = B·T)")
        return
    if not isinstance(seg, Tensor):
        raise TypeError(f"seg must be an int (rows per sample) or a Tensor of sample ids, got {type(seg).__name__}")
    if seg.dim() != 1 or seg.shape[0] != n:
        raise ValueError(f"seg must have shape [{n}], got {tuple(seg.shape)}")
    if seg.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seg must be int32 or int64, got {seg.dtype}")
    check_seg_values(seg, B)


def check_seg_values(seg: Seg, B: int) -> None:
    """Every sample id in [0, B) — for kernels that index an output with ``seg`` themselves (one device sync)."""
    if isinstance(seg, Tensor) and seg.numel():
        lo, hi = torch.aminmax(seg)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= B:
            raise ValueError(f"seg holds sample ids in [{lo}, {hi}], outside [0, {B})")


def seg_tensor(seg: Seg, n: int, B: int, device: torch.device) -> Tensor:
    """``seg`` as a Tensor of sample ids (uniform segments expanded: [0]*T + [1]*T + …)."""
    if isinstance(seg, Tensor):
        return seg
    return torch.arange(B, device=device).repeat_interleave(seg)


def segment_sum(tok: Tensor, seg: Seg, B: int) -> Tensor:
    """out[..., b] = Σ_{t: seg_t = b} tok[..., t] for per-row values ``tok`` [..., N].

    Uniform segments are a reshape-sum (deterministic); a Tensor of ids goes through ``index_add_`` (atomic on
    CUDA) — its values checked to lie in [0, B) before (``check_seg``: on a GPU an out-of-range id in
    ``index_add_`` would be a device-side assert, fatal to the process's CUDA context).
    """
    if isinstance(seg, int):
        return tok.unflatten(-1, (B, seg)).sum(-1)
    out = tok.new_zeros(*tok.shape[:-1], B)
    return out.index_add_(out.dim() - 1, seg.long(), tok)


def check_linear(a: Tensor | None, g: Tensor, v: Tensor | None, seg: Seg, B: int, vb: Tensor | None):
    """Validate linear_dot's arguments; return (N, i, o, K) (i = 0 when there is no weight direction)."""
    if g.dim() != 2:
        raise ValueError(f"g must be [N, o], got {tuple(g.shape)}")
    N, o = g.shape
    if v is None and vb is None:
        raise ValueError("linear_dot needs at least one of v, vb")
    i = 0
    if v is not None:
        if a is None or a.dim() != 2 or a.shape[0] != N:
            raise ValueError(f"a must be [{N}, i], got {None if a is None else tuple(a.shape)}")
        i = a.shape[1]
        if v.dim() != 3 or v.shape[1:] != (o, i):
            raise ValueError(f"v must be [K, {o}, {i}], got {tuple(v.shape)}")
    K = v.shape[0] if v is not None else vb.shape[0]
    if vb is not None and vb.shape != (K, o):
        raise ValueError(f"vb must be [{K}, {o}], got {tuple(vb.shape)}")
    check_seg(seg, N, B)
    return N, i, o, K


def check_embedding(ids: Tensor, g: Tensor, v: Tensor, seg: Seg, B: int):
    """Validate embedding_dot's arguments; return (N, d, K, vocab)."""
    if ids.dim() != 1 or g.dim() != 2 or ids.shape[0] != g.shape[0]:
        raise ValueError(f"ids [N] and g [N, d] expected, got {tuple(ids.shape)} and {tuple(g.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    N, d = g.shape
    if v.dim() != 3 or v.shape[2] != d:
        raise ValueError(f"v must be [K, vocab, {d}], got {tuple(v.shape)}")
    check_seg(seg, N, B)
    return N, d, v.shape[0], v.shape[1]


def check_norm(xhat: Tensor, g: Tensor, vw: Tensor | None, vb: Tensor | None, seg: Seg, B: int):
    """Validate norm_dot's arguments; return (N, d, K)."""
    if xhat.shape != g.shape or g.dim() != 2:
        raise ValueError(f"xhat and g must both be [N, d], got {tuple(xhat.shape)} and {tuple(g.shape)}")
    N, d = g.shape
    K = None
    for name, t in (("vw", vw), ("vb", vb)):
        if t is not None:
            if t.dim() != 2 or t.shape[1] != d or (K is not None and t.shape[0] != K):
                raise ValueError(f"{name} must be [K, {d}], got {tuple(t.shape)}")
            K = t.shape[0]
    if K is None:
        raise ValueError("norm_dot needs at least one of vw, vb")
    check_seg(seg, N, B)
    return N, d, K


def check_segment_outer(u: Tensor, w: Tensor, seg: Seg, B: int):
    """Validate segment_outer's arguments; return (N, ku, kw)."""
    if u.dim() != 2 or w.dim() != 2 or u.shape[0] != w.shape[0]:
        raise ValueError(f"u [N, ku] and w [N, kw] expected, got {tuple(u.shape)} and {tuple(w.shape)}")
    check_seg(seg, u.shape[0], B)
    return u.shape[0], u.shape[1], w.shape[1]


def check_row_dot(p: Tensor, x: Tensor, seg: Seg, B: int):
    """Validate row_dot's arguments; return (N, C, K)."""
    if x.dim() != 2 or p.dim() != 3 or p.shape[1:] != x.shape:
        raise ValueError(f"p [K, N, C] and x [N, C] expected, got {tuple(p.shape)} and {tuple(x.shape)}")
    check_seg(seg, x.shape[0], B)
    return x.shape[0], x.shape[1], p.shape[0]
